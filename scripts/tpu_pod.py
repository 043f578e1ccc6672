r"""Launches training on a Cloud TPU VM slice: a multi-host pod or one TPU VM.

  python scripts/tpu_pod.py create --tpu=NAME --zone=ZONE \
      --accelerator_type=v4-32 [--spot] [--queued [--guaranteed]]
  python scripts/tpu_pod.py setup --tpu=NAME --zone=ZONE
  python scripts/tpu_pod.py run --tpu=NAME --zone=ZONE -- \
      python scripts/train.py --config=configs/imagenet.py ...
  python scripts/tpu_pod.py logs --tpu=NAME --zone=ZONE [--worker=0] [--follow]
  python scripts/tpu_pod.py stop --tpu=NAME --zone=ZONE
  python scripts/tpu_pod.py delete --tpu=NAME --zone=ZONE [--queued]

Every subcommand takes --tpu, --zone, [--project] and --dry_run, which prints
the gcloud commands (one per line, shell-quoted) instead of running them.

- `setup` packs the working tree (the files `git ls-files` lists, tracked or
  untracked but not ignored, as they are on disk, so uncommitted edits travel
  and .venv, runs/ and caches do not) into one tarball, copies it to every
  worker with `tpu-vm scp --worker=all` and unpacks it over ~/perceiver_jax
  (files are overwritten, none deleted). The TPU images ship Python 3.10 and
  the project needs >= 3.11, so it then makes ~/perceiver_jax/.venv with a
  uv-managed Python (--python; once, kept across setups) and runs
  `pip install -e '.[tpu]'` there (--system_python: the image's python3).
- `run` first does `setup` (--no_setup skips it; it keeps every worker on the
  same code, which multi-host runs need), then starts the command on all
  workers at once, detached with `setsid nohup` (no tmux needed on the image)
  in ~/perceiver_jax with the venv first on PATH. Each worker appends to its
  own ~/perceiver_jax_logs/run.log and keeps the process group in run.pid;
  a second `run` while one is going is refused. For scripts/train.py and
  scripts/evaluate.py (or perceiver-train, perceiver-evaluate) it adds
  --distributed unless a distributed flag is given:
  on a pod JAX then discovers the hosts, and on a single TPU VM it finds a
  one-process cluster, so the same command serves both and no query of the
  slice is needed (--no_add_distributed turns this off).
- `stop` sends SIGTERM to the process group on every worker, so training
  saves a checkpoint and exits (code 143), and waits for it (--timeout);
  --force sends SIGKILL instead. `logs` tails run.log (per worker, lines
  prefixed with the host name for --worker=all).
- `create` makes a TPU VM (`tpu-vm create`, --spot allowed) or, with
  --queued, a queued resource of the same name (--spot, --guaranteed or
  --reserved; it is ready when `gcloud compute tpus queued-resources describe`
  says ACTIVE). `delete` removes either (--queued: with --force, its node too).

Needs the Google Cloud SDK (`gcloud`, authenticated) on this machine.
"""

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from typing import Optional, Sequence

REMOTE_DIR = 'perceiver_jax'  # Relative to the workers' home directory.
LOG_DIR = 'perceiver_jax_logs'  # Likewise: ~/perceiver_jax_logs.
REMOTE_TARBALL = 'perceiver_jax.tar.gz'
DEFAULT_PYTHON = '3.11'
SDK_URL = 'https://cloud.google.com/sdk/docs/install'

# `--version` when none is given, by accelerator family (Cloud TPU docs,
# "TPU software versions"); v4 and older use the base image.
_VERSIONS = {'v5litepod': 'v2-alpha-tpuv5-lite', 'v5e': 'v2-alpha-tpuv5-lite',
             'v5p': 'v2-alpha-tpuv5', 'v6e': 'v2-alpha-tpuv6e'}
DEFAULT_VERSION = 'tpu-ubuntu2204-base'

# Flags that mean the user already chose how scripts/train.py initialises
# multi-host JAX.
_DISTRIBUTED_FLAGS = ('--distributed', '--nodistributed',
                      '--coordinator_address')


class LauncherError(Exception):
  """A usage error, reported as one line without a traceback."""


class GcloudError(Exception):
  """A gcloud call that exited with a non-zero code."""

  def __init__(self, command: Sequence[str], returncode: int, stderr: str):
    super().__init__(f'gcloud failed with exit code {returncode}')
    self.command = list(command)
    self.returncode = returncode
    self.stderr = stderr


@dataclasses.dataclass(frozen=True)
class Slice:
  """Names a TPU VM slice (a pod slice or a single TPU VM)."""
  tpu: str
  zone: str
  project: Optional[str] = None

  def flags(self) -> list[str]:
    """The --zone (and --project) flags every gcloud call takes."""
    flags = [f'--zone={self.zone}']
    if self.project:
      flags.append(f'--project={self.project}')
    return flags


def default_version(accelerator_type: str) -> str:
  """The TPU software version for an accelerator type such as 'v4-32'."""
  family = accelerator_type.split('-')[0].lower()
  return _VERSIONS.get(family, DEFAULT_VERSION)


def ssh_command(tpu: Slice, script: str, worker: str = 'all') -> list[str]:
  """`gcloud compute tpus tpu-vm ssh` running `script` on `worker`."""
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', tpu.tpu,
          *tpu.flags(), f'--worker={worker}', f'--command={script}']


def create_commands(tpu: Slice, accelerator_type: str,
                    version: Optional[str] = None, *, queued: bool = False,
                    spot: bool = False, guaranteed: bool = False,
                    reserved: bool = False,
                    valid_until_duration: Optional[str] = None
                    ) -> list[list[str]]:
  """The gcloud call that creates the slice.

  Args:
    tpu: the slice; a queued resource gets the same name as its node.
    accelerator_type: e.g. 'v4-32' (4 hosts), 'v5litepod-16', 'v4-8' (1).
    version: TPU software version; None picks one by accelerator family.
    queued: create a queued resource instead of the TPU VM directly.
    spot: spot VMs (preemptible at any time; not restartable).
    guaranteed: queued only: the guaranteed tier.
    reserved: use reserved capacity.
    valid_until_duration: queued only: give up if not provisioned by then
      (e.g. '6h').

  Returns:
    One command.

  Raises:
    LauncherError: for a conflicting or queued-only choice.
  """
  if sum([spot, guaranteed, reserved]) > 1:
    raise LauncherError('choose at most one of --spot, --guaranteed and '
                        '--reserved')
  if not queued and (guaranteed or valid_until_duration):
    raise LauncherError('--guaranteed and --valid_until_duration need '
                        '--queued (a queued resource)')
  version = version or default_version(accelerator_type)
  if queued:
    command = ['gcloud', 'compute', 'tpus', 'queued-resources', 'create',
               tpu.tpu, *tpu.flags(), f'--node-id={tpu.tpu}',
               f'--accelerator-type={accelerator_type}',
               f'--runtime-version={version}']
    if valid_until_duration:
      command.append(f'--valid-until-duration={valid_until_duration}')
  else:
    command = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', tpu.tpu,
               *tpu.flags(), f'--accelerator-type={accelerator_type}',
               f'--version={version}']
  for flag, on in (('--spot', spot), ('--guaranteed', guaranteed),
                   ('--reserved', reserved)):
    if on:
      command.append(flag)
  return [command]


def _script(*statements: str) -> str:
  """One shell line from complete statements (dry runs print one per line)."""
  line = ''
  for statement in statements:
    line += statement + (' ' if statement.endswith('&') else '; ')
  return line.rstrip('; ')


# Worker shell variable for ~/perceiver_jax_logs, set first in every script.
_LOGS = f'L="$HOME/{LOG_DIR}"'


def _no_run_going(what: str) -> str:
  """A statement that exits 1 while a detached run is alive on the worker."""
  return ('if [ -f "$L/run.pid" ] && kill -0 -- -"$(cat "$L/run.pid")" '
          '2>/dev/null; then echo "tpu_pod: a run is going on $(hostname) '
          f'(process group $(cat "$L/run.pid")); stop it before {what}." >&2; '
          'exit 1; fi')


def install_script(remote_dir: str = REMOTE_DIR,
                   python: str = DEFAULT_PYTHON,
                   system_python: bool = False) -> str:
  """Worker shell line: unpack the tarball, make the venv, pip install."""
  d = shlex.quote(remote_dir)
  if system_python:
    steps = ["python3 -m pip install -q -e '.[tpu]'"]
  else:
    steps = ['if [ ! -x .venv/bin/python ]; then '
             'python3 -m pip install -q --user uv; '
             f'"$HOME/.local/bin/uv" venv -q --seed --python '
             f'{shlex.quote(python)} .venv; fi',
             ".venv/bin/python -m pip install -q -e '.[tpu]'"]
  return _script('set -e', _LOGS, _no_run_going('setup'),
                 'echo "tpu_pod: installing on $(hostname)"',
                 f'mkdir -p {d}', f'tar -xzf {REMOTE_TARBALL} -C {d}',
                 f'rm -f {REMOTE_TARBALL}', f'cd {d}', *steps,
                 'echo "tpu_pod: installed on $(hostname)"')


def setup_commands(tpu: Slice, tarball: str, remote_dir: str = REMOTE_DIR,
                   python: str = DEFAULT_PYTHON,
                   system_python: bool = False) -> list[list[str]]:
  """Copies `tarball` to every worker, then installs it there."""
  scp = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', tarball,
         f'{tpu.tpu}:{REMOTE_TARBALL}', *tpu.flags(), '--worker=all']
  return [scp, ssh_command(tpu, install_script(remote_dir, python,
                                               system_python))]


def _is_multihost_script(token: str) -> bool:
  """scripts/train.py or scripts/evaluate.py, by path, entry point or
  module name."""
  return any(token in (f'scripts/{name}.py', f'perceiver-{name}',
                       f'scripts.{name}') or
             token.endswith(f'/scripts/{name}.py')
             for name in ('train', 'evaluate'))


def needs_distributed(tokens: Sequence[str]) -> bool:
  """Whether `tokens` run scripts/train.py or scripts/evaluate.py with no
  distributed flag."""
  if not any(_is_multihost_script(t) for t in tokens):
    return False
  return not any(t == f or t.startswith(f + '=') for t in tokens
                 for f in _DISTRIBUTED_FLAGS)


def command_string(command: Sequence[str],
                   add_distributed: bool = True) -> str:
  """The shell command to run on the workers.

  Args:
    command: the words after `--`; a single word is taken as a shell command
      line as it is (so `&&`, pipes and variables work), several are quoted.
    add_distributed: add --distributed after scripts/train.py (or
      evaluate.py) when the command sets no distributed flag of its own.

  Returns:
    The command line.

  Raises:
    LauncherError: if `command` is empty.
  """
  if not command or not ''.join(command).strip():
    raise LauncherError('run needs the command to run after --, e.g. '
                        '`run --tpu=NAME --zone=ZONE -- python '
                        'scripts/train.py --config=configs/imagenet.py`')
  if len(command) > 1:
    tokens = list(command)
    if add_distributed and needs_distributed(tokens):
      i = next(i for i, t in enumerate(tokens) if _is_multihost_script(t))
      tokens.insert(i + 1, '--distributed')
    return shlex.join(tokens)
  line = command[0]
  try:
    tokens = shlex.split(line)
  except ValueError:  # Unbalanced quotes: leave the line to the shell.
    tokens = []
  if add_distributed and needs_distributed(tokens):
    line = re.sub(r'(^|\s)(\S*scripts/(?:train|evaluate)\.py|'
                  r'perceiver-(?:train|evaluate))(?=\s|$)',
                  r'\1\2 --distributed', line, count=1)
  return line


def launch_script(command: str, remote_dir: str = REMOTE_DIR) -> str:
  """Worker shell line: start `command` detached, logging to run.log.

  The command runs in its own session (setsid) so `stop` can signal its
  whole process group; its shells wait for it on SIGTERM (`trap :`; the
  command itself gets the default handler back), then log its exit code to
  run.log and run.exit.
  """
  d = shlex.quote(remote_dir)
  command = command.strip().rstrip(';').strip()
  inner = _script(_LOGS, f'cd {d} || exit 1',
                  '[ -d .venv/bin ] && export PATH="$PWD/.venv/bin:$PATH"',
                  # A subshell, so an `exit` in the command is logged too.
                  'trap : TERM', f'(trap : TERM; {command} )', 'code=$?',
                  'echo "=== $(date -u +%FT%TZ) exit code $code"',
                  'echo $code > "$L/run.exit"')
  return _script(
      _LOGS,
      f'[ -d {d} ] || {{ echo "tpu_pod: no ~/{remote_dir} on $(hostname): '
      'run setup first." >&2; exit 1; }',
      'mkdir -p "$L"', _no_run_going('starting another'), 'rm -f "$L/run.exit"',
      'echo "=== $(date -u +%FT%TZ) $(hostname): "'
      f'{shlex.quote(command)} >> "$L/run.log"',
      f'setsid nohup bash -c {shlex.quote(inner)} >> "$L/run.log" 2>&1 '
      '< /dev/null &',
      'echo $! > "$L/run.pid"', 'sleep 2',
      'if [ -f "$L/run.exit" ] && [ "$(cat "$L/run.exit")" != 0 ]; then '
      'echo "tpu_pod: the command failed at once on $(hostname):" >&2; '
      'tail -n 20 "$L/run.log" >&2; exit 1; fi',
      'echo "tpu_pod: started on $(hostname), process group $!, log '
      f'~/{LOG_DIR}/run.log"')


def run_commands(tpu: Slice, command: Sequence[str],
                 remote_dir: str = REMOTE_DIR,
                 add_distributed: bool = True) -> list[list[str]]:
  """Starts `command` detached on every worker."""
  line = command_string(command, add_distributed)
  return [ssh_command(tpu, launch_script(line, remote_dir))]


def logs_commands(tpu: Slice, worker: str = 'all', lines: int = 100,
                  follow: bool = False) -> list[list[str]]:
  """Tails run.log on `worker` ('all' prefixes lines with the host name)."""
  tail = f'tail -n {int(lines)}{" -F" if follow else ""} "$L/run.log"'
  if worker == 'all':
    tail += ' | sed -u "s/^/[$(hostname)] /"'
  script = _script(_LOGS, f'if [ -f "$L/run.log" ]; then {tail}; else echo '
                   f'"[$(hostname)] no log yet: ~/{LOG_DIR}/run.log"; fi')
  return [ssh_command(tpu, script, worker)]


def stop_script(timeout: int = 300, force: bool = False) -> str:
  """Worker shell line: signal the run's process group, wait for it."""
  signal = 'KILL' if force else 'TERM'
  return _script(
      _LOGS,
      'if [ ! -f "$L/run.pid" ] || ! kill -0 -- -"$(cat "$L/run.pid")" '
      '2>/dev/null; then echo "tpu_pod: no run going on $(hostname)"; '
      'exit 0; fi',
      'pg=$(cat "$L/run.pid")', f'kill -{signal} -- -"$pg"',
      f'echo "tpu_pod: SIG{signal} sent to process group $pg on $(hostname)"',
      f'for i in $(seq {int(timeout)}); do kill -0 -- -"$pg" 2>/dev/null || '
      '{ echo "tpu_pod: stopped on $(hostname): $(tail -n 1 "$L/run.log")"; '
      'exit 0; }; sleep 1; done',
      f'echo "tpu_pod: still running on $(hostname) after {int(timeout)} s; '
      'stop --force sends SIGKILL." >&2',
      'exit 1')


def stop_commands(tpu: Slice, timeout: int = 300,
                  force: bool = False) -> list[list[str]]:
  """Stops the detached run on every worker (SIGTERM: it checkpoints)."""
  return [ssh_command(tpu, stop_script(timeout, force))]


def delete_commands(tpu: Slice, queued: bool = False,
                    yes: bool = False) -> list[list[str]]:
  """Deletes the TPU VM, or the queued resource with its node."""
  if queued:
    command = ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete',
               tpu.tpu, *tpu.flags(), '--force']
  else:
    command = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', tpu.tpu,
               *tpu.flags()]
  if yes:
    command.append('--quiet')
  return [command]


def project_files(root: str) -> list[str]:
  """Files of the working tree at `root` that git does not ignore."""
  try:
    out = subprocess.run(
        ['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
        cwd=root, check=True, capture_output=True).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    raise LauncherError(f'cannot list the files of {root} with git ({e}); '
                        'setup copies a git checkout') from e
  names = [n for n in out.decode().split('\0') if n]
  # Deleted but not yet committed files are still listed: skip them.
  return sorted(n for n in names if os.path.isfile(os.path.join(root, n)))


def make_tarball(root: str, path: str) -> int:
  """Writes the working tree's files into the .tar.gz `path`; their count."""
  names = project_files(root)
  with tarfile.open(path, 'w:gz') as tar:
    for name in names:
      tar.add(os.path.join(root, name), arcname=name, recursive=False)
  return len(names)


def tarball_path(tpu: Slice) -> str:
  """Where `setup` packs the tree here (fixed, so dry runs print it)."""
  return os.path.join(tempfile.gettempdir(), f'perceiver_jax-{tpu.tpu}.tar.gz')


def run_gcloud(command: Sequence[str]) -> None:
  """Runs one gcloud command, its stderr shown live and kept for errors.

  Raises:
    GcloudError: if it exits with a non-zero code.
  """
  proc = subprocess.Popen(list(command), stderr=subprocess.PIPE)
  chunks = []
  while data := os.read(proc.stderr.fileno(), 4096):
    chunks.append(data)
    sys.stderr.write(data.decode(errors='replace'))  # Prompts included.
    sys.stderr.flush()
  proc.stderr.close()
  if returncode := proc.wait():
    raise GcloudError(command, returncode, b''.join(chunks).decode(
        errors='replace'))


def _parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--tpu', required=True,
                      help='Name of the TPU VM (or queued resource).')
  common.add_argument('--zone', required=True, help='e.g. us-central2-b.')
  common.add_argument('--project', help='Google Cloud project (default: '
                      "gcloud's configured one).")
  common.add_argument('--dry_run', action='store_true',
                      help='Print the gcloud commands instead of running them.')
  remote = argparse.ArgumentParser(add_help=False)
  remote.add_argument('--remote_dir', default=REMOTE_DIR,
                      help='Project directory on the workers, relative to '
                      'their home directory.')
  install = argparse.ArgumentParser(add_help=False)
  install.add_argument('--python', default=DEFAULT_PYTHON,
                       help='Python version of the workers\' venv (uv).')
  install.add_argument('--system_python', action='store_true',
                       help="pip install into the image's python3 (>= 3.11) "
                       'instead of a venv.')

  parser = argparse.ArgumentParser(
      prog='tpu_pod.py', description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='subcommand', required=True)

  p = sub.add_parser('create', parents=[common], help='Create the slice.')
  p.add_argument('--accelerator_type', required=True,
                 help='e.g. v4-32 (a 4-host pod slice) or v4-8 (one VM).')
  p.add_argument('--version', help='TPU software version (default: '
                 f'{DEFAULT_VERSION} for v4 and older, else the v2-alpha '
                 'image of the family).')
  p.add_argument('--queued', action='store_true',
                 help='Create a queued resource (waits for capacity).')
  p.add_argument('--spot', action='store_true', help='Spot VMs.')
  p.add_argument('--guaranteed', action='store_true',
                 help='Queued only: the guaranteed tier.')
  p.add_argument('--reserved', action='store_true',
                 help='Use reserved capacity.')
  p.add_argument('--valid_until_duration',
                 help='Queued only: give up after this long (e.g. 6h).')

  sub.add_parser('setup', parents=[common, remote, install],
                 help='Copy the working tree to every worker; pip install.')

  p = sub.add_parser(
      'run', parents=[common, remote, install],
      help='Start `-- COMMAND` detached on every worker.',
      usage='tpu_pod.py run --tpu=NAME --zone=ZONE [options] -- COMMAND...',
      description='Copies and installs the project (unless --no_setup), then '
      'starts COMMAND, the words after --, on every worker; a single word is '
      'a shell command line.')
  p.add_argument('--no_setup', action='store_true',
                 help='Do not copy and install the project first.')
  p.add_argument('--no_add_distributed', action='store_true',
                 help='Do not add --distributed to scripts/train.py.')

  p = sub.add_parser('logs', parents=[common], help='Tail the run logs.')
  p.add_argument('--worker', default='all', help="A worker index or 'all'.")
  p.add_argument('--lines', type=int, default=100)
  p.add_argument('--follow', action='store_true', help='Keep following.')

  p = sub.add_parser('stop', parents=[common],
                     help='SIGTERM the run on every worker (it checkpoints).')
  p.add_argument('--timeout', type=int, default=300,
                 help='Seconds to wait for it to save and exit.')
  p.add_argument('--force', action='store_true', help='SIGKILL instead.')

  p = sub.add_parser('delete', parents=[common], help='Delete the slice.')
  p.add_argument('--queued', action='store_true',
                 help='Delete the queued resource (and its node).')
  p.add_argument('--yes', action='store_true', help='Do not ask to confirm.')
  return parser


def build_commands(args: argparse.Namespace,
                   command: Sequence[str] = ()) -> list[list[str]]:
  """The gcloud commands for parsed arguments (the `run` command apart)."""
  tpu = Slice(args.tpu, args.zone, args.project)
  if args.subcommand == 'create':
    return create_commands(
        tpu, args.accelerator_type, args.version, queued=args.queued,
        spot=args.spot, guaranteed=args.guaranteed, reserved=args.reserved,
        valid_until_duration=args.valid_until_duration)
  if args.subcommand in ('setup', 'run'):
    commands = []
    if args.subcommand == 'run':
      commands = run_commands(tpu, command, args.remote_dir,
                              not args.no_add_distributed)
      if args.no_setup:
        return commands
    return setup_commands(tpu, tarball_path(tpu), args.remote_dir,
                          args.python, args.system_python) + commands
  if args.subcommand == 'logs':
    return logs_commands(tpu, args.worker, args.lines, args.follow)
  if args.subcommand == 'stop':
    return stop_commands(tpu, args.timeout, args.force)
  return delete_commands(tpu, args.queued, args.yes)


def main(argv: Sequence[str]) -> int:
  """Runs the launcher on `argv` (without the program name); exit code."""
  argv = list(argv)
  command = []
  if '--' in argv:
    i = argv.index('--')
    argv, command = argv[:i], argv[i + 1:]
  args = _parser().parse_args(argv)
  try:
    if command and args.subcommand != 'run':
      raise LauncherError(f'{args.subcommand} takes no command after --')
    commands = build_commands(args, command)
    if args.dry_run:
      for c in commands:
        print(shlex.join(c))
      return 0
    if shutil.which('gcloud') is None:
      raise LauncherError(
          'gcloud is not on PATH: install the Google Cloud SDK '
          f'({SDK_URL}), then run `gcloud auth login`.')
    tarball = tarball_path(Slice(args.tpu, args.zone, args.project))
    try:
      if any(tarball in c for c in commands):
        n = make_tarball(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))), tarball)
        print(f'tpu_pod: packed {n} files into {tarball}', file=sys.stderr)
      for c in commands:
        run_gcloud(c)
    finally:
      if os.path.exists(tarball):
        os.remove(tarball)
  except LauncherError as e:
    print(f'tpu_pod: error: {e}', file=sys.stderr)
    return 1
  except GcloudError as e:
    tail = '\n'.join(e.stderr.strip().splitlines()[-20:])
    print(f'tpu_pod: error: gcloud failed with exit code {e.returncode}:\n'
          f'  {shlex.join(e.command)[:500]}\n{tail}', file=sys.stderr)
    return e.returncode
  except KeyboardInterrupt:
    return 130
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
