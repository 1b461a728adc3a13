"""launch/tpu_pod.sh and launch/slurm_gpu.sh: valid bash; their dry runs print
the gcloud / sbatch / srun command lines, and the same commands run without
--dry-run (fake gcloud, sbatch and srun record them; the fake gcloud runs the
ssh commands locally, a one-worker pod); bad usage prints the usage and
fails; the `pod` preset fits their meshes."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import signal
import stat
import subprocess
import sys
import time

import pytest

from seqcompress_jax import main as main_lib
from seqcompress_jax import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(REPO, 'launch', 'tpu_pod.sh')
SLURM_GPU = os.path.join(REPO, 'launch', 'slurm_gpu.sh')
# Records each call (its arguments and the launch settings in its
# environment, a JSON line) and, for `gcloud ... ssh --command CMD`, runs CMD
# in FAKE_HOME as a worker's shell would.
SETTINGS = ('CONFIG', 'WORKDIR', 'LOG_DIR', 'GPUS_PER_NODE', 'PER_NODE', 'PYTHON')
RECORD = ('import json, os, sys; print(json.dumps({"argv": sys.argv[1:], "env": {k: os.environ[k] '
          'for k in %r if k in os.environ}}))' % (SETTINGS,))
FAKE = f'''#!/usr/bin/env bash
{shlex.quote(sys.executable)} -c {shlex.quote(RECORD)} "$(basename "$0")" "$@" >> "$FAKE_CALLS"
args=("$@")
for ((i = 0; i < ${{#args[@]}}; i++)); do
  if [[ ${{args[i]}} == --command ]]; then cd "$FAKE_HOME" && bash -c "${{args[i + 1]}}"; fi
done
'''
WORKER_PYTHON = '''#!/usr/bin/env bash
echo "python $*"
exec sleep 120
'''
POD = ['--name=rec-pod', '--zone=us-central2-b']
MAIN = ('-m seqcompress_jax.main --distributed --config=configs/cprec.py:pod '
        '--workdir=/mnt/runs/x --config.train.num_epochs=3')


def write_executable(path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fakes(tmp_path):
  """An environment whose gcloud, sbatch and srun are fakes; returns (env,
  calls()) where calls() lists the fakes' invocations so far (their
  arguments, the program's name first; calls(True): with their settings)."""
  for name in ('gcloud', 'sbatch', 'srun'):
    write_executable(tmp_path / 'bin' / name, FAKE)
  (tmp_path / 'home').mkdir()
  calls = tmp_path / 'calls.jsonl'
  env = {**os.environ, 'PATH': f'{tmp_path / "bin"}{os.pathsep}{os.environ["PATH"]}',
         'FAKE_CALLS': str(calls), 'FAKE_HOME': str(tmp_path / 'home'), 'TMPDIR': str(tmp_path)}
  for name in (*SETTINGS, 'TPU_NAME', 'ZONE', 'PROJECT', 'ACCELERATOR_TYPE', 'RUNTIME_VERSION',
               'REMOTE_DIR', 'NODES', 'JOB_NAME', 'TIME', 'PARTITION', 'ACCOUNT',
               'CPUS_PER_TASK', 'DRY_RUN', 'SLURM_JOB_ID', 'SLURM_GPUS_ON_NODE'):
    env.pop(name, None)  # The scripts' settings: only what a test gives.

  def recorded(with_env: bool = False) -> list:
    lines = calls.read_text().splitlines() if calls.exists() else []
    return [(c['argv'], c['env']) if with_env else c['argv'] for c in map(json.loads, lines)]

  return env, recorded


def run(script: str, *args: str, env: dict, **extra_env: str) -> subprocess.CompletedProcess:
  return subprocess.run([script, *args], env={**env, **extra_env}, capture_output=True,
                        text=True, timeout=60, cwd=REPO)


@pytest.mark.parametrize('script', [TPU_POD, SLURM_GPU])
def test_scripts_are_valid_bash(script):
  assert subprocess.run(['bash', '-n', script], capture_output=True).returncode == 0
  assert os.access(script, os.X_OK)


def test_tpu_pod_dry_run_prints_every_command(fakes):
  env, calls = fakes
  done = run(TPU_POD, '--dry-run', *POD, '--workdir', '/mnt/runs/x', 'up', '--',
             '--config.train.num_epochs=3', env=env)
  assert done.returncode == 0, done.stderr
  create, archive, copy, install, start = done.stdout.splitlines()
  where = '--zone=us-central2-b --worker=all'
  assert create == ('gcloud compute tpus tpu-vm create rec-pod --zone=us-central2-b '
                    '--accelerator-type=v4-32 --version=tpu-ubuntu2204-base')
  tarball = os.path.join(env['TMPDIR'], 'seqcompress_jax-rec-pod.tar.gz')
  assert archive == f'git -C {REPO} archive --format=tar.gz --output={tarball} HEAD'
  assert copy == (f'gcloud compute tpus tpu-vm scp {tarball} rec-pod:seqcompress_jax.tar.gz '
                  f'{where}')
  assert install.startswith(f'gcloud compute tpus tpu-vm ssh rec-pod {where} --command ')
  assert 'cd seqcompress_jax' in install and '.venv/bin/pip install -q -e ".[tpu]"' in install
  assert start == (f"gcloud compute tpus tpu-vm ssh rec-pod {where} --command 'cd "
                   'seqcompress_jax && mkdir -p logs && { nohup .venv/bin/python '
                   f'{MAIN} >> logs/$(hostname).log 2>&1 < /dev/null & echo $! > '
                   "logs/$(hostname).pid; }'")
  assert calls() == []  # Nothing ran.


def test_tpu_pod_configuration_from_the_environment(fakes):
  env, calls = fakes
  settings = dict(TPU_NAME='p', ZONE='z', PROJECT='proj', ACCELERATOR_TYPE='v5p-16',
                  DRY_RUN='1')
  outputs = {command: run(TPU_POD, command, env=env, **settings).stdout.splitlines()
             for command in ('create', 'logs', 'stop', 'delete')}
  where = '--zone=z --project=proj'
  assert outputs == {
      'create': [f'gcloud compute tpus tpu-vm create p {where} --accelerator-type=v5p-16 '
                 '--version=tpu-ubuntu2204-base'],
      'logs': ['mkdir -p logs/p',
               f'gcloud compute tpus tpu-vm scp --recurse p:seqcompress_jax/logs logs/p {where} '
               '--worker=all'],
      'stop': [f"gcloud compute tpus tpu-vm ssh p {where} --worker=all --command "
               "'pid=seqcompress_jax/logs/$(hostname).pid; if [ -f $pid ]; then kill -9 "
               "$(cat $pid) 2>/dev/null || true; rm -f $pid; fi'"],
      'delete': [f'gcloud compute tpus tpu-vm delete p {where} --quiet'],
  }
  assert calls() == []


def _state(pid: int) -> str:
  """The process's state letter ('R', 'S', 'Z', ...), '' when it is gone."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0]
  except FileNotFoundError:
    return ''


def test_tpu_pod_runs_what_it_prints_start_and_stop_on_a_worker(fakes):
  env, calls = fakes
  worker = os.path.join(env['FAKE_HOME'], 'seqcompress_jax')
  write_executable(pathlib.Path(worker, '.venv', 'bin', 'python'), WORKER_PYTHON)
  args = [*POD, '--workdir=/mnt/runs/x', 'start', '--', '--config.train.num_epochs=3']
  printed = run(TPU_POD, '--dry-run', *args, env=env).stdout
  done = run(TPU_POD, *args, env=env)
  assert done.returncode == 0, done.stderr
  assert calls() == [shlex.split(printed)]
  host = os.uname().nodename
  pid_file = os.path.join(worker, 'logs', f'{host}.pid')
  with open(pid_file) as f:
    pid = int(f.read())
  try:
    log = os.path.join(worker, 'logs', f'{host}.log')
    for _ in range(100):  # The worker's program starts in the background.
      if os.path.exists(log) and 'python' in open(log).read():
        break
      time.sleep(0.05)
    assert f'python {MAIN}\n' in open(log).read()
    assert _state(pid) not in ('', 'Z')
    assert run(TPU_POD, *POD, 'stop', env=env).returncode == 0
    for _ in range(100):
      if _state(pid) in ('', 'Z'):  # Killed (a zombie until its new parent reaps it).
        break
      time.sleep(0.05)
    assert _state(pid) in ('', 'Z') and not os.path.exists(pid_file)
  finally:
    if _state(pid) not in ('', 'Z'):
      os.kill(pid, signal.SIGKILL)


SRUN = ('srun --ntasks-per-node={tasks} --kill-on-bad-exit=1 '
        '--output=/shared/runs/x/logs/%x-%j-%t.log python3 -m seqcompress_jax.main '
        '--distributed {devices}--config=configs/cprec.py:pod --workdir=/shared/runs/x '
        "--config.train.num_epochs=3 '--config.model.dilations=(1, 4)'")


@pytest.mark.parametrize('per_node', [False, True])
def test_slurm_dry_run_prints_sbatch_and_the_srun_of_the_job(fakes, per_node):
  env, calls = fakes
  done = run(SLURM_GPU, '--dry-run', '--nodes', '2', '--workdir=/shared/runs/x',
             '--partition=gpu', *(['--per-node'] if per_node else []), '--',
             '--config.train.num_epochs=3', '--config.model.dilations=(1, 4)', env=env)
  assert done.returncode == 0, done.stderr
  tasks = 1 if per_node else 8
  assert done.stdout.splitlines() == [
      'mkdir -p /shared/runs/x/logs',
      'env CONFIG=configs/cprec.py:pod WORKDIR=/shared/runs/x LOG_DIR=/shared/runs/x/logs '
      f'GPUS_PER_NODE=8 PER_NODE={int(per_node)} PYTHON=python3 sbatch --job-name=seqcompress '
      f'--nodes=2 --gpus-per-node=8 --ntasks-per-node={tasks} --time=04:00:00 --chdir={REPO} '
      '--output=/shared/runs/x/logs/%x-%j.out --partition=gpu '
      f"{SLURM_GPU} -- --config.train.num_epochs=3 '--config.model.dilations=(1, 4)'",
      '# then, in the job:',
      SRUN.format(tasks=tasks,
                  devices='--local_device_ids=0,1,2,3,4,5,6,7 ' if per_node else ''),
  ]
  assert calls() == []


def test_slurm_submits_and_the_job_runs_srun(fakes, tmp_path):
  env, calls = fakes
  args = ['--workdir', str(tmp_path / 'run'), '--gpus-per-node=4', '--per-node', '--',
          '--config.train.num_epochs=3']
  printed = run(SLURM_GPU, '--dry-run', *args, env=env).stdout.splitlines()
  done = run(SLURM_GPU, *args, env=env)
  assert done.returncode == 0, done.stderr
  assert (tmp_path / 'run' / 'logs').is_dir()
  # `env SETTINGS... sbatch OPTIONS... SCRIPT -- FLAGS...`: sbatch gets them all.
  command = shlex.split(printed[1])
  at = command.index('sbatch')
  ((submit, settings),) = calls(True)
  assert command[0] == 'env' and submit == command[at:]
  assert settings == dict(a.split('=', 1) for a in command[1:at])
  # The job: the script again, with sbatch's environment and arguments.
  job = run(SLURM_GPU, *submit[submit.index(SLURM_GPU) + 1:], env=env, SLURM_JOB_ID='42',
            **settings)
  assert job.returncode == 0, job.stderr
  assert calls()[1] == shlex.split(printed[3])
  assert '--local_device_ids=0,1,2,3' in calls()[1]


@pytest.mark.parametrize('script, args, extra_env, message', [
    (TPU_POD, [], {}, 'no command'),
    (TPU_POD, [*POD, 'launch'], {}, 'unknown command launch'),
    (TPU_POD, [*POD, 'create', 'delete'], {}, 'one command at a time'),
    (TPU_POD, ['--zone=z', 'create'], {}, 'no slice name'),
    (TPU_POD, ['create'], {'TPU_NAME': 'p'}, 'no zone'),
    (TPU_POD, [*POD, 'start'], {}, 'no workdir'),
    (TPU_POD, [*POD, '--workers=2', 'create'], {}, 'unknown option --workers'),
    (TPU_POD, [*POD, 'create', '--config'], {}, '--config needs a value'),
    (SLURM_GPU, [], {}, 'no workdir'),
    (SLURM_GPU, ['--workdir=/w', '--nodes=two'], {}, '--nodes: expected a positive integer'),
    (SLURM_GPU, ['--workdir=/w'], {'GPUS_PER_NODE': '0'}, '--gpus-per-node: expected'),
    (SLURM_GPU, ['--workdir=/w', 'train'], {}, 'unexpected argument train'),
    (SLURM_GPU, ['--workdir=/w', '--gpus=8'], {}, 'unknown option --gpus'),
])
def test_bad_usage_prints_the_usage_and_fails(fakes, script, args, extra_env, message):
  env, calls = fakes
  done = run(script, *args, env=env, **extra_env)
  assert done.returncode == 2 and done.stdout == ''
  assert message in done.stderr and 'Usage: launch/' in done.stderr
  assert calls() == []


@pytest.mark.parametrize('script', [TPU_POD, SLURM_GPU])
def test_help_prints_the_usage(fakes, script):
  done = run(script, '--help', env=fakes[0])
  assert done.returncode == 0 and done.stdout.startswith('Usage: launch/')
  assert '--dry-run' in done.stdout


@pytest.mark.parametrize('spec', ['configs/cprec.py:pod', 'configs/nextitnet.py:pod'])
def test_pod_preset_fits_a_v4_32_and_8_gpus(spec):
  config = main_lib.load_config_file(os.path.join(REPO, spec))
  assert config.model.dtype == 'bfloat16'
  for devices in (16, 8):  # TPU v4-32 (16 chips), 8 GPUs: everything on `data`.
    assert sharding.mesh_shape(config.mesh, devices) == (devices, 1)
    assert config.data.batch_size % devices == config.data.eval_batch_size % devices == 0
