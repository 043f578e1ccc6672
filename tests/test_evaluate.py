"""scripts/evaluate.py never exits 0 with a non-finite loss (issue 27), and
reports a damaged checkpoint in one line."""

# pylint: disable=protected-access

import os
import subprocess
import sys

import experiments
import jax
import numpy as np
import pytest

from perceiver_jax.training import checkpoint_integrity
from perceiver_jax.training import checkpointing
from perceiver_jax.training import parallel
from scripts import evaluate
from tests import helpers
from tests.experiments import test_classification


def test_a_checkpoint_error_is_one_line_on_stderr_and_exit_1(monkeypatch,
                                                            capsys):
  def damaged(config, checkpoint, split):
    del config, split
    raise checkpoint_integrity.CheckpointError(
        f'Checkpoint {checkpoint}/latest/7 is damaged (checksum mismatch in '
        f'params/w).\nEvaluate {checkpoint}/latest/6 instead.')

  monkeypatch.setattr(experiments, 'evaluate_checkpoint', damaged)
  assert evaluate.report(None, '/ckpt') == 1
  captured = capsys.readouterr()
  assert captured.out == ''  # No metrics line for a pipeline to take.
  assert captured.err == (
      'evaluate.py: Checkpoint /ckpt/latest/7 is damaged (checksum mismatch '
      'in params/w). Evaluate /ckpt/latest/6 instead.\n')
  # --verbosity (any level) asks for the traceback: the error propagates.
  with pytest.raises(checkpoint_integrity.CheckpointError, match='latest/7'):
    evaluate.report(None, '/ckpt', verbose=True)


def test_a_diverged_checkpoint_exits_1_naming_its_step(tmp_path):
  config = test_classification._config(tmp_path, steps=1)
  experiment = test_classification._fresh_experiment(
      config.experiment_kwargs.config)
  # Finite but huge weights, as a diverging run leaves them: the logits
  # overflow, so the loss is not finite although every stored value is.
  experiment._params = parallel.replicate(jax.tree.map(
      lambda x: np.full_like(x, 1e30),
      parallel.unreplicate(experiment._params)))
  checkpointer = checkpointing.make_checkpointer(config, 'train')
  state = checkpointer.get_experiment_state('latest')
  state.global_step = 7
  state.experiment_module = experiment
  checkpointer.save('latest')
  checkpointer.wait_for_checkpointing_to_finish()

  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  out = subprocess.run(
      [sys.executable, os.path.join(helpers.ROOT, 'scripts', 'evaluate.py'),
       '--config=' + os.path.join(helpers.ROOT, 'configs', 'digits.py') +
       ':debug', f'--checkpoint={tmp_path}'],
      env=env, cwd=helpers.ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 1, out.stderr[-3000:]
  assert out.stdout == ''  # No metrics line for a pipeline to take.
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(
      f'evaluate.py: checkpoint step 7 of {tmp_path} gives non-finite '), last
  assert 'loss=nan' in last or 'loss=inf' in last, last
