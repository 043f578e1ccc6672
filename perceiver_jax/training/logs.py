"""What the entry points print: the project's own lines, not library INFO.

By default a run prints its progress (step, loss, steps/sec, ETA), its
evaluation results and warnings; the INFO chatter of orbax, jaxline, absl,
JAX and TensorFlow (hundreds of lines a run) is hidden. absl's verbosity
flag brings it back: `--verbosity=0` (`-v 0`) shows every INFO line, `1`
adds DEBUG. An entry point calls `quiet_native_logs()` before TensorFlow or
JAX load and `configure()` once its flags are parsed; library modules log
their user-facing lines through `get_logger(__name__)`.
"""

import contextlib
import importlib.util
import logging
import os
import re
import sys
import tempfile
from typing import Iterator, Optional, Sequence

from absl import flags
from absl import logging as absl_logging

# Parent of the project's loggers: its INFO shows when library INFO does not.
PROJECT_LOGGER = 'perceiver_jax'

# absl's verbosity flag as written on a command line: -v, --v, -verbosity,
# --verbosity, with '=VALUE' or VALUE as the next argument.
_VERBOSITY_ARG = re.compile(r'--?(?:v|verbosity)(?:=(.*))?')

# A C++ INFO line of absl or glog ('I0000 00:00:1796284576.411473   31129
# port.cc:153] ...'), and absl's notice that logging is not initialised yet.
_NATIVE_INFO = re.compile(
    rb'I\d{4} [\d:.]+ +\d+ \S+:\d+\] |WARNING: All log messages before '
    rb'absl::InitializeLog\(\) is called are written to STDERR')


class _ProjectFormatter(logging.Formatter):
  """'HH:MM:SS message'; the level is named only for warnings and worse."""

  def format(self, record: logging.LogRecord) -> str:
    level = f' {record.levelname}' if record.levelno > logging.INFO else ''
    return f'{self.formatTime(record, "%H:%M:%S")}{level} ' + (
        super().format(record))


_HANDLER = logging.StreamHandler(sys.stderr)
_HANDLER.setFormatter(_ProjectFormatter())


def get_logger(name: str) -> logging.Logger:
  """The project logger for module `name` (under PROJECT_LOGGER).

  Lines logged through it at INFO show in a default run, unlike
  `absl.logging.info`, which is reserved for detail seen with --verbosity.
  """
  if name != PROJECT_LOGGER and not name.startswith(PROJECT_LOGGER + '.'):
    name = f'{PROJECT_LOGGER}.{name}'
  return logging.getLogger(name)


def verbosity_from_argv(argv: Sequence[str]) -> Optional[int]:
  """The absl --verbosity (-v) given in `argv`, or None if there is none.

  For use before absl parses the flags (see `quiet_native_logs`); the last
  occurrence wins, as it does for absl.
  """
  value = None
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg == '--':
      break
    match = _VERBOSITY_ARG.fullmatch(arg)
    if not match:
      continue
    text = match.group(1)
    if text is None:
      text = args[i + 1] if i + 1 < len(args) else ''
    try:
      value = int(text)
    except ValueError:
      pass  # absl rejects it with a clear message when it parses the flags.
  return value


def quiet_native_logs(argv: Optional[Sequence[str]] = None, *,
                      load_tensorflow: bool = False) -> None:
  """Hides TensorFlow's C++ INFO lines unless --verbosity >= 0.

  TensorFlow reads TF_CPP_MIN_LOG_LEVEL once, when it loads, so this runs
  before its first import, hence before absl parses the flags: `argv`
  (default sys.argv) is scanned for the flag. A TF_CPP_MIN_LOG_LEVEL already
  set is left as it is; C++ warnings still show (level 1 hides INFO only).
  XLA reads the same variable, which `import jax` sets to 1 unless it is
  set: TF_CPP_MIN_LOG_LEVEL=0 shows XLA's C++ INFO as well.

  TensorFlow 2.21 writes some INFO as it loads whatever that level says
  ("oneDNN custom operations are on", before absl's InitializeLog), so
  `load_tensorflow` imports it here, dropping those lines from stderr. Only
  for entry points that load it anyway: it takes seconds.

  Args:
    argv: the command line, program name first.
    load_tensorflow: import TensorFlow now (if installed), quietly.
  """
  verbosity = verbosity_from_argv(sys.argv if argv is None else argv)
  if verbosity is not None and verbosity >= 0:
    return
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  if load_tensorflow and importlib.util.find_spec('tensorflow') is not None:
    with _native_info_dropped():
      importlib.import_module('tensorflow')


@contextlib.contextmanager
def fd_redirected(fd: int, target: int) -> Iterator[None]:
  """Points file descriptor `fd` at `target` within, where native code
  (C++ logging, gloo) writes past Python's sys.stdout/sys.stderr."""
  for stream in (sys.stdout, sys.stderr):
    stream.flush()
  saved = os.dup(fd)
  os.dup2(target, fd)
  try:
    yield
  finally:
    for stream in (sys.stdout, sys.stderr):
      stream.flush()
    os.dup2(saved, fd)
    os.close(saved)


@contextlib.contextmanager
def _native_info_dropped() -> Iterator[None]:
  """Drops C++ INFO lines written to stderr (fd 2) within; keeps the rest.

  The rest (warnings, errors, Python tracebacks) is written back on exit,
  also when the body raises.
  """
  with tempfile.TemporaryFile() as captured:
    try:
      with fd_redirected(2, captured.fileno()):
        yield
    finally:
      captured.seek(0)
      for line in captured:
        if not _NATIVE_INFO.match(line):
          os.write(2, line)


def configure(verbose: Optional[bool] = None) -> None:
  """Sets Python logging up for an entry point; call after flags are parsed.

  Quiet (the default): the root logger, hence absl, orbax, jaxline, JAX and
  TensorFlow, logs warnings and worse only; the project's loggers log INFO
  too, as bare 'HH:MM:SS message' lines on stderr. Verbose: the root logger
  keeps absl's verbosity and the project's lines go through absl's handler
  like every other (one format, absl's prefix).

  Args:
    verbose: whether library INFO shows; None: whether absl's --verbosity
      was given on the command line.
  """
  if verbose is None:
    verbose = bool(flags.FLAGS['verbosity'].present)
  project = logging.getLogger(PROJECT_LOGGER)
  if verbose:
    project.removeHandler(_HANDLER)
    project.setLevel(logging.NOTSET)
    project.propagate = True
    return
  absl_logging.set_verbosity(absl_logging.WARNING)
  project.setLevel(logging.INFO)
  if _HANDLER not in project.handlers:
    project.addHandler(_HANDLER)
  project.propagate = False


def progress_interval(log_every_steps: int, run_steps: int) -> int:
  """Steps between progress lines: log_every_steps, or fewer so that a run
  of `run_steps` prints at least one line per tenth of it (a 20-step run
  prints every 2 steps, not never). 0 (no progress lines) stays 0."""
  if log_every_steps <= 0:
    return 0
  return max(1, min(log_every_steps, run_steps // 10))


def format_duration(seconds: float) -> str:
  """'HH:MM:SS', with a day count in front past 24 hours ('2d 03:04:05')."""
  seconds = max(0, int(round(seconds)))
  days, seconds = divmod(seconds, 86400)
  hours, seconds = divmod(seconds, 3600)
  minutes, seconds = divmod(seconds, 60)
  clock = f'{hours:02d}:{minutes:02d}:{seconds:02d}'
  return f'{days}d {clock}' if days else clock
