#!/usr/bin/env bash
# Runs the training program on a Cloud TPU VM slice (a pod): one process per
# worker, all started with the same command. See usage() below.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COMMANDS='create install start logs stop delete up'

usage() {
  cat <<EOF
Usage: launch/tpu_pod.sh [OPTIONS] COMMAND [-- MAIN_FLAGS...]

Runs \`python -m seqcompress_jax.main --distributed\` on every worker of a TPU VM
slice; jax.distributed finds the coordinator, the process count and each
worker's id by itself.

Commands:
  create    create the slice (gcloud compute tpus tpu-vm create)
  install   copy the repository's HEAD commit to every worker and install it
            there in a venv (pip install -e '.[tpu]'; installs PYTHON first if needed)
  start     start the run on every worker, in the background, each logging to
            REMOTE_DIR/logs/HOSTNAME.log (MAIN_FLAGS are added to the command)
  logs      copy every worker's log into LOG_DIR
  stop      kill the run on every worker (start again to resume it from its
            latest checkpoint)
  delete    delete the slice
  up        create, install and start

Options (or the environment variable named in brackets):
  --name NAME              the slice's name [TPU_NAME] (required)
  --zone ZONE              e.g. us-central2-b [ZONE] (required)
  --project PROJECT        [PROJECT] (default: gcloud's)
  --accelerator-type TYPE  [ACCELERATOR_TYPE] (default: v4-32, 16 chips on 4 workers)
  --version VERSION        the TPU VM image [RUNTIME_VERSION] (default: tpu-ubuntu2204-base)
  --config SPEC            [CONFIG] (default: configs/cprec.py:pod)
  --workdir DIR            [WORKDIR] (required by start): a folder every worker
                           sees at this path, such as a Cloud Storage bucket
                           mounted with gcsfuse or a Filestore share; every
                           worker writes its checkpoint shards there
  --remote-dir DIR         the repository on the workers, from the home folder
                           [REMOTE_DIR] (default: seqcompress_jax)
  --python PYTHON          Python >= 3.11 on the workers [PYTHON] (default: python3.11)
  --log-dir DIR            where logs puts the logs [LOG_DIR] (default: logs/NAME)
  --dry-run                print every command instead of running it [DRY_RUN=1]
  -h, --help               this message

Example:
  launch/tpu_pod.sh --name=rec-pod --zone=us-central2-b --workdir=/mnt/runs/cprec up
  launch/tpu_pod.sh --name=rec-pod --zone=us-central2-b logs
EOF
}

fail_usage() {
  echo "tpu_pod.sh: $1" >&2
  usage >&2
  exit 2
}

TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
CONFIG=${CONFIG:-configs/cprec.py:pod}
WORKDIR=${WORKDIR:-}
REMOTE_DIR=${REMOTE_DIR:-seqcompress_jax}
PYTHON=${PYTHON:-python3.11}
LOG_DIR=${LOG_DIR:-}
DRY_RUN=${DRY_RUN:-0}
COMMAND=
MAIN_FLAGS=()

set_option() {  # set_option --flag VALUE
  case $1 in
    --name) TPU_NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --project) PROJECT=$2 ;;
    --accelerator-type) ACCELERATOR_TYPE=$2 ;;
    --version) RUNTIME_VERSION=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --remote-dir) REMOTE_DIR=$2 ;;
    --python) PYTHON=$2 ;;
    --log-dir) LOG_DIR=$2 ;;
    *) fail_usage "unknown option $1" ;;
  esac
}

set_switch() { return 1; }  # No switches but --dry-run.

set_positional() {  # The command.
  [[ -z $COMMAND ]] || fail_usage "one command at a time (got $COMMAND and $1)"
  COMMAND=$1
}

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "$@"

[[ -n $COMMAND ]] || fail_usage 'no command'
[[ " $COMMANDS " == *" $COMMAND "* ]] || fail_usage "unknown command $COMMAND"
[[ -n $TPU_NAME ]] || fail_usage 'no slice name: --name or TPU_NAME'
[[ -n $ZONE ]] || fail_usage 'no zone: --zone or ZONE'
if [[ $COMMAND == start || $COMMAND == up ]]; then
  [[ -n $WORKDIR ]] || fail_usage 'no workdir: --workdir or WORKDIR (shared by every worker)'
fi
LOG_DIR=${LOG_DIR:-logs/$TPU_NAME}

TPU=(gcloud compute tpus tpu-vm)
WHERE=("--zone=$ZONE")
[[ -z $PROJECT ]] || WHERE+=("--project=$PROJECT")

on_all_workers() {  # on_all_workers SHELL_COMMAND
  run "${TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command "$1"
}

create() {
  run "${TPU[@]}" create "$TPU_NAME" "${WHERE[@]}" "--accelerator-type=$ACCELERATOR_TYPE" \
    "--version=$RUNTIME_VERSION"
}

install() {
  local tarball="${TMPDIR:-/tmp}/seqcompress_jax-$TPU_NAME.tar.gz" dir python
  if [[ -n $(git -C "$REPO" status --porcelain --untracked-files=no) ]]; then
    echo 'tpu_pod.sh: warning: uncommitted changes are not installed (only HEAD is)' >&2
  fi
  run git -C "$REPO" archive --format=tar.gz "--output=$tarball" HEAD
  run "${TPU[@]}" scp "$tarball" "$TPU_NAME:seqcompress_jax.tar.gz" "${WHERE[@]}" --worker=all
  dir=$(quote "$REMOTE_DIR")
  python=$(quote "$PYTHON")
  on_all_workers "set -e; $python -c \"import ensurepip\" 2>/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq $python $python-venv; }; mkdir -p $dir && tar -xzf seqcompress_jax.tar.gz -C $dir && cd $dir && { [ -d .venv ] || $python -m venv .venv; } && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e \".[tpu]\""
}

start() {
  local main
  main=$(quote .venv/bin/python -m seqcompress_jax.main --distributed "--config=$CONFIG" \
    "--workdir=$WORKDIR" ${MAIN_FLAGS[@]+"${MAIN_FLAGS[@]}"})
  on_all_workers "cd $(quote "$REMOTE_DIR") && mkdir -p logs && { nohup $main >> logs/\$(hostname).log 2>&1 < /dev/null & echo \$! > logs/\$(hostname).pid; }"
}

logs() {
  run mkdir -p "$LOG_DIR"
  run "${TPU[@]}" scp --recurse "$TPU_NAME:$REMOTE_DIR/logs" "$LOG_DIR" "${WHERE[@]}" --worker=all
}

stop() {
  # SIGKILL: JAX catches SIGTERM (a pre-emption notice) and carries on.
  on_all_workers "pid=$(quote "$REMOTE_DIR")/logs/\$(hostname).pid; if [ -f \$pid ]; then kill -9 \$(cat \$pid) 2>/dev/null || true; rm -f \$pid; fi"
}

delete() {
  run "${TPU[@]}" delete "$TPU_NAME" "${WHERE[@]}" --quiet
}

case $COMMAND in
  up) create; install; start ;;
  *) "$COMMAND" ;;
esac
