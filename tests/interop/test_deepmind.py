"""DeepMind's released Perceiver IO checkpoints: names, files, import."""

import collections
import functools
import os
import pickle

from configs import imagenet
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiments
from perceiver_jax import models
from perceiver_jax.interop import deepmind
from perceiver_jax.training import checkpointing
from scripts import import_checkpoint

# Exact names of the released Fourier model (deepmind-research
# perceiver/perceiver.py as built by train/experiment.py and the ImageNet
# colab: Haiku's automatic module names), with their p2 shapes.
RELEASED_P2 = {
    ('perceiver_encoder/~/trainable_position_encoding', 'pos_embs'):
        (512, 1024),
    # The cross-attend's query projection: 1024 latents -> 261 input width.
    ('perceiver_encoder/~/cross_attention/attention/linear', 'w'):
        (1024, 261),
    ('perceiver_encoder/~/cross_attention/attention/linear_3', 'w'):
        (261, 1024),
    ('perceiver_encoder/~/cross_attention/layer_norm', 'scale'): (1024,),
    ('perceiver_encoder/~/cross_attention/layer_norm_1', 'scale'): (261,),
    ('perceiver_encoder/~/cross_attention/mlp/linear_1', 'b'): (1024,),
    ('perceiver_encoder/~/self_attention/layer_norm', 'offset'): (1024,),
    ('perceiver_encoder/~/self_attention_5/attention/linear_2', 'w'):
        (1024, 1024),
    ('classification_decoder/~/basic_decoder/~/trainable_position_encoding',
     'pos_embs'): (1, 1024),
    ('classification_decoder/~/basic_decoder/cross_attention/layer_norm_2',
     'offset'): (1024,),
    ('classification_decoder/~/basic_decoder/output', 'w'): (1024, 1000),
    ('classification_decoder/~/basic_decoder/output', 'b'): (1000,),
}
RELEASED_P2_ARRAYS = 136
RELEASED_P2_PARAMS = 48_440_627


def small_config(num_self_attends=3):
  """configs/imagenet.py:p2,debug (16x16 images, 8 x 16 latents) with a
  block of `num_self_attends` self-attends."""
  config = imagenet.get_config('p2,debug')
  with config.unlocked():
    config.experiment_kwargs.config.model.encoder.num_self_attends_per_block = (
        num_self_attends)
  return config


def small_model(num_self_attends=3):
  return small_config(num_self_attends).experiment_kwargs.config.model


def random_params(model_config, seed=0):
  """Every parameter random (LayerNorm scales too), so that swaps show."""
  rng = np.random.default_rng(seed)
  return {module: {name: rng.normal(size=x.shape).astype(x.dtype)
                   for name, x in values.items()}
          for module, values in jax.eval_shape(
              functools.partial(models.make_forward(model_config).init,
                                is_training=False),
              jax.random.key(0), jnp.zeros((1, 16, 16, 3))).items()}


def logits(model_config, params, images):
  forward = models.make_forward(model_config)
  return jax.jit(functools.partial(forward.apply, is_training=False))(
      params, None, images)


def released_tree(model_config, seed=0):
  return deepmind.to_deepmind(random_params(model_config, seed), model_config)


def assert_same_params(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


# Names.


def test_p2_maps_every_released_parameter_by_renaming_alone():
  model = imagenet.get_config('p2').experiment_kwargs.config.model
  shapes = deepmind.parameter_shapes(model)
  table = deepmind.name_table(model)
  released = {theirs: shapes[ours].shape for theirs, ours in table}
  assert len(table) == len(released) == len(shapes) == RELEASED_P2_ARRAYS
  assert {ours for _, ours in table} == set(shapes)
  assert sum(int(np.prod(s)) for s in released.values()) == RELEASED_P2_PARAMS
  for name, shape in RELEASED_P2.items():
    assert released[name] == shape, name
  # The Fourier image preprocessor has no parameters.
  assert not any(module.startswith('image_preprocessor')
                 for module, _ in released)
  # A released-format tree of that size loads (zeros: no real compute).
  tree = {'params': collections.defaultdict(dict), 'state': {}}
  for (module, name), shape in released.items():
    tree['params'][module][name] = np.zeros(shape, np.float32)
  params, state = deepmind.from_deepmind(tree, model)
  assert state == {}
  assert sum(x.size for x in jax.tree.leaves(params)) == RELEASED_P2_PARAMS


def test_table_follows_the_number_of_self_attends():
  names = {module for (module, _), _ in deepmind.name_table(small_model(3))}
  blocks = {m.split('/')[2] for m in names if 'self_attention' in m}
  assert blocks == {'self_attention', 'self_attention_1', 'self_attention_2'}


def test_renamed_parameters_give_the_same_logits():
  model = small_model()
  params = random_params(model)
  back, state = deepmind.from_deepmind(deepmind.to_deepmind(params, model),
                                       model)
  assert state == {}
  assert_same_params(back, params)
  images = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
  np.testing.assert_array_equal(logits(model, back, images),
                                logits(model, params, images))


# The conv and learned-position variants.

_CONV = 'image_preprocessor/~/conv2_d_downsample/~/'
_POS = 'image_preprocessor/~_build_network_inputs/'
# (preset, arrays, parameters, released preprocessor names and shapes,
# released state names and shapes): the released files' preprocessors
# (deepmind-research perceiver/io_processors.py as the ImageNet colab builds
# it; hk.BatchNorm keeps [1, 1, 1, C] statistics and parameters).
RELEASED_VARIANTS = {
    'p2,prep=conv': (139, 48_646_522, {
        (_CONV + 'conv', 'w'): (7, 7, 3, 64),
        (_CONV + 'batchnorm', 'scale'): (1, 1, 1, 64),
        (_CONV + 'batchnorm', 'offset'): (1, 1, 1, 64),
        ('perceiver_encoder/~/cross_attention/layer_norm_1', 'scale'):
            (64 + 258,),
    }, {
        (_CONV + f'batchnorm/~/{ema}', name): shape
        for ema in ('mean_ema', 'var_ema')
        for name, shape in (('counter', ()), ('hidden', (1, 1, 1, 64)),
                            ('average', (1, 1, 1, 64)))
    }),
    'p2,pos=learned': (141, 62_255_848, {
        ('image_preprocessor/~/conv2_d', 'w'): (1, 1, 3, 256),
        ('image_preprocessor/~/conv2_d', 'b'): (256,),
        (_POS + 'trainable_position_encoding', 'pos_embs'): (50_176, 256),
        (_POS + 'position_encoding_projector/linear', 'w'): (256, 256),
        (_POS + 'position_encoding_projector/linear', 'b'): (256,),
        ('perceiver_encoder/~/cross_attention/layer_norm_1', 'scale'):
            (256 + 256,),
    }, {}),
}


@pytest.mark.parametrize('preset', sorted(RELEASED_VARIANTS))
def test_released_variants_map_completely_by_renaming(preset):
  arrays, count, names, state_names = RELEASED_VARIANTS[preset]
  model = imagenet.get_config(preset).experiment_kwargs.config.model
  shapes, state_shapes = deepmind.model_shapes(model)
  table = deepmind.name_table(model)
  released = {theirs: shapes[ours].shape for theirs, ours in table}
  assert len(table) == len(released) == len(shapes) == arrays
  assert {ours for _, ours in table} == set(shapes)
  assert sum(int(np.prod(s)) for s in released.values()) == count
  for name, shape in names.items():
    assert released[name] == shape, name
  state_table = deepmind.state_name_table(model)
  assert {theirs: state_shapes[ours].shape
          for theirs, ours in state_table} == state_names
  assert {ours for _, ours in state_table} == set(state_shapes)
  # A released-format tree of that size loads (zeros: no real compute).
  tree = {'params': collections.defaultdict(dict),
          'state': collections.defaultdict(dict)}
  for part, items in (('params', released.items()),
                      ('state', state_names.items())):
    for (module, name), shape in items:
      dtype = np.int32 if name == 'counter' else np.float32
      tree[part][module][name] = np.zeros(shape, dtype)
  params, state = deepmind.from_deepmind(tree, model)
  assert sum(x.size for x in jax.tree.leaves(params)) == count
  assert {(module, name): np.shape(x) for module, values in state.items()
          for name, x in values.items()} == {
              ours: state_shapes[ours].shape for _, ours in state_table}


def small_variant(preset):
  """`preset` at debug size with a block of 2 self-attends."""
  config = imagenet.get_config(preset + ',debug')
  model = config.experiment_kwargs.config.model
  with model.unlocked():
    model.encoder.num_self_attends_per_block = 2
  return model


def random_variables(model, seed=0):
  """Random params and state (counters too) of a small variant."""
  rng = np.random.default_rng(seed)
  params, state = jax.eval_shape(
      functools.partial(models.make_forward_with_state(model).init,
                        is_training=True),
      jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  draw = lambda x: (rng.integers(1, 9, x.shape).astype(x.dtype)
                    if np.issubdtype(x.dtype, np.integer) else
                    rng.normal(size=x.shape).astype(x.dtype))
  return jax.tree.map(draw, params), jax.tree.map(draw, state)


@pytest.mark.parametrize('preset', sorted(RELEASED_VARIANTS))
def test_small_variant_round_trip_with_state(preset, tmp_path):
  model = small_variant(preset)
  params, state = random_variables(model)
  path = tmp_path / 'model.pystate'
  deepmind.save_checkpoint(path, params, state, model)
  with open(path, 'rb') as f:
    raw = pickle.load(f)
  assert all(module.startswith(('image_preprocessor', 'perceiver_encoder',
                                'classification_decoder'))
             for module in raw['params'])
  if 'conv' in preset:
    assert set(raw['state']) == {_CONV + 'batchnorm/~/mean_ema',
                                 _CONV + 'batchnorm/~/var_ema'}
    assert set(raw['state'][_CONV + 'batchnorm/~/var_ema']) == {
        'counter', 'hidden', 'average'}
  else:
    assert raw['state'] == {}
  loaded, loaded_state = deepmind.load_checkpoint(path, model,
                                                  input_shape=(16, 16, 3))
  assert_same_params(loaded, params)
  assert_same_params(loaded_state, state)
  forward = models.make_forward_with_state(model)
  images = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
  apply = jax.jit(functools.partial(forward.apply, is_training=False))
  got, _ = apply(loaded, loaded_state, None, images)
  want, _ = apply(params, state, None, images)
  np.testing.assert_array_equal(got, want)
  if 'conv' in preset:
    # Evaluation normalises by the moving averages: the state matters.
    other, _ = apply(params, random_variables(model, seed=1)[1], None, images)
    assert not np.allclose(other, want)


def test_fourier_file_into_the_conv_config_lists_names():
  tree = released_tree(small_model(2))
  with pytest.raises(deepmind.CheckpointMismatch) as info:
    deepmind.from_deepmind(tree, small_variant('p2,prep=conv'))
  missing = [m[0] for m in info.value.missing]
  assert _CONV + 'conv/w' in missing
  assert f'state: {_CONV}batchnorm/~/mean_ema/average' in missing
  assert 'mean_ema/average' in str(info.value)


# Files.


def test_save_then_load_round_trip(tmp_path):
  model = small_model()
  params = random_params(model)
  path = tmp_path / 'model.pystate'
  deepmind.save_checkpoint(path, params, {}, model)
  assert os.listdir(tmp_path) == ['model.pystate']  # No temporary left.
  with open(path, 'rb') as f:
    raw = pickle.load(f)
  assert set(raw) == {'params', 'state'} and raw['state'] == {}
  assert ('perceiver_encoder/~/cross_attention/attention/linear' in
          raw['params'])
  loaded, state = deepmind.load_checkpoint(path, model)
  assert state == {}
  assert_same_params(loaded, params)


def _numpy_paths_swapped(data: bytes, old: bytes, new: bytes) -> bytes:
  """A protocol <= 3 pickle as another NumPy major version writes it (its
  GLOBAL opcodes hold 'module\\nname\\n' as text)."""
  return data.replace(b'c' + old, b'c' + new)


@pytest.mark.parametrize('protocol', [2, 3, 4, 5])
def test_reads_pickles_of_numpy_1_and_2_and_every_protocol(tmp_path,
                                                           protocol):
  model = small_model(1)
  tree = released_tree(model)
  # Containers and scalars such files may hold.
  tree = collections.OrderedDict(
      params=collections.OrderedDict(tree['params']), state={})
  data = pickle.dumps(tree, protocol=protocol)
  variants = [data]
  if protocol <= 3:
    variants += [_numpy_paths_swapped(data, b'numpy._core.', b'numpy.core.'),
                 _numpy_paths_swapped(data, b'numpy.core.', b'numpy._core.')]
    assert any(b'cnumpy.core.multiarray\n_reconstruct' in v for v in variants)
    assert any(b'cnumpy._core.multiarray\n_reconstruct' in v
               for v in variants)
  for i, variant in enumerate(variants):
    path = tmp_path / f'{i}.pystate'
    path.write_bytes(variant)
    loaded = deepmind.read_pystate(path)
    assert_same_params(loaded['params'], dict(tree['params']))


def test_numpy_scalars_are_read_as_arrays(tmp_path):
  path = tmp_path / 'scalar.pystate'
  path.write_bytes(pickle.dumps({'params': {'m': {'x': np.float32(2.0)}}}))
  loaded = deepmind.read_pystate(path)
  assert loaded['params']['m']['x'].shape == () and loaded['state'] == {}


# Errors.


def test_missing_extra_and_mis_shaped_names_are_listed():
  model = small_model()
  tree = released_tree(model)
  del tree['params']['perceiver_encoder/~/self_attention_2/mlp/linear']
  tree['params']['perceiver_encoder/~/self_attention_3/layer_norm'] = {
      'scale': np.ones(16, np.float32)}
  tree['params']['classification_decoder/~/basic_decoder/output']['b'] = (
      np.zeros(7, np.float32))
  with pytest.raises(deepmind.CheckpointMismatch) as info:
    deepmind.from_deepmind(tree, model)
  error = info.value
  assert [m[0] for m in error.missing] == [
      'perceiver_encoder/~/self_attention_2/mlp/linear/w',
      'perceiver_encoder/~/self_attention_2/mlp/linear/b']
  assert error.missing[0][1] == (
      'encoder/~/latent_transformer/~/latent_block_2/~/mlp/hidden/w')
  assert error.extra == [
      ('perceiver_encoder/~/self_attention_3/layer_norm/scale', (16,))]
  assert error.mis_shaped == [(
      'classification_decoder/~/basic_decoder/output/b',
      'decoder/~/query_decoder/output/b', 'float32[7]', 'float32[1000]')]
  assert not error.unmapped
  message = str(error)
  for text in ('2 missing', 'self_attention_2/mlp/linear/w -> encoder',
               '[16, 16]', '1 in the checkpoint but not in the model',
               'self_attention_3/layer_norm/scale [16]',
               'output/b -> decoder/~/query_decoder/output/b: float32[7] '
               'vs float32[1000]'):
    assert text in message


def test_wrong_variant_file_lists_its_names():
  """The released conv variant: a conv + BatchNorm preprocessor (with state)
  and 64 + 18 input channels instead of 3 + 18."""
  model = small_model()
  tree = released_tree(model)
  conv = 'image_preprocessor/~/conv2_d_downsample/~/'
  tree['params'][conv + 'conv'] = {'w': np.zeros((7, 7, 3, 64), np.float32)}
  tree['params'][conv + 'batchnorm'] = {
      'scale': np.ones((1, 1, 1, 64), np.float32),
      'offset': np.zeros((1, 1, 1, 64), np.float32)}
  tree['state'] = {conv + 'batchnorm/~/mean_ema': {
      'counter': np.zeros((), np.int32),
      'hidden': np.zeros((1, 1, 1, 64), np.float32),
      'average': np.zeros((1, 1, 1, 64), np.float32)}}
  cross = tree['params']['perceiver_encoder/~/cross_attention/layer_norm_1']
  cross['scale'] = cross['offset'] = np.ones(82, np.float32)
  with pytest.raises(deepmind.CheckpointMismatch) as info:
    deepmind.from_deepmind(tree, model)
  extra = [name for name, _ in info.value.extra]
  assert conv + 'conv/w' in extra and conv + 'batchnorm/scale' in extra
  assert f'state: {conv}batchnorm/~/mean_ema/counter' in extra
  assert [m[0] for m in info.value.mis_shaped] == [
      'perceiver_encoder/~/cross_attention/layer_norm_1/scale',
      'perceiver_encoder/~/cross_attention/layer_norm_1/offset']
  assert 'float32[82] vs float32[21]' in str(info.value)


def test_config_without_released_counterpart_lists_our_names():
  tree = released_tree(small_model(1))
  config = small_config(1)
  with config.unlocked():
    config.experiment_kwargs.config.model.decoder = {
        'type': 'average', 'num_classes': 1000}
  with pytest.raises(deepmind.CheckpointMismatch) as info:
    deepmind.from_deepmind(tree, config.experiment_kwargs.config.model)
  assert [u[0] for u in info.value.unmapped] == [
      'decoder/logits/b', 'decoder/logits/w']
  assert 'classification_decoder/~/basic_decoder/output/w [16, 1000]' in (
      str(info.value))
  with pytest.raises(deepmind.CheckpointMismatch, match='decoder/logits'):
    deepmind.to_deepmind(
        random_params(config.experiment_kwargs.config.model),
        config.experiment_kwargs.config.model)


def test_truncated_and_empty_files(tmp_path):
  model = small_model(1)
  path = tmp_path / 'model.pystate'
  deepmind.save_checkpoint(path, random_params(model), None, model)
  data = path.read_bytes()
  for size in (len(data) // 2, len(data) - 1, 0):
    path.write_bytes(data[:size])
    with pytest.raises(deepmind.CheckpointError, match='truncated'):
      deepmind.load_checkpoint(path, model)


def test_not_a_pickle(tmp_path):
  path = tmp_path / 'model.pystate'
  path.write_bytes(b'<html>Not Found</html>\n')
  with pytest.raises(deepmind.CheckpointError, match='is not a pickle'):
    deepmind.read_pystate(path)
  with pytest.raises(FileNotFoundError):
    deepmind.read_pystate(tmp_path / 'absent.pystate')


@pytest.mark.parametrize('content, message', [
    ([np.zeros(3)], 'holds a list'),
    ({'weights': {}}, r"keys \['weights'\]"),
    ({'params': [np.zeros(3)]}, "'params' is a list"),
    ({'params': {'m': np.zeros(3)}}, "entry 'm' is a ndarray"),
    ({'params': {'m': {'w': 'text'}}}, 'params m/w is a str'),
    ({'params': {'m': {'w': np.array([None])}}}, 'ndarray of object'),
])
def test_pickle_that_is_not_a_checkpoint(tmp_path, content, message):
  path = tmp_path / 'model.pystate'
  path.write_bytes(pickle.dumps(content))
  with pytest.raises(deepmind.CheckpointError, match=message):
    deepmind.read_pystate(path)


class _RunsCode:
  """Unpickling it calls os.system."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def test_pickle_naming_code_is_refused_unrun(tmp_path):
  marker = tmp_path / 'ran'
  command = f'touch {marker}'
  reduced = pickle.dumps({'params': {'m': {'w': _RunsCode(command)}}})
  handwritten = f"cos\nsystem\n(V{command}\ntR.".encode()
  for data in (reduced, handwritten):
    path = tmp_path / 'evil.pystate'
    path.write_bytes(data)
    with pytest.raises(deepmind.UnsafePickleError,
                       match=r'global (os|posix|nt)\.system'):
      deepmind.read_pystate(path)
    with pytest.raises(deepmind.UnsafePickleError):
      deepmind.load_checkpoint(path, small_model(1))
  assert not marker.exists()


def test_allow_unsafe_pickle_reads_jax_arrays(tmp_path):
  model = small_model(1)
  params = random_params(model)
  tree = jax.tree.map(jnp.asarray, deepmind.to_deepmind(params, model))
  path = tmp_path / 'jax.pystate'
  path.write_bytes(pickle.dumps(tree))
  with pytest.raises(deepmind.UnsafePickleError, match='jax'):
    deepmind.load_checkpoint(path, model)
  loaded, _ = deepmind.load_checkpoint(path, model, allow_unsafe_pickle=True)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(loaded))
  assert_same_params(loaded, params)


def test_save_refuses_foreign_names(tmp_path):
  model = small_model(1)
  params = random_params(model)
  with pytest.raises(deepmind.CheckpointMismatch, match='state: bn/x'):
    deepmind.save_checkpoint(tmp_path / 'x', params,
                             {'bn': {'x': np.zeros(2)}}, model)
  params['encoder/~/extra'] = {'w': np.zeros(2)}
  with pytest.raises(deepmind.CheckpointMismatch, match='encoder/~/extra/w'):
    deepmind.save_checkpoint(tmp_path / 'x', params, {}, model)
  assert not os.listdir(tmp_path)


# The import script.


def test_import_then_evaluate_gives_the_model_logits(tmp_path):
  config = small_config()
  exp_config = config.experiment_kwargs.config
  params = random_params(exp_config.model)
  pystate = tmp_path / 'released.pystate'
  deepmind.save_checkpoint(pystate, params, {}, exp_config.model)
  output = tmp_path / 'imported'
  result = import_checkpoint.import_checkpoint(config, str(pystate),
                                               str(output))
  assert result == {'step_dir': str(output / 'latest' / '0'),
                    'params': sum(x.size for x in jax.tree.leaves(params))}
  # What evaluate_checkpoint reads and restores.
  restored = checkpointing.restore_checkpoint(str(output))
  assert restored['global_step'] == 0
  experiment = experiments.get_experiment_class(exp_config.experiment)(
      'eval', jax.random.key(0), exp_config)
  experiment.restore_from_snapshot(restored['experiment_module'])
  images = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
  np.testing.assert_allclose(
      logits(exp_config.model, restored['experiment_module']['params'],
             images),
      logits(exp_config.model, params, images), rtol=1e-6, atol=1e-6)
  with pytest.raises(FileExistsError, match='already holds checkpoints'):
    import_checkpoint.import_checkpoint(config, str(pystate), str(output))


def test_import_refuses_a_mismatched_config_and_writes_nothing(tmp_path):
  pystate = tmp_path / 'released.pystate'
  model = small_model(3)
  deepmind.save_checkpoint(pystate, random_params(model), {}, model)
  with pytest.raises(deepmind.CheckpointMismatch, match='self_attention_2'):
    import_checkpoint.import_checkpoint(small_config(2), str(pystate),
                                        str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()
  with pytest.raises(ValueError, match='Unknown format'):
    import_checkpoint.import_checkpoint(small_config(3), str(pystate),
                                        str(tmp_path / 'out'), fmt='hf')


def test_import_of_the_conv_variant_keeps_its_batch_norm_state(tmp_path):
  config = imagenet.get_config('p2,prep=conv,debug')
  exp_config = config.experiment_kwargs.config
  model = exp_config.model
  params, state = random_variables(model)
  pystate = tmp_path / 'conv.pystate'
  deepmind.save_checkpoint(pystate, params, state, model)
  output = tmp_path / 'imported'
  import_checkpoint.import_checkpoint(config, str(pystate), str(output))
  restored = checkpointing.restore_checkpoint(str(output))
  assert_same_params(restored['experiment_module']['state'], state)
  experiment = experiments.get_experiment_class(exp_config.experiment)(
      'eval', jax.random.key(0), exp_config)
  experiment.restore_from_snapshot(restored['experiment_module'])
