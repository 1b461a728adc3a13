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

parse_args() {  # The launch scripts' command line: -h/--help, --dry-run, the caller's
  # switches (set_switch --flag; nonzero if it is not one), --flag=VALUE or --flag VALUE
  # (set_option --flag VALUE), other words (set_positional WORD), and after --, the
  # program's flags (MAIN_FLAGS).
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --) shift; MAIN_FLAGS=("$@"); break ;;
      --*=*) set_option "${1%%=*}" "${1#*=}" ;;
      --*)
        if ! set_switch "$1"; then
          (($# >= 2)) || fail_usage "$1 needs a value"
          set_option "$1" "$2"
          shift
        fi ;;
      *) set_positional "$1" ;;
    esac
    shift
  done
}
