#!/usr/bin/env bash
# Runs the training program on N SLURM nodes x G GPUs. Run it on a login node:
# it submits itself with sbatch; inside the job (or inside an salloc
# allocation: SLURM_JOB_ID is set) it starts the processes with srun. It can
# also be given to sbatch directly from the repository's root, with the
# defaults below or sbatch's own --nodes etc.:
#   WORKDIR=/shared/runs/x sbatch --nodes=2 launch/slurm_gpu.sh
#SBATCH --job-name=seqcompress
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --time=04:00:00
set -euo pipefail

usage() {
  cat <<EOF
Usage: launch/slurm_gpu.sh [OPTIONS] [-- MAIN_FLAGS...]

Submits a job of NODES x GPUS_PER_NODE GPUs whose processes all run
  python -m seqcompress_jax.main --distributed --config=CONFIG --workdir=WORKDIR MAIN_FLAGS
started by srun: one process per GPU (default; JAX gives each the GPU of its
local rank) or, with --per-node, one per node holding all of its GPUs
(--local_device_ids=0,...,G-1). jax.distributed finds the coordinator (the
first node), the process count and each process's id in SLURM's environment.
Each process logs to LOG_DIR/JOBNAME-JOBID-RANK.log.

Options (or the environment variable named in brackets):
  --nodes N              [NODES] (default: 1)
  --gpus-per-node G      [GPUS_PER_NODE] (default: 8, or SLURM_GPUS_ON_NODE in a job)
  --per-node             one process per node, not per GPU [PER_NODE=1]
  --config SPEC          [CONFIG] (default: configs/cprec.py:pod)
  --workdir DIR          [WORKDIR] (required): a folder every node sees at this
                         path (a shared file system); every process writes its
                         checkpoint shards there
  --log-dir DIR          [LOG_DIR] (default: WORKDIR/logs)
  --job-name NAME        [JOB_NAME] (default: seqcompress)
  --time LIMIT           [TIME] (default: 04:00:00)
  --partition NAME       [PARTITION] (default: the cluster's)
  --account NAME         [ACCOUNT] (default: the cluster's)
  --cpus-per-task N      [CPUS_PER_TASK] (default: the cluster's)
  --python PYTHON        the Python that has the package installed [PYTHON]
                         (default: python3 from PATH, which sbatch passes on:
                         activate the venv first)
  --dry-run              print every command instead of running it [DRY_RUN=1]
  -h, --help             this message

Example (2 nodes x 8 GPUs = 16 processes):
  launch/slurm_gpu.sh --nodes=2 --workdir=/shared/runs/cprec -- --config.train.num_epochs=20
EOF
}

fail_usage() {
  echo "slurm_gpu.sh: $1" >&2
  usage >&2
  exit 2
}

NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
PER_NODE=${PER_NODE:-0}
CONFIG=${CONFIG:-configs/cprec.py:pod}
WORKDIR=${WORKDIR:-}
LOG_DIR=${LOG_DIR:-}
JOB_NAME=${JOB_NAME:-seqcompress}
TIME=${TIME:-04:00:00}
PARTITION=${PARTITION:-}
ACCOUNT=${ACCOUNT:-}
CPUS_PER_TASK=${CPUS_PER_TASK:-}
PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
MAIN_FLAGS=()

set_option() {  # set_option --flag VALUE
  case $1 in
    --nodes) NODES=$2 ;;
    --gpus-per-node) GPUS_PER_NODE=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --log-dir) LOG_DIR=$2 ;;
    --job-name) JOB_NAME=$2 ;;
    --time) TIME=$2 ;;
    --partition) PARTITION=$2 ;;
    --account) ACCOUNT=$2 ;;
    --cpus-per-task) CPUS_PER_TASK=$2 ;;
    --python) PYTHON=$2 ;;
    *) fail_usage "unknown option $1" ;;
  esac
}

set_switch() {  # set_switch --flag
  case $1 in
    --per-node) PER_NODE=1 ;;
    *) return 1 ;;
  esac
}

set_positional() { fail_usage "unexpected argument $1 (flags for the program go after --)"; }

# Inside the job sbatch runs a spool copy of this script, in the repository (--chdir).
here=$(dirname "${BASH_SOURCE[0]}")
[[ -f $here/common.sh ]] || here=launch
source "$here/common.sh"

parse_args "$@"

[[ -n $WORKDIR ]] || fail_usage 'no workdir: --workdir or WORKDIR (shared by every node)'
[[ $NODES =~ ^[1-9][0-9]*$ ]] || fail_usage "--nodes: expected a positive integer, got $NODES"
[[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] ||
  fail_usage "--gpus-per-node: expected a positive integer, got $GPUS_PER_NODE"
[[ $PER_NODE == 0 || $PER_NODE == 1 ]] || fail_usage "PER_NODE: expected 0 or 1, got $PER_NODE"
# Absolute: the job runs in the repository (--chdir).
[[ $WORKDIR == /* ]] || WORKDIR=$PWD/$WORKDIR
LOG_DIR=${LOG_DIR:-$WORKDIR/logs}
[[ $LOG_DIR == /* ]] || LOG_DIR=$PWD/$LOG_DIR

if ((PER_NODE)); then
  TASKS_PER_NODE=1
  DEVICES=(--local_device_ids="$(seq -s, 0 $((GPUS_PER_NODE - 1)))")
else
  TASKS_PER_NODE=$GPUS_PER_NODE
  DEVICES=()
fi
# On every node of the allocation; a process that fails ends the others.
STEP=(srun "--ntasks-per-node=$TASKS_PER_NODE" --kill-on-bad-exit=1
      "--output=$LOG_DIR/%x-%j-%t.log"
      "$PYTHON" -m seqcompress_jax.main --distributed ${DEVICES[@]+"${DEVICES[@]}"}
      "--config=$CONFIG" "--workdir=$WORKDIR" ${MAIN_FLAGS[@]+"${MAIN_FLAGS[@]}"})

if [[ -n ${SLURM_JOB_ID:-} ]]; then  # Inside the job: start the processes.
  run "${STEP[@]}"
  exit
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SUBMIT=(sbatch "--job-name=$JOB_NAME" "--nodes=$NODES" "--gpus-per-node=$GPUS_PER_NODE"
        "--ntasks-per-node=$TASKS_PER_NODE" "--time=$TIME" "--chdir=$REPO"
        "--output=$LOG_DIR/%x-%j.out")
[[ -z $PARTITION ]] || SUBMIT+=("--partition=$PARTITION")
[[ -z $ACCOUNT ]] || SUBMIT+=("--account=$ACCOUNT")
[[ -z $CPUS_PER_TASK ]] || SUBMIT+=("--cpus-per-task=$CPUS_PER_TASK")
run mkdir -p "$LOG_DIR"  # SLURM does not create the folder of --output.
# The job gets the settings in its environment (sbatch passes it on) and
# the program's flags as arguments.
run env "CONFIG=$CONFIG" "WORKDIR=$WORKDIR" "LOG_DIR=$LOG_DIR" "GPUS_PER_NODE=$GPUS_PER_NODE" \
  "PER_NODE=$PER_NODE" "PYTHON=$PYTHON" "${SUBMIT[@]}" "$REPO/launch/slurm_gpu.sh" \
  ${MAIN_FLAGS[@]+-- "${MAIN_FLAGS[@]}"}
if [[ $DRY_RUN == 1 ]]; then
  echo "# then, in the job:"
  quote "${STEP[@]}"
fi
