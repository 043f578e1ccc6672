"""scripts/paper_table.py: table definitions, aggregation, reports, resuming."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from perceiver_jax.analysis import paper_table
from perceiver_jax.analysis import summary
from tests import helpers
from tests import test_configs

# Presets and fields the baselines task adds to configs/ (issue 25, item 2).
# Until then a row using one must fail with the config's own error naming it;
# once it lands the row loads and this list can shrink.
_PENDING_PRESETS = ('baseline', 'pos')
_PENDING_FIELDS = ()


def _all_specs(debug):
  for table in paper_table.TABLES.values():
    for data in paper_table.DATA:
      yield from paper_table.run_specs(table, data, seeds=1, debug=debug)


def test_tables_are_well_formed():
  assert sorted(paper_table.TABLES) == [1, 2, 6, 7]
  for table in paper_table.TABLES.values():
    ids = [r.id for r in table.rows]
    assert len(ids) == len(set(ids)), table.number
    variants = {c.variant for c in table.columns}
    for row in table.rows:
      assert len(row.paper) == len(table.columns), row.id
      assert set(row.settings) <= set(paper_table.DATA), row.id
      for data, settings in row.settings.items():
        assert set(settings) <= variants, (row.id, data)
        for setting in settings.values():
          path = setting.config.partition(':')[0]
          assert os.path.isfile(os.path.join(helpers.ROOT, path)), path
  # The paper numbers of P1 (PAPER_REFERENCE.md), spot-checked.
  table2 = {r.id: r.paper for r in paper_table.TABLES[2].rows}
  assert table2['resnet_ff'] == (73.5, 39.4)
  assert table2['vit_ff'] == (76.7, 61.7)
  assert {r.id: r.paper for r in paper_table.TABLES[7].rows} == {
      'unshared': (72.9, 87.7), 'shared': (78.0, 79.5)}


@pytest.mark.parametrize('debug', [False, True])
def test_every_row_config_loads_or_fails_only_on_a_pending_preset(debug):
  loaded, pending = set(), set()
  for spec in {s.key: s for s in _all_specs(debug)}.values():
    try:
      config = paper_table.load_config(spec.config, spec.overrides)
    except ValueError as e:
      name = re.search(r"Unknown config option '(\w+)'", str(e))
      assert name and name.group(1) in _PENDING_PRESETS, (spec, e)
      pending.add(spec.config)
      continue
    except Exception as e:  # pylint: disable=broad-except
      # A locked config rejects a field it does not have yet.
      assert any(f in str(e) for f in _PENDING_FIELDS), (spec, e)
      pending.add(spec.config)
      continue
    assert config.is_locked
    assert config.random_seed == spec.seed
    loaded.add(spec.config)
  # The Perceiver rows exist today, at both scales.
  presets = ['seed=0'] + (['debug'] if debug else [])
  for config in ('configs/digits.py', 'configs/digits.py:permuted',
                 'configs/imagenet.py', 'configs/imagenet.py:one_cross',
                 'configs/imagenet_permuted.py:pos=learned'):
    assert paper_table.with_presets(config, *presets) in loaded
  print(f'{len(loaded)} configs load; awaiting presets: {sorted(pending)}')


def test_overrides_reach_the_config():
  spec, = paper_table.run_specs(paper_table.TABLES[7], 'digits', seeds=1,
                                rows=['unshared'],
                                extra_overrides=['--config.training_steps=7'])
  config = paper_table.load_config(spec.config, spec.overrides)
  encoder = config.experiment_kwargs.config.model.encoder
  assert not encoder.share_cross_attends
  assert not encoder.share_latent_transformer
  assert config.training_steps == 7
  assert config.experiment_kwargs.config.training.total_steps == 7


def test_run_specs_seeds_variants_and_splits():
  specs = paper_table.run_specs(paper_table.TABLES[2], 'digits', seeds=3,
                                rows=['perceiver_ff'], debug=True)
  assert [(s.name, s.seed) for s in specs] == [
      ('perceiver_ff', 0), ('perceiver_ff', 1), ('perceiver_ff', 2),
      ('perceiver_ff_permuted', 0), ('perceiver_ff_permuted', 1),
      ('perceiver_ff_permuted', 2)]
  assert specs[4].config == 'configs/digits.py:permuted,seed=1,debug'
  assert {s.splits for s in specs} == {('eval',)}
  shared, = paper_table.run_specs(paper_table.TABLES[7], 'imagenet', seeds=1,
                                  rows=['shared'])
  assert shared.config == 'configs/imagenet.py:seed=0'
  assert shared.splits == ('eval', 'train')


@pytest.mark.parametrize('call, match', [
    (lambda: paper_table.get_table(5), r'Unknown table 5.*\[1, 2, 6, 7\]'),
    (lambda: paper_table.check_data('cifar'), "Unknown data 'cifar'"),
    (lambda: paper_table.run_specs(paper_table.TABLES[1], 'digits',
                                   rows=['perceiver']),
     r"Unknown rows \['perceiver'\]"),
    (lambda: paper_table.run_specs(paper_table.TABLES[1], 'digits', seeds=0),
     'seeds must be >= 1'),
])
def test_clear_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_a_config_that_does_not_load_names_its_row():
  bad = paper_table.RunSpec('mine', 'plain', 0,
                            'configs/digits.py:no_such,seed=0', (), ('eval',))
  with pytest.raises(ValueError, match=r"Row 'mine' \(plain\): config "
                     r"'configs/digits.py:no_such,seed=0'.*Unknown config"):
    paper_table.check_configs([bad])


def test_missing_imagenet_points_to_data_dir(tmp_path):
  specs = paper_table.run_specs(
      paper_table.TABLES[6], 'imagenet', seeds=1, rows=['cross_1_start'],
      extra_overrides=[f'{paper_table.DATA_DIR_FIELD}={tmp_path}'])
  with pytest.raises(FileNotFoundError, match=r'No imagenet2012 under '
                     r".*--data_dir=.*data\.data_dir"):
    paper_table.check_imagenet_data(specs)


def test_mean_std_is_the_sample_std():
  values = [71.0, 75.5, 78.25, 80.0]
  mean, std = paper_table.mean_std(values)
  assert mean == pytest.approx(np.mean(values))
  assert std == pytest.approx(np.std(values, ddof=1))
  assert paper_table.mean_std([3.0]) == (3.0, 0.0)
  with pytest.raises(ValueError):
    paper_table.mean_std([])


def _record(row, variant, top_1, train=None):
  record = {'row': row, 'variant': variant, 'top_1': top_1}
  if train is not None:
    record['train_top_1'] = train
  return record


def test_aggregate_and_markdown_put_the_paper_beside_ours():
  table = paper_table.TABLES[2]
  records = [_record('perceiver_ff', 'plain', v) for v in (96.0, 97.0, 98.0)]
  records += [_record('perceiver_ff', 'permuted', 95.0)]
  aggregates = paper_table.aggregate(table, 'digits', records)
  cell = aggregates['perceiver_ff']['ImageNet']
  assert (cell['mean'], cell['std'], cell['n'], cell['paper']) == (
      97.0, 1.0, 3, 78.0)
  assert aggregates['resnet_ff']['permuted'] == {'paper': 39.4, 'n': 0}
  text = paper_table.render_markdown(table, 'digits', aggregates, seeds=3)
  assert ('| model | paper ImageNet | ours ImageNet | paper permuted | '
          'ours permuted |') in text
  assert '| Perceiver (FF) | 78.0 | 97.0 ± 1.0 (3) | 78.0 | 95.0 |' in text
  assert '| ResNet-50 (FF) | 73.5 | n/a | 39.4 | n/a |' in text
  # Table 7 reads train top-1 from the same runs.
  aggregates = paper_table.aggregate(paper_table.TABLES[7], 'digits',
                                     [_record('shared', 'plain', 90.0, 99.0)])
  assert aggregates['shared']['train']['mean'] == 99.0
  # Rows with no setting at a scale are left out.
  only_imagenet = paper_table.Table(1, 't', (paper_table.Column('top-1'),), (
      paper_table.Row('x', 'X', (1.0,), {'imagenet': {
          'plain': paper_table.Setting('configs/imagenet.py')}}),))
  assert not paper_table.aggregate(only_imagenet, 'digits', [])


def test_markdown_states_model_sizes():
  records = [dict(_record('resnet_ff', variant, 90.0), params=params)
             for variant, params in (('plain', 53_210), ('permuted', 53_210))]
  records += [_record('vit_ff', 'plain', 99.0),
              dict(_record('perceiver_ff', 'plain', 98.0), params=1_234_567),
              dict(_record('perceiver_ff', 'permuted', 98.0), params=999)]
  sizes = paper_table.model_sizes(records)
  assert sizes == {'resnet_ff': {'plain': 53_210, 'permuted': 53_210},
                   'perceiver_ff': {'plain': 1_234_567, 'permuted': 999}}
  table = paper_table.TABLES[2]
  text = paper_table.render_markdown(
      table, 'digits', paper_table.aggregate(table, 'digits', records),
      sizes=sizes)
  assert '| model | params (ours) | paper ImageNet |' in text
  # One number when the variants agree; both when they differ.
  assert '| ResNet-50 (FF) | 53.2K | 73.5 | 90.0 |' in text
  assert '| Perceiver (FF) | 1.23M / 999 | 78.0 |' in text
  assert '| ViT-B-16 (FF) | n/a | 76.7 | 99.0 |' in text
  assert 'configs/digits.py.' in text


class _FakeLaunch:
  """Stands in for the worker process: top-1 from the seed, no training."""

  def __init__(self):
    self.jobs = []

  def __call__(self, job, log_path):
    self.jobs.append(job)
    seed = int(re.search(r'seed=(\d)', job['config']).group(1))
    metrics = {split: {'top_1_acc': 0.5 + 0.1 * seed} for split in
               job['splits']}
    return {'step': 3, 'metrics': metrics, 'params': 4321}


def test_run_table_writes_reports_and_resumes(tmp_path):
  lines = []
  launch = _FakeLaunch()
  run = lambda **kw: paper_table.run_table(  # pylint: disable=g-long-lambda
      paper_table.TABLES[7], 'digits', str(tmp_path), seeds=2, debug=True,
      launch=launch, log=lines.append, **kw)
  aggregates = run()
  assert len(launch.jobs) == 4 and all(j['train'] for j in launch.jobs)
  assert aggregates['shared']['valid']['mean'] == pytest.approx(55.0)
  assert aggregates['shared']['train']['std'] == pytest.approx(
      np.std([50, 60], ddof=1))
  results = json.loads((tmp_path / 'results.json').read_text())
  assert len(results['runs']) == 4
  run0 = results['runs'][0]
  assert run0['config'] == 'configs/digits.py:seed=0,debug'
  assert run0['overrides'][0].endswith('share_cross_attends=False')
  assert run0['top_1'] == 50.0 and run0['train_top_1'] == 50.0
  assert 'seconds' in run0 and 'commit' in run0
  assert results['tables']['table7_digits_debug']['aggregates'] == aggregates
  assert results['tables']['table7_digits_debug']['params'] == {
      'shared': {'plain': 4321}, 'unshared': {'plain': 4321}}
  assert '| Shared (P1) | 4.3K | 78.0 | 55.0 ± 7.1 (2) |' in (
      tmp_path / 'table7_digits.md').read_text()
  assert any('[4/4] shared seed 1: 3 steps' in l and 'ETA' in l
             for l in lines)
  assert (tmp_path / 'table7_digits.png').read_bytes()[:4] == b'\x89PNG'

  # Same --out: nothing reruns; Table 2's Perceiver reuses the shared run.
  launch.jobs.clear()
  run()
  assert not launch.jobs
  assert any('4 of 4 runs already in' in l and 'skipped' in l
             for l in lines[-3:])
  paper_table.run_table(paper_table.TABLES[2], 'digits', str(tmp_path),
                        seeds=2, debug=True, rows=['perceiver_ff'],
                        launch=launch, log=lines.append)
  assert [j['config'] for j in launch.jobs] == [
      'configs/digits.py:permuted,seed=0,debug',
      'configs/digits.py:permuted,seed=1,debug']


def test_a_run_trained_for_one_table_is_evaluated_for_another(tmp_path):
  launch = _FakeLaunch()
  run = lambda n, row: paper_table.run_table(  # pylint: disable=g-long-lambda
      paper_table.TABLES[n], 'digits', str(tmp_path), seeds=1, debug=True,
      rows=[row], launch=launch, log=lambda line: None)
  run(1, 'perceiver_ff')
  first, = launch.jobs
  assert first['splits'] == ['eval']
  run(7, 'shared')  # Needs the train split of the same run.
  second = launch.jobs[-1]
  assert len(launch.jobs) == 2
  assert second['checkpoint'] == first['checkpoint']
  assert os.sep + 'perceiver_ff' + os.sep in second['checkpoint']
  assert second['splits'] == ['eval', 'train']
  results = json.loads((tmp_path / 'results.json').read_text())
  assert len(results['runs']) == 1 and 'train_top_1' in results['runs'][0]


def test_checkpoints_mode_names_every_missing_checkpoint(tmp_path):
  (tmp_path / 'shared' / 'seed0').mkdir(parents=True)
  with pytest.raises(FileNotFoundError) as info:
    paper_table.run_table(paper_table.TABLES[7], 'digits', str(tmp_path / 'o'),
                          seeds=2, checkpoints=str(tmp_path),
                          launch=_FakeLaunch())
  message = str(info.value)
  for missing in ('unshared/seed0', 'unshared/seed1', 'shared/seed1'):
    assert os.path.join(str(tmp_path), missing) in message
  assert 'shared/seed0 ' not in message.replace('unshared/seed0', '')


@pytest.mark.slow
def test_script_trains_and_evaluates_a_row(tmp_path):
  """End to end: a worker process trains 2 steps and evaluates."""
  out = subprocess.run(
      [sys.executable, os.path.join(helpers.ROOT, 'scripts', 'paper_table.py'),
       '--table=7', '--data=digits', f'--out={tmp_path}', '--seeds=1',
       '--debug', '--steps=2', '--rows=shared'],
      cwd=helpers.ROOT, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  results = json.loads((tmp_path / 'results.json').read_text())
  assert [(r['row'], r['step']) for r in results['runs']] == [('shared', 2)]
  (run,) = results['runs']
  assert run['metrics']['eval']['num_examples'] == 300  # The test split.
  assert run['metrics']['train']['num_examples'] == 1497
  assert 0 <= run['top_1'] <= 100
  # The worker counts the parameters of the row's own config.
  exp = test_configs._load('digits.py', 'debug').experiment_kwargs.config  # pylint: disable=protected-access
  assert run['params'] == summary.summarize(exp)['params']
  assert (f'| Shared (P1) | {paper_table.format_params(run["params"])} | '
          '78.0 |') in (tmp_path / 'table7_digits.md').read_text()
  assert '[1/1] shared seed 0: 2 steps' in out.stdout
  assert (tmp_path / 'table7_digits.png').read_bytes()[:4] == b'\x89PNG'
