"""One process of the two-process test: trains a few steps, saves results
and a checkpoint of step 3 (written by process 0) in OUT_DIR/ckpt.

  python multihost_worker.py PORT NUM_PROCESSES PROCESS_ID OUT_DIR
"""

import os
import sys

os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from perceiver_jax.training import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(port, num_processes, process_id, out_dir):
  process_id = int(process_id)
  parallel.initialize_distributed(f'127.0.0.1:{port}', int(num_processes),
                                  process_id)
  from experiments import classification  # pylint: disable=g-import-not-at-top
  from perceiver_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  from perceiver_jax.training import jaxline_compat  # pylint: disable=g-import-not-at-top
  from tests import test_configs  # pylint: disable=g-import-not-at-top
  utils = jaxline_compat.import_jaxline().utils
  full_config = test_configs._load('digits.py', 'debug')  # pylint: disable=protected-access
  full_config.checkpoint_dir = os.path.join(out_dir, 'ckpt')
  config = full_config.experiment_kwargs.config
  experiment = classification.ClassificationExperiment(
      'train', jax.random.PRNGKey(0), config)
  seen = []
  inner_load = experiment._data.load  # pylint: disable=protected-access

  def recording_load(*args, **kwargs):
    for batch in inner_load(*args, **kwargs):
      seen.append(np.asarray(batch['label']).copy())
      yield batch

  experiment._data = type('Data', (), {'load': staticmethod(recording_load)})  # pylint: disable=protected-access
  rng = utils.bcast_local_devices(jax.random.PRNGKey(process_id))
  for step in range(3):
    global_step = np.full([jax.local_device_count()], step)
    scalars = experiment.step(global_step=global_step, rng=rng)
  params = parallel.unreplicate(experiment._params)  # pylint: disable=protected-access
  leaves = jax.tree.leaves(params)
  # Each host evaluates its half of the 300 test images (the last batch
  # partial); the psum'ed totals must count each image once.
  results = experiment.evaluate(global_step=global_step, rng=None)
  # As jaxline's train() saves: every process calls save, process 0 writes.
  checkpointer = checkpointing.make_checkpointer(full_config, 'train')
  state = checkpointer.get_experiment_state('latest')
  state.global_step = 3
  state.experiment_module = experiment
  state.train_step_rng = utils.bcast_local_devices(
      jax.random.PRNGKey(full_config.random_seed))
  checkpointer.save('latest')
  checkpointer.close()
  np.savez(os.path.join(out_dir, f'process_{process_id}.npz'),
           labels=np.stack(seen[:3]), loss=scalars['loss'],
           devices=jax.device_count(),
           eval_count=results['num_examples'], eval_loss=results['loss'],
           eval_top_1=results['top_1_acc'], *leaves)


if __name__ == '__main__':
  main(*sys.argv[1:])
