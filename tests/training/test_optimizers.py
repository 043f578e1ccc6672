"""Tests for perceiver_jax.training.optimizers: schedules, decay mask, steps."""

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from perceiver_jax.modules import position_encoding
from perceiver_jax.training import optimizers


def _config(**fields):
  base = dict(name='lamb', base_lr=4e-3, weight_decay=0.1, clip_grad_norm=10.0,
              schedule='constant')
  base.update(fields)
  return ml_collections.ConfigDict(base)


def _lr(schedule, step):
  return float(jax.jit(schedule)(jnp.asarray(step, jnp.int32)))


# Schedules.


def test_constant():
  schedule = optimizers.make_schedule(_config(base_lr=1e-3),
                                      steps_per_epoch=10, total_steps=100)
  for step in (0, 50, 99, 1000):
    assert _lr(schedule, step) == pytest.approx(1e-3)


def test_step_decay_p1_boundaries():
  spe = 1251  # 1,281,167 // 1024
  config = _config(schedule='step_decay', decay_epochs=(84, 102, 114),
                   decay_factor=10.0)
  schedule = optimizers.make_schedule(config, steps_per_epoch=spe,
                                      total_steps=120 * spe)
  expected = {0: 4e-3, 84 * spe - 1: 4e-3, 84 * spe: 4e-4,
              102 * spe - 1: 4e-4, 102 * spe: 4e-5, 114 * spe - 1: 4e-5,
              114 * spe: 4e-6, 120 * spe - 1: 4e-6}
  for step, lr in expected.items():
    assert _lr(schedule, step) == pytest.approx(lr, rel=1e-5), step


def test_step_decay_default_factor_and_vector_steps():
  config = _config(schedule='step_decay', decay_epochs=[2], base_lr=1.0)
  schedule = optimizers.make_schedule(config, steps_per_epoch=5,
                                      total_steps=20)
  np.testing.assert_allclose(schedule(jnp.arange(12)),
                             [1.0] * 10 + [0.1] * 2, rtol=1e-6)


def test_constant_cosine_p2():
  # P2: 110 epochs, constant for 55, cosine to 0 over the last 55.
  spe, total = 10, 1100
  for fields in (dict(constant_fraction=0.5), dict(constant_epochs=55)):
    schedule = optimizers.make_schedule(
        _config(schedule='constant_cosine', base_lr=2e-3, **fields),
        steps_per_epoch=spe, total_steps=total)
    assert _lr(schedule, 0) == pytest.approx(2e-3)
    assert _lr(schedule, 549) == pytest.approx(2e-3)
    assert _lr(schedule, 550) == pytest.approx(2e-3)  # cos(0) = 1.
    assert _lr(schedule, 550 + 275) == pytest.approx(1e-3, rel=1e-5)
    step = 600
    want = 1e-3 * (1 + np.cos(np.pi * (step - 550) / 550))
    assert _lr(schedule, step) == pytest.approx(want, rel=1e-5)
    assert _lr(schedule, total) == pytest.approx(0.0, abs=1e-12)
    assert _lr(schedule, total + 50) == pytest.approx(0.0, abs=1e-12)


def test_constant_cosine_all_constant():
  schedule = optimizers.make_schedule(
      _config(schedule='constant_cosine', constant_fraction=1.0),
      steps_per_epoch=1, total_steps=10)
  assert _lr(schedule, 9) == pytest.approx(4e-3)


def test_warmup_cosine():
  schedule = optimizers.make_schedule(
      _config(schedule='warmup_cosine', base_lr=1.0, warmup_steps=10),
      steps_per_epoch=7, total_steps=110)
  assert _lr(schedule, 0) == pytest.approx(0.0)
  assert _lr(schedule, 5) == pytest.approx(0.5)
  assert _lr(schedule, 10) == pytest.approx(1.0)
  assert _lr(schedule, 60) == pytest.approx(0.5, rel=1e-5)
  assert _lr(schedule, 110) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize('fields, match', [
    (dict(schedule='exponential'), 'Unknown schedule'),
    (dict(schedule='step_decay'), 'decay_epochs'),
    (dict(schedule='step_decay', decay_epochs=(5, 3)), 'ascending'),
    (dict(schedule='constant_cosine'), 'exactly one'),
    (dict(schedule='constant_cosine', constant_fraction=0.5,
          constant_epochs=3), 'exactly one'),
    (dict(schedule='constant_cosine', constant_fraction=1.5), r'\[0, 1\]'),
    (dict(schedule='warmup_cosine'), 'warmup_steps'),
    (dict(schedule='warmup_cosine', warmup_steps=100), 'warmup_steps'),
    (dict(base_lr=0.0), 'base_lr'),
    (dict(schedule=None), 'schedule'),
])
def test_schedule_errors(fields, match):
  with pytest.raises(ValueError, match=match):
    optimizers.make_schedule(_config(**fields), steps_per_epoch=10,
                             total_steps=100)


# Weight-decay mask.


class _Tiny(hk.Module):
  """Linear + LayerNorm + learned position embeddings + a latent array."""

  def __call__(self, x):  # [B, M, C]
    latents = hk.get_parameter('latents', [3, 4],
                               init=hk.initializers.TruncatedNormal(0.02))
    pos = position_encoding.LearnedPositionEncoding(
        x.shape[1], 2, name='pos')(x.shape[0])  # [B, M, 2]
    x = jnp.concatenate([x, pos], axis=-1)
    x = hk.LayerNorm(-1, True, True, name='input_norm')(x)
    x = hk.Linear(4, name='proj')(x)  # [B, M, 4]
    x = hk.LayerNorm(-1, True, True)(x)  # Default name 'layer_norm'.
    return x.mean(1) + latents.sum(0)


def _tiny_params():
  forward = hk.transform(lambda x: _Tiny(name='tiny')(x))
  return forward.init(jax.random.PRNGKey(0), jnp.ones([2, 5, 3]))


def _flat(tree):
  return {f'{m}:{n}': v for m, d in tree.items() for n, v in d.items()}


def test_weight_decay_mask_on_haiku_params():
  params = _tiny_params()
  assert set(_flat(params)) == {
      'tiny:latents', 'tiny/pos:pos_embs', 'tiny/input_norm:scale',
      'tiny/input_norm:offset', 'tiny/proj:w', 'tiny/proj:b',
      'tiny/layer_norm:scale', 'tiny/layer_norm:offset'}
  expected = {'tiny:latents': True, 'tiny/pos:pos_embs': True,
              'tiny/proj:w': True, 'tiny/proj:b': False,
              'tiny/input_norm:scale': False,
              'tiny/input_norm:offset': False,
              'tiny/layer_norm:scale': False,
              'tiny/layer_norm:offset': False}
  mask = optimizers.weight_decay_mask(params)
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  assert _flat(mask) == expected

  mask = _flat(optimizers.weight_decay_mask(params, decay_pos_embs=False))
  assert mask == {**expected, 'tiny/pos:pos_embs': False}
  mask = _flat(optimizers.weight_decay_mask(params, decay_latents=False))
  assert mask == {**expected, 'tiny:latents': False}


def test_weight_decay_mask_on_perceiver():
  from configs import digits  # pylint: disable=g-import-not-at-top
  from perceiver_jax import models  # pylint: disable=g-import-not-at-top
  config = digits.get_config('debug').experiment_kwargs.config
  forward = models.make_forward(config.model)
  params = jax.eval_shape(lambda: forward.init(
      jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 1)), is_training=True))
  mask = _flat(optimizers.weight_decay_mask(params))
  for key, decays in mask.items():
    module, name = key.split(':')
    is_norm = module.split('/')[-1].endswith('norm')
    assert decays == (name in ('w', 'latents')), key
    assert is_norm == (name in ('scale', 'offset')), key
  assert any(v for v in mask.values()) and not all(mask.values())


# Optimizer steps.


def _step(optimizer, params, grads):
  state = optimizer.init(params)
  updates, state = jax.jit(optimizer.update)(grads, state, params)
  return optax.apply_updates(params, updates), state


@pytest.mark.parametrize('name', ['lamb', 'adamw'])
def test_update_changes_params(name):
  params = _tiny_params()
  config = _config(name=name, base_lr=1e-2)
  optimizer, schedule = optimizers.make_optimizer(
      config, steps_per_epoch=10, total_steps=100)
  assert _lr(schedule, 0) == pytest.approx(1e-2)
  grads = jax.tree.map(
      lambda p: jnp.asarray(np.random.default_rng(p.size).normal(
          size=p.shape), p.dtype), params)
  new, _ = _step(optimizer, params, grads)
  old_flat, new_flat = _flat(params), _flat(new)
  for key, old in old_flat.items():
    assert not np.allclose(old, new_flat[key]), key
    assert new_flat[key].dtype == old.dtype


@pytest.mark.parametrize('name', ['lamb', 'adamw'])
@pytest.mark.parametrize('decay_pos_embs', [True, False])
def test_zero_gradient_moves_only_decayed_params(name, decay_pos_embs):
  params = _tiny_params()
  # LayerNorm scales start at 1 and offsets/biases at 0: give everything a
  # non-zero value so that a decay step would show.
  params = jax.tree.map(lambda p: p + 0.5, params)
  lr, wd = 1e-2, 0.1
  config = _config(name=name, base_lr=lr, weight_decay=wd,
                   decay_pos_embs=decay_pos_embs)
  optimizer, _ = optimizers.make_optimizer(config, steps_per_epoch=1,
                                           total_steps=10)
  grads = jax.tree.map(jnp.zeros_like, params)
  new, _ = _step(optimizer, params, grads)
  mask = _flat(optimizers.weight_decay_mask(params,
                                            decay_pos_embs=decay_pos_embs))
  assert mask['tiny/pos:pos_embs'] == decay_pos_embs
  old_flat, new_flat = _flat(params), _flat(new)
  for key, decays in mask.items():
    old, upd = np.asarray(old_flat[key]), np.asarray(new_flat[key])
    if not decays:
      np.testing.assert_array_equal(upd, old, err_msg=key)
    elif name == 'adamw':
      # Adam's step is 0 for a zero gradient: only -lr * wd * p remains.
      np.testing.assert_allclose(upd, old * (1 - lr * wd), rtol=1e-6,
                                 err_msg=key)
    else:
      # LAMB: the update wd * p has trust ratio |p| / |wd * p| = 1 / wd, so
      # each decayed param shrinks by exactly lr (relative).
      np.testing.assert_allclose(upd, old * (1 - lr), rtol=1e-5,
                                 err_msg=key)


@pytest.mark.parametrize('name', ['lamb', 'adamw'])
@pytest.mark.parametrize('clip', [10.0, None, 0.0])
def test_clipping_bounds_the_gradient(name, clip):
  params = {'linear': {'w': jnp.ones([4, 3]), 'b': jnp.zeros([3])}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e6), params)
  config = _config(name=name, clip_grad_norm=clip)
  optimizer, _ = optimizers.make_optimizer(config, steps_per_epoch=1,
                                           total_steps=10)
  _, state = _step(optimizer, params, grads)
  # After one step Adam's first moment is (1 - b1) * (clipped) gradient.
  mu = optax.tree_utils.tree_get(state, 'mu')
  norm = float(optax.global_norm(mu)) / (1 - 0.9)
  want = clip if clip else float(optax.global_norm(grads))
  assert norm == pytest.approx(want, rel=1e-4)


def test_clipping_limits_the_update():
  # With eps large against the clipped gradient, AdamW's first step is
  # ~lr * g / eps: tiny once the gradient is clipped, ~lr when it is not.
  params = {'linear': {'w': jnp.zeros([2])}}
  grads = {'linear': {'w': jnp.full([2], 1e6)}}
  steps = {}
  for clip in (1e-3, None):
    optimizer, _ = optimizers.make_optimizer(
        _config(name='adamw', base_lr=1.0, weight_decay=0.0, eps=1.0,
                clip_grad_norm=clip), steps_per_epoch=1, total_steps=10)
    new, _ = _step(optimizer, params, grads)
    steps[clip] = float(jnp.abs(new['linear']['w']).max())
  assert steps[1e-3] < 1e-3
  assert steps[None] == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize('fields, match', [
    (dict(name='sgd'), 'Unknown optimizer'),
    (dict(name=None), "'name'"),
    (dict(weight_decay=None), 'weight_decay'),
    (dict(weight_decay=-1.0), 'weight_decay'),
    (dict(clip_grad_norm=-1.0), 'clip_grad_norm'),
    (dict(b1=1.0), 'b1'),
    (dict(schedule='cyclic'), 'Unknown schedule'),
])
def test_optimizer_errors(fields, match):
  with pytest.raises(ValueError, match=match):
    optimizers.make_optimizer(_config(**fields), steps_per_epoch=1,
                              total_steps=10)


def test_paper_configs_build():
  from configs import imagenet  # pylint: disable=g-import-not-at-top
  for arg in ('', 'p2'):
    config = imagenet.get_config(arg)
    exp = config.experiment_kwargs.config
    spe = exp.data.num_train_examples // exp.training.batch_size
    _, schedule = optimizers.make_optimizer(
        exp.optimizer, steps_per_epoch=spe, total_steps=config.training_steps)
    if not arg:  # P1: 4e-3, /10 at epoch 84.
      assert _lr(schedule, 84 * spe - 1) == pytest.approx(4e-3)
      assert _lr(schedule, 84 * spe) == pytest.approx(4e-4, rel=1e-5)
    else:  # P2: 2e-3 constant for 55 of 110 epochs.
      assert _lr(schedule, 55 * spe - 5) == pytest.approx(2e-3)
      assert _lr(schedule, config.training_steps) == pytest.approx(
          0.0, abs=1e-9)
