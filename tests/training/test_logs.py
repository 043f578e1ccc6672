"""What the entry points print (perceiver_jax/training/logs.py)."""

import io
import json
import logging
import os
import re
import subprocess
import sys
import textwrap

from absl import logging as absl_logging
import pytest

from perceiver_jax.training import logs
from tests import helpers

# An INFO line of a library: absl's Python prefix ('I1203 07:56:20.410404
# 139664442817408 xla_bridge.py:849] ...') or a C++ one ('I0000 00:00:...').
_LIBRARY_INFO = re.compile(r'^I\d{4} ')

_PROJECT_HANDLER = logs._HANDLER  # pylint: disable=protected-access


@pytest.mark.parametrize('argv, expected', [
    (['train.py'], None),
    (['train.py', '--config=c.py', '-v', '0'], 0),
    (['train.py', '-v=1'], 1),
    (['train.py', '--verbosity', '2', '--config=c.py'], 2),
    (['train.py', '--verbosity=-1'], -1),
    (['train.py', '-v', '0', '--v=-1'], -1),  # The last one wins.
    (['train.py', '--verbosity=info'], None),  # absl reports it, not us.
    (['train.py', '--', '-v', '0'], None),  # Not a flag after '--'.
    (['train.py', '--vmodule=x=1', '--v'], None),
])
def test_verbosity_from_argv(argv, expected):
  assert logs.verbosity_from_argv(argv) == expected


def test_get_logger_is_under_the_project_logger():
  assert logs.get_logger('experiments.classification').name == (
      'perceiver_jax.experiments.classification')
  assert logs.get_logger('perceiver_jax.data').name == 'perceiver_jax.data'
  assert logs.get_logger('perceiver_jax').name == 'perceiver_jax'


@pytest.fixture(name='restore_logging')
def _restore_logging():
  """Logging as under absl's app.run (its handler on the root logger), then
  as it was: the process's logging is shared by every test."""
  project = logging.getLogger(logs.PROJECT_LOGGER)
  absl_logger = absl_logging.get_absl_logger()
  saved = (absl_logging.get_verbosity(), absl_logger.level, logging.root.level,
           list(logging.root.handlers), project.level, project.propagate,
           list(project.handlers), _PROJECT_HANDLER.stream)
  absl_logging.use_absl_handler()
  yield
  (verbosity, absl_level, root_level, root_handlers, level, propagate,
   handlers, stream) = saved
  absl_logging.set_verbosity(verbosity)
  absl_logger.setLevel(absl_level)
  logging.root.handlers[:] = root_handlers
  logging.root.setLevel(root_level)
  project.setLevel(level)
  project.propagate = propagate
  project.handlers[:] = handlers
  _PROJECT_HANDLER.setStream(stream)


@pytest.mark.usefixtures('restore_logging')
def test_quiet_shows_project_info_and_library_warnings_only():
  absl_logging.set_verbosity(absl_logging.INFO)
  logs.configure(verbose=False)
  logs.configure(verbose=False)  # Idempotent: one handler, one line each.
  out = io.StringIO()
  _PROJECT_HANDLER.setStream(out)
  logs.get_logger('experiments.test').info('step %d/%d', 5, 10)
  logs.get_logger('experiments.test').warning('stopping')
  assert re.fullmatch(r'\d\d:\d\d:\d\d step 5/10\n'
                      r'\d\d:\d\d:\d\d WARNING stopping\n', out.getvalue())
  for name in ('absl', 'orbax', 'jax', 'tensorflow', 'jaxline'):
    assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
    assert logging.getLogger(name).isEnabledFor(logging.WARNING), name


@pytest.mark.usefixtures('restore_logging')
def test_verbose_leaves_library_info_on():
  absl_logging.set_verbosity(absl_logging.INFO)  # As --verbosity=0 does.
  logs.configure(verbose=True)
  project = logging.getLogger(logs.PROJECT_LOGGER)
  assert project.propagate
  assert _PROJECT_HANDLER not in project.handlers
  assert logging.getLogger('orbax').isEnabledFor(logging.INFO)
  assert logs.get_logger('experiments.test').isEnabledFor(logging.INFO)


# Writes native-style lines straight to fd 2 while TensorFlow would load.
_NATIVE = textwrap.dedent(r"""
    import os, sys
    from perceiver_jax.training import logs
    with logs._native_info_dropped():
      os.write(2, b'WARNING: All log messages before absl::InitializeLog() '
                  b'is called are written to STDERR\n')
      os.write(2, b'I0000 00:00:1796284576.411473   31129 port.cc:153] '
                  b'oneDNN custom operations are on.\n')
      os.write(2, b'W0000 00:00:1796284576.5   31129 gpu.cc:1] no GPU\n')
      print('python warning', file=sys.stderr)
      if sys.argv[1] == 'raise':
        raise RuntimeError('while loading')
""")


@pytest.mark.parametrize('mode', ['ok', 'raise'])
def test_native_info_dropped_keeps_warnings_and_errors(mode):
  out = subprocess.run([sys.executable, '-c', _NATIVE, mode],
                       cwd=helpers.ROOT, capture_output=True, text=True,
                       check=False)
  assert out.returncode == (0 if mode == 'ok' else 1)
  lines = out.stderr.splitlines()
  assert lines[:2] == ['W0000 00:00:1796284576.5   31129 gpu.cc:1] no GPU',
                       'python warning']
  assert ('RuntimeError: while loading' in out.stderr) == (mode == 'raise')
  assert 'oneDNN' not in out.stderr and 'InitializeLog' not in out.stderr


def _script(name, *args):
  """scripts/NAME.py on the digits debug config, 2 CPU devices: its output.

  TF_CPP_MIN_LOG_LEVEL is removed from the environment: the scripts' own
  default is under test.
  """
  env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
  env.update(JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  out = subprocess.run(
      [sys.executable, os.path.join(helpers.ROOT, 'scripts', f'{name}.py'),
       '--config=' + os.path.join(helpers.ROOT, 'configs', 'digits.py') +
       ':debug', *args], cwd=helpers.ROOT, env=env, capture_output=True,
      text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout, out.stderr.splitlines()


def _library_lines(lines):
  return [line for line in lines if _LIBRARY_INFO.match(line) or
          'orbax' in line or '[jaxline]' in line or 'InitializeLog' in line]


@pytest.mark.slow
def test_a_default_run_prints_progress_and_results_only(tmp_path):
  # log_every_steps is 100: a 10-step run still logs every tenth of it.
  _, lines = _script('train', f'--config.checkpoint_dir={tmp_path}',
                     '--config.training_steps=10')
  assert _library_lines(lines) == [], lines
  progress = [line for line in lines if 'ETA' in line]
  assert len(progress) == 9, lines  # Steps 2..10 (step 1 has no rate yet).
  assert re.search(r'step 10/10  loss [\d.]+  steps/sec [\d.]+  '
                   r'TFLOP/s/device [\d.e+-]+  ETA 00:00:00$',
                   progress[-1]), progress

  stdout, lines = _script('evaluate', f'--checkpoint={tmp_path}')
  assert _library_lines(lines) == [], lines
  assert [line for line in lines if 'eval at step 10' in line], lines
  assert json.loads(stdout)['step'] == 10

  stdout, lines = _script('evaluate', f'--checkpoint={tmp_path}', '-v', '0')
  assert len([line for line in lines if _LIBRARY_INFO.match(line)]) >= 5
  assert [line for line in lines if 'orbax' in line], lines
  assert [line for line in lines
          if _LIBRARY_INFO.match(line) and 'eval at step 10' in line], lines
  assert json.loads(stdout)['step'] == 10


@pytest.mark.parametrize('log_every, run_steps, expected', [
    (100, 1000, 100), (100, 20, 2), (5, 10, 1), (100, 5, 1), (7, 1000, 7),
    (0, 20, 0)])
def test_progress_line_at_least_every_tenth_of_a_run(log_every, run_steps,
                                                      expected):
  assert logs.progress_interval(log_every, run_steps) == expected


def test_format_duration():
  assert logs.format_duration(0) == '00:00:00'
  assert logs.format_duration(3725.4) == '01:02:05'
  assert logs.format_duration(2 * 86400 + 3 * 3600 + 4 * 60 + 5) == (
      '2d 03:04:05')
