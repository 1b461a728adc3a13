# Shell helpers shared by the launch scripts (sourced; DRY_RUN set by the caller).

quote() {  # The arguments as one shell command line.
  local words=() word
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      words+=("$word")
    else  # In single quotes, each ' written as '\''.
      words+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${words[*]}"
}

run() {  # Runs a command, or prints it with --dry-run.
  if [[ $DRY_RUN == 1 ]]; then quote "$@"; else "$@"; fi
}
