r"""Reproduces a P1 table at a data scale: trains every row, evaluates, reports.

  python scripts/paper_table.py --table=1|2|6|7 --data=digits|imagenet \
      --out=DIR [--seeds=3] [--rows=perceiver_ff,...] [--debug] \
      [--checkpoints=DIR] [--data_dir=/path/to/tfds] [--steps=N]

Rows and their configs: perceiver_jax/analysis/paper_table.py. Each run
(row x seed) trains and evaluates in its own process; DIR gets results.json
(every run, plus each table's mean ± std), table<N>_<data>.md (the paper's
numbers beside ours), table<N>_<data>.png (a matplotlib chart), checkpoints/
and logs/. Re-running with the same --out skips finished runs.
--checkpoints=DIR only evaluates DIR/<run>/seed<K> (run: the row id, with
'_permuted' for Table 2's permuted column). --debug appends the `debug`
preset (smoke tests); --steps overrides training_steps.
"""

import sys

from absl import app
from absl import flags

from perceiver_jax.analysis import paper_table

_TABLE = flags.DEFINE_string('table', None, 'P1 table: 1, 2, 6 or 7.')
_DATA = flags.DEFINE_string('data', 'digits', 'digits or imagenet.')
_OUT = flags.DEFINE_string('out', None, 'Output directory.')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Seeds per run: 0..N-1.')
_ROWS = flags.DEFINE_list('rows', None, 'Only these row ids.')
_DEBUG = flags.DEFINE_bool('debug', False, 'Append the debug preset.')
_CHECKPOINTS = flags.DEFINE_string(
    'checkpoints', None, 'Only evaluate DIR/<run>/seed<K>.')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, 'tfds data_dir for ImageNet (sets '
    'config.experiment_kwargs.config.data.data_dir).')
_STEPS = flags.DEFINE_integer('steps', None, 'Override training_steps.')
_WORKER = flags.DEFINE_string('worker', None, 'Internal: run one job file.')


def main(argv):
  del argv
  if _WORKER.value:
    # pylint: disable-next=g-import-not-at-top
    from perceiver_jax.training import logs
    logs.quiet_native_logs(load_tensorflow=True)
    logs.configure()
    paper_table.worker_main(_WORKER.value)
    return
  if not _TABLE.value or not _OUT.value:
    raise app.UsageError('--table and --out are required.')
  extra = []
  if _DATA_DIR.value:
    extra.append(f'{paper_table.DATA_DIR_FIELD}={_DATA_DIR.value}')
  if _STEPS.value:
    extra.append(f'--config.training_steps={_STEPS.value}')
  try:
    paper_table.run_table(
        paper_table.get_table(_TABLE.value),
        paper_table.check_data(_DATA.value), _OUT.value, seeds=_SEEDS.value,
        debug=_DEBUG.value, rows=_ROWS.value, checkpoints=_CHECKPOINTS.value,
        extra_overrides=extra, command=' '.join(['python'] + sys.argv),
        log=lambda line: print(line, flush=True))
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    sys.exit(f'paper_table: {e}')


if __name__ == '__main__':
  app.run(main)
