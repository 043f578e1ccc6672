"""P1's Tables 1, 2, 6 and 7 as runs of this project, and their reports.

A table lists rows (models) and columns (what is measured). Each row names,
per data scale ('digits' or 'imagenet'), the config string and overrides of
the training run behind each of its columns; a row without a setting at a
scale is left out there. A column reads the top-1 of one training variant of
the row ('plain' or 'permuted') on one split ('eval': the config's eval split,
'train': the training split, evaluated as the eval split is).

One run = one row variant x one seed: `seed=K` (and `debug` on request) is
appended to the config's presets. It trains and evaluates in its own process
(`scripts/paper_table.py --worker=SPEC`: configs + jaxline +
experiments.evaluate_checkpoint, as scripts/train.py and scripts/evaluate.py
do), which isolates memory and XLA flags and keeps JAX out of the driver.
Runs with the same config, overrides and seed are one run, shared by every
table that lists them (the digits Perceiver is a row of all four tables).

Paper numbers are P1 (arXiv 2103.03206 v2) ImageNet top-1 %; the digits
scale is a miniature (configs/digits.py), so only directions compare. Of
P1's Tab. 6 (cross-attend count and placement) and Tab. 7 (weight sharing)
only the rows whose numbers the project's paper notes give are included:
1 cross-attend at start (76.7) and 8 interleaved (78.0); no sharing (72.9
valid / 87.7 train) and shared (78.0 / 79.5). Tab. 6's rows in between
(other counts and placements) were not found, so they are left out. The
digits Perceiver interleaves 2 cross-attends with 2 runs of a shared 2-block
latent Transformer: its "all interleaved" is those 2, and its "1 at start"
is one cross-attend followed by the same num_blocks=2 runs.
"""

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

# The repository root: configs/ and scripts/ are found from here.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
DATA = ('digits', 'imagenet')
EXPERIMENT_PREFIX = '--config.experiment_kwargs.config.'
DATA_DIR_FIELD = EXPERIMENT_PREFIX + 'data.data_dir'


@dataclasses.dataclass(frozen=True)
class Setting:
  """One training: 'configs/x.py[:presets]' and overrides ('a.b=v' of the
  experiment section, or full '--config.x=v' flags)."""
  config: str
  overrides: tuple[str, ...] = ()

  def flags(self) -> list[str]:
    return [o if o.startswith('--config.') else EXPERIMENT_PREFIX + o
            for o in self.overrides]


@dataclasses.dataclass(frozen=True)
class Column:
  name: str
  variant: str = 'plain'  # Which training of the row.
  split: str = 'eval'     # 'eval' (the config's) or 'train'.


@dataclasses.dataclass(frozen=True)
class Row:
  id: str
  label: str
  paper: tuple[Optional[float], ...]  # One per column of the table.
  settings: dict[str, dict[str, Setting]]  # data -> variant -> Setting.


@dataclasses.dataclass(frozen=True)
class Table:
  number: int
  title: str
  columns: tuple[Column, ...]
  rows: tuple[Row, ...]


def _both(digits: Optional[str], imagenet: Optional[str], *overrides: str):
  """{'plain': ...} settings at both scales (None: no such config)."""
  out = {}
  for data, config in (('digits', digits), ('imagenet', imagenet)):
    if config:
      out[data] = {'plain': Setting(config, overrides)}
  return out


def _permuted(digits: tuple[str, str], imagenet: tuple[Optional[str], str]):
  """Plain and permuted settings per scale (plain None: not configured)."""
  out = {}
  for data, (plain, permuted) in (('digits', digits), ('imagenet', imagenet)):
    out[data] = {'plain': Setting(plain)} if plain else {}
    out[data]['permuted'] = Setting(permuted)
  return out


_D, _I, _P = 'configs/digits.py', 'configs/imagenet.py', (
    'configs/imagenet_permuted.py')
_UNSHARED = ('model.encoder.share_cross_attends=False',
             'model.encoder.share_latent_transformer=False')

TABLES = {t.number: t for t in (
    Table(1, 'ImageNet top-1', (Column('top-1'),), (
        Row('resnet', 'ResNet-50', (77.6,),
            _both(f'{_D}:baseline=resnet', f'{_I}:baseline=resnet50')),
        Row('vit', 'ViT-B-16', (77.9,),
            _both(f'{_D}:baseline=vit', f'{_I}:baseline=vit_b16')),
        Row('resnet_ff', 'ResNet-50 (FF)', (73.5,),
            _both(f'{_D}:baseline=resnet_ff', f'{_I}:baseline=resnet50_ff')),
        Row('vit_ff', 'ViT-B-16 (FF)', (76.7,),
            _both(f'{_D}:baseline=vit_ff', f'{_I}:baseline=vit_b16_ff')),
        Row('transformer_ff', 'Transformer (64x64) (FF)', (57.0,),
            _both(f'{_D}:baseline=transformer_ff',
                  f'{_I}:baseline=transformer_64_ff')),
        Row('perceiver_ff', 'Perceiver (FF)', (78.0,), _both(_D, _I)),
    )),
    Table(2, 'Permuted ImageNet top-1',
          (Column('ImageNet'), Column('permuted', 'permuted')), (
              Row('resnet_ff', 'ResNet-50 (FF)', (73.5, 39.4), _permuted(
                  (f'{_D}:baseline=resnet_ff',
                   f'{_D}:baseline=resnet_ff,permuted'),
                  (f'{_I}:baseline=resnet50_ff',
                   f'{_P}:baseline=resnet50_ff'))),
              Row('vit_ff', 'ViT-B-16 (FF)', (76.7, 61.7), _permuted(
                  (f'{_D}:baseline=vit_ff', f'{_D}:baseline=vit_ff,permuted'),
                  (f'{_I}:baseline=vit_b16_ff', f'{_P}:baseline=vit_b16_ff'))),
              Row('transformer_ff', 'Transformer (64x64) (FF)', (57.0, 57.0),
                  _permuted((f'{_D}:baseline=transformer_ff',
                             f'{_D}:baseline=transformer_ff,permuted'),
                            (f'{_I}:baseline=transformer_64_ff',
                             f'{_P}:baseline=transformer_64_ff'))),
              Row('perceiver_ff', 'Perceiver (FF)', (78.0, 78.0), _permuted(
                  (_D, f'{_D}:permuted'), (_I, f'{_P}:pos=fourier'))),
              # No unpermuted learned-position config on ImageNet (P1 gives
              # the same 70.9: the encoding is learned per position anyway).
              Row('perceiver_learned', 'Perceiver (learned pos)',
                  (70.9, 70.9), _permuted(
                      (f'{_D}:pos=learned', f'{_D}:pos=learned,permuted'),
                      (None, f'{_P}:pos=learned'))),
          )),
    Table(6, 'Cross-attend count and placement (ImageNet top-1)',
          (Column('top-1'),), (
              Row('cross_1_start', '1 cross-attend at start', (76.7,), {
                  'digits': {'plain': Setting(_D, (
                      'model.encoder.num_cross_attends=1',
                      'model.encoder.num_blocks=2'))},
                  'imagenet': {'plain': Setting(f'{_I}:one_cross')}}),
              Row('cross_interleaved', 'All interleaved (P1: 8)', (78.0,),
                  _both(_D, _I)),
          )),
    Table(7, 'Weight sharing (ImageNet top-1)',
          (Column('valid'), Column('train', split='train')), (
              Row('unshared', 'No weight sharing', (72.9, 87.7), {
                  'digits': {'plain': Setting(_D, _UNSHARED)},
                  'imagenet': {'plain': Setting(f'{_I}:unshared')}}),
              Row('shared', 'Shared (P1)', (78.0, 79.5), _both(_D, _I)),
          )),
)}


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run (row variant x seed) and the splits it is read on."""
  row: str
  variant: str
  seed: int
  config: str              # With ',seed=K[,debug]' appended.
  overrides: tuple[str, ...]  # Full '--config.x=v' flags.
  splits: tuple[str, ...]  # 'eval' and/or 'train'.

  @property
  def name(self) -> str:
    return self.row if self.variant == 'plain' else f'{self.row}_{self.variant}'

  @property
  def key(self) -> str:
    """What makes two runs the same run (shared across tables)."""
    return ' '.join((self.config,) + self.overrides)


def get_table(number: Any) -> Table:
  try:
    return TABLES[int(number)]
  except (KeyError, TypeError, ValueError):
    raise ValueError(f'Unknown table {number!r}; P1 tables here: '
                     f'{sorted(TABLES)}.') from None


def check_data(data: str) -> str:
  if data not in DATA:
    raise ValueError(f'Unknown data {data!r}; expected one of {DATA}.')
  return data


def with_presets(config: str, *presets: str) -> str:
  path, _, arg = config.partition(':')
  return f'{path}:' + ','.join([p for p in arg.split(',') if p] +
                               list(presets))


def run_specs(table: Table, data: str, *, seeds: int = 3, debug: bool = False,
              rows: Optional[Sequence[str]] = None,
              extra_overrides: Sequence[str] = ()) -> list[RunSpec]:
  """The runs of `table` at scale `data`, row by row, seed by seed."""
  check_data(data)
  if seeds < 1:
    raise ValueError(f'seeds must be >= 1, got {seeds}.')
  known = [r.id for r in table.rows]
  unknown = sorted(set(rows or ()) - set(known))
  if unknown:
    raise ValueError(f'Unknown rows {unknown} for table {table.number}; its '
                     f'rows: {known}.')
  specs = []
  for row in table.rows:
    if rows and row.id not in rows:
      continue
    for variant, setting in row.settings.get(data, {}).items():
      splits = tuple(dict.fromkeys(c.split for c in table.columns
                                   if c.variant == variant))
      for seed in range(seeds):
        presets = [f'seed={seed}'] + (['debug'] if debug else [])
        specs.append(RunSpec(
            row.id, variant, seed, with_presets(setting.config, *presets),
            tuple(setting.flags()) + tuple(extra_overrides), splits))
  return specs


def load_config(config: str, overrides: Sequence[str] = ()):
  """The locked ConfigDict of 'configs/x.py:arg' + '--config.x=v' overrides,
  parsed by ml_collections' config flag exactly as scripts/train.py does."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  path, sep, arg = config.partition(':')
  if not os.path.isabs(path):
    path = os.path.join(ROOT, path)
  argv = ['paper_table', f'--config={path}{sep}{arg}', *overrides]
  values = flags.FlagValues()
  # Override flags are derived from the argv given here, not sys.argv.
  config_flags.DEFINE_config_file('config', flag_values=values,
                                  sys_argv=argv)
  try:
    values(argv)
  except flags.IllegalFlagValueError as e:
    # absl wraps the config's own error in a traceback: keep its last line.
    lines = [l for l in str(e).splitlines() if l.strip()]
    raise ValueError(lines[-1] if lines else str(e)) from e
  return values['config'].value


def check_configs(specs: Sequence[RunSpec]) -> None:
  """Loads each distinct config; ValueError naming the row if one fails."""
  for spec in {s.key: s for s in specs}.values():
    try:
      load_config(spec.config, spec.overrides)
    except Exception as e:  # pylint: disable=broad-except
      why = (f'the config has no field {e}' if isinstance(
          e, (AttributeError, KeyError)) else f'{type(e).__name__}: {e}')
      raise ValueError(
          f'Row {spec.row!r} ({spec.variant}): config {spec.config!r} '
          f'with overrides {list(spec.overrides)} does not load: '
          f'{why}') from e


def check_imagenet_data(specs: Sequence[RunSpec]) -> None:
  """FileNotFoundError when a local tfds data_dir lacks imagenet2012."""
  for spec in {s.key: s for s in specs}.values():
    data = load_config(spec.config, spec.overrides).experiment_kwargs.config
    if data.data.name != 'imagenet':
      continue
    data_dir = data.data.data_dir or os.environ.get(
        'TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets'))
    if '://' in data_dir:
      continue  # Remote: the loader reports what is missing.
    if not os.path.isdir(os.path.join(data_dir, 'imagenet2012')):
      raise FileNotFoundError(
          f'No imagenet2012 under data_dir={data_dir!r} (row {spec.row!r}): '
          'pass --data_dir=/path/to/tfds to scripts/paper_table.py (it sets '
          f'{DATA_DIR_FIELD[2:]}); see perceiver_jax/data/imagenet.py for '
          'how to prepare it.')


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; 0 for one value)."""
  if not values:
    raise ValueError('mean_std of no values.')
  mean = sum(values) / len(values)
  if len(values) == 1:
    return mean, 0.0
  var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
  return mean, math.sqrt(var)


def aggregate(table: Table, data: str, records: Sequence[dict]) -> dict:
  """{row id: {column name: {mean, std, n, paper}}} over the seeds found.

  `records` are results.json runs; a record serves a column when its row,
  variant and split match (top_1 or train_top_1, in %).
  """
  out = {}
  for row in table.rows:
    if data not in row.settings:
      continue
    cells = {}
    for column, paper in zip(table.columns, row.paper):
      field = 'top_1' if column.split == 'eval' else 'train_top_1'
      values = [r[field] for r in records
                if r['row'] == row.id and r['variant'] == column.variant and
                field in r]
      cell = {'paper': paper, 'n': len(values)}
      if values:
        cell['mean'], cell['std'] = mean_std(values)
      cells[column.name] = cell
    out[row.id] = cells
  return out


def model_sizes(records: Sequence[dict]) -> dict[str, dict[str, int]]:
  """{row id: {variant: parameter count}} of the records that have one.

  Seeds do not change a model's size; a permutation does not either, but a
  row's variants are kept apart so that a difference would show.
  """
  sizes = {}
  for record in records:
    if record.get('params') is not None:
      sizes.setdefault(record['row'], {})[record['variant']] = record[
          'params']
  return sizes


def format_params(count: int) -> str:
  """12345 -> '12.3K', 25557032 -> '25.56M' (as P1 and model_summary)."""
  if count >= 1e6:
    return f'{count / 1e6:.2f}M'
  if count >= 1e3:
    return f'{count / 1e3:.1f}K'
  return str(count)


def _cell(cell: dict) -> str:
  if not cell.get('n'):
    return 'n/a'
  if cell['n'] == 1:
    return f'{cell["mean"]:.1f}'
  return f'{cell["mean"]:.1f} ± {cell["std"]:.1f} ({cell["n"]})'


def render_markdown(table: Table, data: str, aggregates: dict, *,
                    specs: Sequence[RunSpec] = (), seeds: int = 0,
                    debug: bool = False, command: str = '',
                    commit: str = '',
                    sizes: Optional[dict[str, dict[str, int]]] = None) -> str:
  """A markdown table: for each column the paper's number, then ours.

  `sizes` ({row id: {variant: parameter count}}, `model_sizes`) adds a
  column of our models' parameter counts (one number when a row's variants
  agree).
  """
  sizes = {row: counts for row, counts in (sizes or {}).items() if counts}
  head = ['model'] + ['params (ours)'] * bool(sizes) + [
      f'{w} {c.name}' for c in table.columns for w in ('paper', 'ours')]
  lines = [f'# P1 Table {table.number}: {table.title} — {data}', '',
           '| ' + ' | '.join(head) + ' |',
           '|' + '---|' * len(head)]
  for row in table.rows:
    if row.id not in aggregates:
      continue
    cells = [row.label]
    if sizes:
      counts = sizes.get(row.id, {})
      cells.append(' / '.join(dict.fromkeys(
          format_params(counts[v]) for v in counts)) or 'n/a')
    for column, paper in zip(table.columns, row.paper):
      cells += ['—' if paper is None else f'{paper:.1f}',
                _cell(aggregates[row.id][column.name])]
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += ['', f'Top-1 % (mean ± sample std over seeds, number of seeds); '
            f'paper: P1 (arXiv 2103.03206 v2) on ImageNet.'
            + (' Ours on digits: 8x8 images, models scaled down, so only the '
               'directions compare.' if data == 'digits' else '')]
  if sizes:
    lines.append('params (ours): parameter count of our model of the row '
                 '(perceiver_jax/analysis/summary.py); the architectures: '
                 + ('configs/digits.py.' if data == 'digits' else
                    'configs/imagenet.py.'))
  if debug:
    lines.append('**debug preset: smoke-test numbers, not results.**')
  if seeds:
    lines.append(f'Seeds per run: {seeds}.')
  if specs:
    lines += ['', 'Runs (K: the seed):']
    for spec in {(s.name, s.key): s for s in specs if s.seed == 0}.values():
      config = spec.config.replace('seed=0', 'seed=K')
      lines.append(f'- `{spec.name}`: `{config}`' + ''.join(
          f' `{o}`' for o in spec.overrides))
  if command:
    lines += ['', f'Command: `{command}`']
  if commit:
    lines.append(f'Commit: {commit}')
  return '\n'.join(lines) + '\n'


def write_chart(table: Table, data: str, aggregates: dict, path: str) -> None:
  """Bars of ours (mean, std error bars) beside the paper's, per column.

  Raises:
    ImportError: matplotlib is missing (setup.py installs it).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  rows = [r for r in table.rows if r.id in aggregates]
  width = 0.8 / (2 * len(table.columns))
  fig, ax = pyplot.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
  for j, column in enumerate(table.columns):
    cells = [aggregates[r.id][column.name] for r in rows]
    x = [i + (2 * j - len(table.columns)) * width + width / 2
         for i in range(len(rows))]
    ax.bar(x, [c['paper'] or 0 for c in cells], width, fill=False,
           hatch='//', label=f'paper {column.name}')
    ax.bar([v + width for v in x], [c.get('mean', 0) for c in cells], width,
           yerr=[c.get('std', 0) for c in cells], capsize=3,
           label=f'ours {column.name}')
  ax.set_xticks(range(len(rows)), [r.label for r in rows], rotation=20,
                ha='right')
  ax.set_ylabel('top-1 %')
  ax.set_ylim(0, 100)
  ax.set_title(f'P1 Table {table.number} ({data}; paper: ImageNet)')
  ax.legend(fontsize='small', ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  pyplot.close(fig)


def read_json(path: str, default: Any) -> Any:
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def write_json(path: str, value: Any) -> None:
  """Atomically (a crash never leaves half a results file)."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or '.', suffix='.tmp')
  with os.fdopen(fd, 'w') as f:
    json.dump(value, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def commit_hash() -> str:
  """HEAD of the repository ('+dirty' with local changes), or ''."""
  try:
    head = subprocess.run(['git', '-C', ROOT, 'rev-parse', 'HEAD'],
                          capture_output=True, text=True, check=True,
                          timeout=10).stdout.strip()
    dirty = subprocess.run(['git', '-C', ROOT, 'diff', '--quiet', 'HEAD'],
                           capture_output=True, timeout=10).returncode
    return head + ('+dirty' if dirty else '')
  except (OSError, subprocess.SubprocessError):
    return ''


# Running a table.

SCRIPT = os.path.join(ROOT, 'scripts', 'paper_table.py')
RESULTS = 'results.json'


def checkpoint_dir(spec: RunSpec, root: str, canonical: bool) -> str:
  """root/<run name>/seed<K>; other variants (debug, extra overrides) get a
  digest of their config so they never resume each other's checkpoints."""
  leaf = f'seed{spec.seed}'
  if not canonical:
    leaf += '-' + hashlib.sha1(spec.key.encode()).hexdigest()[:8]
  return os.path.join(root, spec.name, leaf)


def launch_worker(job: dict, log_path: str) -> dict:
  """Runs one job in `scripts/paper_table.py --worker` (its own process);
  returns its result. RuntimeError with the log's tail if it fails."""
  spec_path = log_path[:-len('.log')] + '.job.json'
  write_json(spec_path, job)
  if os.path.exists(job['result']):
    os.remove(job['result'])  # A stale result must not pass for this run's.
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      [ROOT] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
  with open(log_path, 'w') as log:
    code = subprocess.run([sys.executable, SCRIPT, f'--worker={spec_path}'],
                          cwd=ROOT, env=env, stdout=log,
                          stderr=subprocess.STDOUT).returncode
  if code:
    with open(log_path) as f:
      tail = ''.join(f.readlines()[-25:])
    raise RuntimeError(
        f'Row {job["row"]!r}: the run of {job["config"]!r} '
        f'{job["overrides"]} failed (exit {code}; rerun the same command to '
        f'resume); log {log_path}:\n{tail}')
  return read_json(job['result'], None)


def _find(records: Sequence[dict], spec: RunSpec, checkpoint: str,
          source: str) -> Optional[dict]:
  for record in records:
    if (record['key'] == spec.key and record['source'] == source and
        (source == 'trained' or record['checkpoint'] == checkpoint) and
        ('train' not in spec.splits or 'train_top_1' in record)):
      return record
  return None


def run_table(table: Table, data: str, out: str, *, seeds: int = 3,
              debug: bool = False, rows: Optional[Sequence[str]] = None,
              checkpoints: Optional[str] = None,
              extra_overrides: Sequence[str] = (), command: str = '',
              launch=launch_worker, log=print) -> dict:
  """Trains (or, with `checkpoints`, only evaluates) every run of `table`;
  writes out/results.json, table<N>_<data>.md and .png; returns aggregates.

  Runs already in out/results.json are skipped (resumable); an interrupted
  run resumes from its checkpoint under out/checkpoints.
  """
  specs = run_specs(table, data, seeds=seeds, debug=debug, rows=rows,
                    extra_overrides=extra_overrides)
  if not specs:
    raise ValueError(f'Table {table.number} has no rows at scale {data!r}'
                     + (f' among {list(rows)}' if rows else '') + '.')
  check_configs(specs)
  check_imagenet_data(specs)
  canonical = not debug and not extra_overrides
  source = 'trained' if checkpoints is None else 'checkpoints'
  ckpt_root = checkpoints or os.path.join(out, 'checkpoints')
  paths = {s: checkpoint_dir(s, ckpt_root, canonical or bool(checkpoints))
           for s in specs}
  if checkpoints:
    missing = [f'{p} (row {s.row!r}, seed {s.seed})' for s, p in paths.items()
               if '://' not in p and not os.path.isdir(p)]
    if missing:
      raise FileNotFoundError('Missing checkpoints (expected DIR/<run>/'
                              'seed<K>):\n  ' + '\n  '.join(missing))
  os.makedirs(os.path.join(out, 'logs'), exist_ok=True)
  results_path = os.path.join(out, RESULTS)
  results = read_json(results_path, {'runs': [], 'tables': {}})
  if not checkpoints:
    # A run trained for another table (or row) lends its checkpoint, e.g.
    # when Table 7 needs the train split of a run Table 2 trained.
    for spec in specs:
      for record in results['runs']:
        if record['key'] == spec.key and record['source'] == source:
          paths[spec] = record['checkpoint']
  commit = commit_hash()
  todo = [s for s in specs
          if not _find(results['runs'], s, paths[s], source)]
  if len(todo) < len(specs):
    log(f'{len(specs) - len(todo)} of {len(specs)} runs already in '
        f'{results_path}: skipped.')
  spent = []
  for i, spec in enumerate(todo):
    start = time.time()
    stem = os.path.join(out, 'logs', spec.name + '_' +
                        os.path.basename(paths[spec].rstrip('/')))
    job = dict(row=spec.row, config=spec.config,
               overrides=list(spec.overrides), checkpoint=paths[spec],
               train=checkpoints is None, splits=list(spec.splits),
               result=stem + '.out.json')
    log(f'[{i + 1}/{len(todo)}] {spec.name} seed {spec.seed}: '
        f'{"training" if job["train"] else "evaluating"} {spec.config} '
        f'(log {stem}.log)')
    result = launch(job, stem + '.log')
    seconds = time.time() - start
    spent.append(seconds)
    record = dict(
        key=spec.key, run=spec.name, row=spec.row, variant=spec.variant,
        seed=spec.seed, config=spec.config, overrides=list(spec.overrides),
        checkpoint=paths[spec], source=source, step=result['step'],
        metrics=result['metrics'], seconds=round(seconds, 1), commit=commit,
        top_1=100 * result['metrics']['eval']['top_1_acc'])
    if result.get('params') is not None:
      record['params'] = result['params']
    if 'train' in result['metrics']:
      record['train_top_1'] = 100 * result['metrics']['train']['top_1_acc']
    results['runs'] = [r for r in results['runs']
                       if not (r['key'] == spec.key and r['source'] == source
                               and r['checkpoint'] == paths[spec])] + [record]
    write_json(results_path, results)
    left = len(todo) - i - 1
    eta = time.strftime('%H:%M:%S', time.gmtime(left * sum(spent) /
                                                len(spent)))
    log(f'[{i + 1}/{len(todo)}] {spec.name} seed {spec.seed}: '
        f'{result["step"]} steps, top-1 {record["top_1"]:.1f}%'
        + (f' (train {record["train_top_1"]:.1f}%)'
           if 'train_top_1' in record else '')
        + f', {seconds:.0f} s; {left} runs left, ETA {eta}')
  found = [dict(_find(results['runs'], s, paths[s], source), row=s.row,
                variant=s.variant) for s in specs]
  chosen = {s.row for s in specs}
  aggregates = {row: cells for row, cells in
                aggregate(table, data, found).items() if row in chosen}
  sizes = model_sizes(found)
  name = f'table{table.number}_{data}'
  results['tables'][name + ('_debug' if debug else '')] = dict(
      seeds=seeds, debug=debug, source=source, commit=commit,
      runs=[s.key for s in specs], aggregates=aggregates, params=sizes)
  write_json(results_path, results)
  with open(os.path.join(out, name + '.md'), 'w') as f:
    f.write(render_markdown(table, data, aggregates, specs=specs, seeds=seeds,
                            debug=debug, command=command, commit=commit,
                            sizes=sizes))
  try:
    write_chart(table, data, aggregates, os.path.join(out, name + '.png'))
  except ImportError:
    log('No chart: matplotlib is not installed (pip install matplotlib).')
  log(f'Wrote {results_path}, {name}.md in {out}.')
  return aggregates


# The worker (one run, in its own process).


def worker_main(job_path: str) -> None:
  """Trains job['config'] into job['checkpoint'] (resuming; no-op when done)
  unless job['train'] is false, then evaluates each of job['splits'];
  writes {'step', 'metrics': {split: metrics}, 'params': parameter count}
  to job['result']."""
  # pylint: disable=g-import-not-at-top
  from perceiver_jax.training import jaxline_compat
  jaxline = jaxline_compat.import_jaxline()
  import experiments
  from perceiver_jax.analysis import summary
  from perceiver_jax.training import checkpointing
  from perceiver_jax.training import preemption
  # pylint: enable=g-import-not-at-top
  job = read_json(job_path, None)
  config = load_config(job['config'], job['overrides'])
  config.checkpoint_dir = job['checkpoint']
  if job['train']:
    experiment_class = experiments.get_experiment_class(
        config.experiment_kwargs.config.experiment)
    preemption.install_signal_handlers()
    checkpointer = checkpointing.make_checkpointer(config, 'train')
    try:
      jaxline.train.train(experiment_class, config, checkpointer, writer=None)
    finally:
      checkpointer.close()
    if preemption.stop_requested():
      sys.exit(143)
  eval_split = config.experiment_kwargs.config.data.eval_split
  train_split = config.experiment_kwargs.config.data.train_split
  metrics, step = {}, None
  for split in job['splits']:
    result = experiments.evaluate_checkpoint(
        config, job['checkpoint'], eval_split if split == 'eval'
        else train_split)
    step = result.pop('step')
    metrics[split] = result
  params = summary.summarize(config.experiment_kwargs.config)['params']
  write_json(job['result'], {'step': step, 'metrics': metrics,
                             'params': params})
