"""Tests for scripts/tpu_pod.py: gcloud commands, worker scripts, errors.

No cloud: dry runs, a fake `gcloud` on PATH that records its arguments, and
the worker shell scripts run here with bash in a temporary home directory.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest

from scripts import tpu_pod

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SSH = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'NAME', '--zone=ZONE',
        '--worker=all']
_TRAIN = ['python', 'scripts/train.py', '--config=configs/imagenet.py']
_FAKE_GCLOUD = '''#!{python}
import json, os, sys, tarfile
call = {{'argv': sys.argv[1:]}}
if sys.argv[1:5] == ['compute', 'tpus', 'tpu-vm', 'scp']:
  with tarfile.open(sys.argv[5]) as tar:
    call['members'] = tar.getnames()
with open(os.environ['FAKE_GCLOUD_LOG'], 'a') as f:
  f.write(json.dumps(call) + '\\n')
if os.environ.get('FAKE_GCLOUD_FAIL'):
  sys.stderr.write('ERROR: (gcloud.compute.tpus) NOT_FOUND: no such TPU\\n')
  sys.exit(3)
'''


def _with_dry_run(argv):
  """`argv` with --dry_run before any `--` (after it, it is the command's)."""
  argv = list(argv)
  i = argv.index('--') if '--' in argv else len(argv)
  return [*argv[:i], '--dry_run', *argv[i:]]


def _dry_run(capsys, *argv):
  assert tpu_pod.main(_with_dry_run(argv)) == 0
  return [shlex.split(line) for line in
          capsys.readouterr().out.splitlines()]


@pytest.fixture(autouse=True)
def _no_real_gcloud(tmp_path_factory, monkeypatch):
  """Puts a gcloud that fails first on PATH: tests never reach the cloud."""
  bin_dir = tmp_path_factory.mktemp('poison')
  gcloud = bin_dir / 'gcloud'
  gcloud.write_text('#!/bin/sh\necho "the real gcloud was called" >&2\n'
                    'exit 99\n')
  gcloud.chmod(0o755)
  monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')


def _script_of(command):
  assert command[:-1] == _SSH
  assert command[-1].startswith('--command=')
  return command[-1][len('--command='):]


def test_run_dry_run_from_the_command_line():
  out = subprocess.run(
      [sys.executable, 'scripts/tpu_pod.py', 'run', '--tpu=NAME',
       '--zone=ZONE', '--dry_run', '--', *_TRAIN],
      cwd=_ROOT, capture_output=True, text=True, check=True, timeout=60).stdout
  lines = out.splitlines()
  assert len(lines) == 3  # scp, install, launch: one command per line.
  scp, install, launch = (shlex.split(line) for line in lines)
  assert scp == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp',
                 tpu_pod.tarball_path(tpu_pod.Slice('NAME', 'ZONE')),
                 'NAME:perceiver_jax.tar.gz', '--zone=ZONE', '--worker=all']
  assert "pip install -q -e '.[tpu]'" in _script_of(install)
  script = _script_of(launch)
  assert ('python scripts/train.py --distributed '
          '--config=configs/imagenet.py') in script
  assert 'setsid nohup bash -c' in script
  assert '>> "$L/run.log"' in script


def test_dry_run_of_each_subcommand(capsys):
  common = ['--tpu=NAME', '--zone=ZONE']
  assert _dry_run(capsys, 'create', *common, '--accelerator_type=v4-32',
                  '--spot') == [
                      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'NAME',
                       '--zone=ZONE', '--accelerator-type=v4-32',
                       '--version=tpu-ubuntu2204-base', '--spot']]
  assert _dry_run(capsys, 'create', *common, '--project=P', '--queued',
                  '--guaranteed', '--accelerator_type=v5p-16',
                  '--valid_until_duration=6h') == [
                      ['gcloud', 'compute', 'tpus', 'queued-resources',
                       'create', 'NAME', '--zone=ZONE', '--project=P',
                       '--node-id=NAME', '--accelerator-type=v5p-16',
                       '--runtime-version=v2-alpha-tpuv5',
                       '--valid-until-duration=6h', '--guaranteed']]
  setup = _dry_run(capsys, 'setup', *common)
  assert [c[:5] for c in setup] == [['gcloud', 'compute', 'tpus', 'tpu-vm',
                                     'scp'], _SSH[:5]]
  install = _script_of(setup[1])
  assert 'tar -xzf perceiver_jax.tar.gz -C perceiver_jax' in install
  assert 'venv -q --seed --python 3.11 .venv' in install
  system = _script_of(_dry_run(capsys, 'setup', *common, '--system_python')[1])
  assert 'venv' not in system
  assert "python3 -m pip install -q -e '.[tpu]'" in system

  run = _dry_run(capsys, 'run', *common, '--no_setup', '--', *_TRAIN)
  assert len(run) == 1 and _script_of(run[0])
  logs = _dry_run(capsys, 'logs', *common, '--worker=2', '--lines=5',
                  '--follow')
  assert logs[0][:-1] == [*_SSH[:-1], '--worker=2']
  assert 'tail -n 5 -F "$L/run.log"' in logs[0][-1]
  assert 'hostname)] /' not in logs[0][-1]  # Prefixes for --worker=all only.
  assert 'kill -TERM -- -"$pg"' in _script_of(
      _dry_run(capsys, 'stop', *common)[0])
  assert 'kill -KILL' in _script_of(
      _dry_run(capsys, 'stop', *common, '--force')[0])
  assert _dry_run(capsys, 'delete', *common) == [
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'NAME', '--zone=ZONE']]
  assert _dry_run(capsys, 'delete', *common, '--queued', '--yes') == [
      ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'NAME',
       '--zone=ZONE', '--force', '--quiet']]


@pytest.mark.parametrize('command, expected', [
    (_TRAIN, 'python scripts/train.py --distributed '
     '--config=configs/imagenet.py'),
    (['python3', '/home/u/perceiver_jax/scripts/train.py', '--config=c.py'],
     'python3 /home/u/perceiver_jax/scripts/train.py --distributed '
     '--config=c.py'),
    (['perceiver-train', '--config=c.py'],
     'perceiver-train --distributed --config=c.py'),
    ([*_TRAIN, '--nodistributed'], shlex.join([*_TRAIN, '--nodistributed'])),
    ([*_TRAIN, '--coordinator_address=h:1'],
     shlex.join([*_TRAIN, '--coordinator_address=h:1'])),
    # Evaluation on a pod: every host evaluates its shard.
    (['python', 'scripts/evaluate.py', '--config=c.py'],
     'python scripts/evaluate.py --distributed --config=c.py'),
    (['perceiver-evaluate --checkpoint=gs://b/r'],
     'perceiver-evaluate --distributed --checkpoint=gs://b/r'),
    (['python', 'scripts/classify.py', '--config=c.py'],
     'python scripts/classify.py --config=c.py'),
    # One word is a shell line, kept as it is apart from --distributed.
    (['FOO=1 python scripts/train.py --config="a b" && echo done'],
     'FOO=1 python scripts/train.py --distributed --config="a b" && '
     'echo done'),
    (['python scripts/train.py --distributed'],
     'python scripts/train.py --distributed'),
    (['python', '-c', 'print("a b")'], 'python -c \'print("a b")\''),
])
def test_command_string(command, expected):
  assert tpu_pod.command_string(command) == expected


def test_command_string_without_adding_distributed():
  assert tpu_pod.command_string(_TRAIN, add_distributed=False) == shlex.join(
      _TRAIN)


def test_default_version():
  assert tpu_pod.default_version('v4-32') == 'tpu-ubuntu2204-base'
  assert tpu_pod.default_version('v2-8') == 'tpu-ubuntu2204-base'
  assert tpu_pod.default_version('v5litepod-16') == 'v2-alpha-tpuv5-lite'
  assert tpu_pod.default_version('v6e-8') == 'v2-alpha-tpuv6e'


def _fake_gcloud(tmp_path, monkeypatch):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  gcloud = bin_dir / 'gcloud'
  gcloud.write_text(_FAKE_GCLOUD.format(python=sys.executable))
  gcloud.chmod(0o755)
  log = tmp_path / 'calls.jsonl'
  monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  monkeypatch.setenv('FAKE_GCLOUD_LOG', str(log))

  def calls():
    if not log.exists():
      return []
    return [json.loads(line) for line in log.read_text().splitlines()]
  return calls


@pytest.mark.parametrize('argv', [
    ['setup'],
    ['run', '--', *_TRAIN],
    ['run', '--no_setup', '--', *_TRAIN],
    ['logs', '--worker=1'],
    ['stop', '--timeout=60'],
    ['delete', '--queued'],
    ['create', '--accelerator_type=v4-8', '--spot'],
])
def test_real_run_calls_gcloud_as_the_dry_run_prints(argv, tmp_path,
                                                     monkeypatch, capsys):
  calls = _fake_gcloud(tmp_path, monkeypatch)
  sub, rest = argv[0], argv[1:]
  full = [sub, '--tpu=NAME', '--zone=ZONE', '--project=P']
  expected = _dry_run(capsys, *full, *rest)
  assert tpu_pod.main([*full, *rest]) == 0
  recorded = calls()
  assert [['gcloud', *c['argv']] for c in recorded] == expected
  assert all('--project=P' in c for c in expected)
  tarball = tpu_pod.tarball_path(tpu_pod.Slice('NAME', 'ZONE', 'P'))
  if sub == 'setup' or (sub == 'run' and '--no_setup' not in rest):
    members = recorded[0]['members']
    assert {'setup.py', 'scripts/tpu_pod.py', 'scripts/train.py',
            'tests/test_tpu_pod.py'} <= set(members)
    assert not [m for m in members if m.startswith('.venv') or
                '__pycache__' in m or m.startswith('.git/')]
    assert not os.path.exists(tarball)  # Removed after the copy.
  else:
    assert 'members' not in recorded[0]


def test_failing_gcloud_shows_its_stderr_and_exit_code(tmp_path, monkeypatch,
                                                       capsys):
  calls = _fake_gcloud(tmp_path, monkeypatch)
  monkeypatch.setenv('FAKE_GCLOUD_FAIL', '1')
  assert tpu_pod.main(['delete', '--tpu=NAME', '--zone=ZONE']) == 3
  err = capsys.readouterr().err
  assert 'gcloud failed with exit code 3' in err
  assert 'NOT_FOUND: no such TPU' in err
  assert 'gcloud compute tpus tpu-vm delete NAME --zone=ZONE' in err
  # setup stops at the failing copy: no install is attempted.
  assert tpu_pod.main(['setup', '--tpu=NAME', '--zone=ZONE']) == 3
  assert [c['argv'][3] for c in calls()] == ['delete', 'scp']


def test_gcloud_missing_from_path(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv('PATH', str(tmp_path))
  assert tpu_pod.main(['stop', '--tpu=NAME', '--zone=ZONE']) == 1
  err = capsys.readouterr().err
  assert 'gcloud is not on PATH' in err
  assert tpu_pod.SDK_URL in err
  # A dry run needs no gcloud.
  assert tpu_pod.main(['stop', '--tpu=NAME', '--zone=ZONE', '--dry_run']) == 0


@pytest.mark.parametrize('argv, message', [
    (['run', '--tpu=NAME', '--zone=ZONE', '--dry_run'],
     'run needs the command'),
    (['run', '--tpu=NAME', '--zone=ZONE', '--dry_run', '--'],
     'run needs the command'),
    (['logs', '--tpu=NAME', '--zone=ZONE', '--', 'ls'],
     'logs takes no command'),
    (['create', '--tpu=NAME', '--zone=ZONE', '--accelerator_type=v4-8',
      '--guaranteed'], 'need --queued'),
    (['create', '--tpu=NAME', '--zone=ZONE', '--accelerator_type=v4-8',
      '--queued', '--spot', '--reserved'], 'at most one of'),
])
def test_usage_errors(argv, message, capsys):
  assert tpu_pod.main(argv) == 1
  assert message in capsys.readouterr().err


@pytest.mark.parametrize('argv, message', [
    (['stop', '--zone=ZONE'], '--tpu'),
    (['stop', '--tpu=NAME'], '--zone'),
    (['create', '--tpu=NAME', '--zone=ZONE'], '--accelerator_type'),
    ([], 'subcommand'),
])
def test_missing_flags(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    tpu_pod.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert 'required' in err and message in err


# The worker scripts, run here by bash in a temporary home directory.

_TRAINER = textwrap.dedent('''\
    import signal, sys, time
    def stop(signum, frame):
      print('saving checkpoint', flush=True)
      sys.exit(143)
    signal.signal(signal.SIGTERM, stop)
    print('ready', flush=True)
    while True:
      time.sleep(0.1)
    ''')


def _on_worker(home, script, timeout=60):
  env = dict(os.environ, HOME=str(home))
  return subprocess.run(['bash', '-c', script], cwd=home, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _wait_for(path, text, timeout=30):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if path.exists() and text in path.read_text():
      return
    time.sleep(0.1)
  raise AssertionError(f'{text!r} not in {path}')


@pytest.mark.skipif(shutil.which('setsid') is None, reason='needs setsid')
def test_worker_scripts_start_log_and_stop_a_run(tmp_path):
  home = tmp_path
  assert 'run setup first' in _on_worker(
      home, tpu_pod.launch_script('true')).stderr
  (home / 'perceiver_jax').mkdir()
  (home / 'perceiver_jax' / 'trainer.py').write_text(_TRAINER)
  command = tpu_pod.command_string(
      [sys.executable, 'trainer.py', '--config=configs/imagenet.py'])
  try:
    _start_log_and_stop(home, command)
  finally:  # Never leave the fake trainer behind.
    _on_worker(home, tpu_pod.stop_script(timeout=5, force=True))


def _start_log_and_stop(home, command):
  started = _on_worker(home, tpu_pod.launch_script(command))
  assert started.returncode == 0, started.stderr
  assert 'started on' in started.stdout
  log = home / 'perceiver_jax_logs' / 'run.log'
  _wait_for(log, 'ready')  # Runs in ~/perceiver_jax, detached.

  again = _on_worker(home, tpu_pod.launch_script(command))
  assert again.returncode == 1 and 'a run is going' in again.stderr
  assert 'stop it before setup' in _on_worker(
      home, tpu_pod.install_script()).stderr
  logs = _on_worker(home, tpu_pod.logs_commands(
      tpu_pod.Slice('N', 'Z'))[0][-1][len('--command='):])
  assert '] ready' in logs.stdout and logs.stdout.startswith('[')

  stopped = _on_worker(home, tpu_pod.stop_script(timeout=30))
  assert stopped.returncode == 0, stopped.stderr
  assert 'SIGTERM sent' in stopped.stdout
  assert 'stopped on' in stopped.stdout
  text = log.read_text()
  assert 0 < text.index('saving checkpoint') < text.index('exit code 143')
  assert (home / 'perceiver_jax_logs' / 'run.exit').read_text().strip() == (
      '143')
  assert 'no run going' in _on_worker(home, tpu_pod.stop_script()).stdout

  failed = _on_worker(home, tpu_pod.launch_script('echo oops; exit 7'))
  assert failed.returncode == 1
  assert 'failed at once' in failed.stderr and 'oops' in failed.stderr
  ok = _on_worker(home, tpu_pod.launch_script('echo fine'))
  assert ok.returncode == 0, ok.stderr


def test_make_tarball_packs_the_working_tree(tmp_path):
  path = tmp_path / 'p.tar.gz'
  n = tpu_pod.make_tarball(_ROOT, str(path))
  with tarfile.open(path) as tar:
    names = tar.getnames()
  assert len(names) == n and 'scripts/tpu_pod.py' in names
  assert not [m for m in names if m.startswith(('.venv', '.git/'))]


def test_install_script_unpacks_and_installs_in_a_kept_venv(tmp_path):
  home = tmp_path / 'home'
  (home / '.local' / 'bin').mkdir(parents=True)
  source = tmp_path / 'src'
  (source / 'scripts').mkdir(parents=True)
  (source / 'scripts' / 'train.py').write_text('# train\n')
  with tarfile.open(home / 'perceiver_jax.tar.gz', 'w:gz') as tar:
    tar.add(source / 'scripts' / 'train.py', arcname='scripts/train.py')
  record = 'echo "$(basename "$0") $*" >> "$HOME/calls"'
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  fakes = {
      bin_dir / 'python3': record,
      # uv makes a venv whose python records its arguments too.
      home / '.local' / 'bin' / 'uv': (
          f'{record}; mkdir -p .venv/bin; '
          f'printf \'#!/bin/sh\\n%s\\n\' \'{record}\' > .venv/bin/python; '
          'chmod +x .venv/bin/python'),
  }
  for path, body in fakes.items():
    path.write_text(f'#!/bin/sh\n{body}\n')
    path.chmod(0o755)
  env = dict(os.environ, HOME=str(home),
             PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')

  def install():
    result = subprocess.run(['bash', '-c', tpu_pod.install_script()],
                            cwd=home, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert 'installed on' in result.stdout

  install()
  assert (home / 'perceiver_jax' / 'scripts' / 'train.py').exists()
  assert not (home / 'perceiver_jax.tar.gz').exists()
  assert (home / 'calls').read_text().splitlines() == [
      'python3 -m pip install -q --user uv',
      'uv venv -q --seed --python 3.11 .venv',
      'python -m pip install -q -e .[tpu]']
  (home / 'calls').unlink()
  with tarfile.open(home / 'perceiver_jax.tar.gz', 'w:gz') as tar:
    tar.add(source / 'scripts' / 'train.py', arcname='scripts/train.py')
  install()  # The venv is kept: only pip runs again.
  assert (home / 'calls').read_text().splitlines() == [
      'python -m pip install -q -e .[tpu]']
