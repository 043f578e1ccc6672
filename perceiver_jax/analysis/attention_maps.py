"""Where each latent looks: the encoder's cross-attention over an image.

P1 Fig. 4-style maps, for image models with any number of cross-attends (P1)
or one (P2). Shape letters: B batch, N latents (num_latents), M byte array
positions (= h * w grid points), A heads (num_cross_heads), h, w the grid the
byte array covers (the image's pixels, or its patches / conv outputs).

How the attention is read: the model is not changed. `hk.intercept_methods`
records what every encoder cross-attend's `Attention.__call__` receives: the
query-normalised latents [B, N, D] and the standardised byte array
[B, M, C] with its LayerNorm scale and offset (the `prepared` inputs). The
weights are then recomputed outside the model with that module's own
parameters ('query' and 'key' of .../cross_attend_k/~/attention):
  q = LN(z) W_q + b_q,  k = LN(x) W_k + b_k,  split into A heads,
  weights = softmax(q k^T / sqrt(qk_channels / A)) over the M positions,
as `attention.Attention` computes them in every formulation (in the
reformulated one q . b_k cancels in the softmax, so the weights are the
same). A permuted preprocessor (`permutation_seed`, P1's permuted ImageNet)
reorders the M positions; the maps are un-permuted back onto the image grid.
Cross-attends that share weights (P1: 1..T-1) are recorded once per use, in
schedule order: cross-attend k is the k-th call.

`attention_maps` computes them for given params; `write_attention_maps`
restores a checkpoint, preprocesses an image file as the config's
evaluation does, and writes PNGs (`render`): per cross-attend k,
cross_attend_{k}_latents.png (a grid of the chosen latents' maps, each
scaled to its own maximum) and cross_attend_{k}_mean.png (the input image
beside the map averaged over all latents), plus overview.png (one row per
cross-attend: image, mean map, latent grid), attention.npz (the raw weights)
and maps.json (the file list). PNGs are drawn with Pillow (a viridis-like
colour map); matplotlib is not needed.
"""

import json
import math
import os
import re
from typing import Any, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from perceiver_jax import classify
from perceiver_jax import models
from perceiver_jax import ops
from perceiver_jax.data import imagenet
from perceiver_jax.modules import attention
from perceiver_jax.modules import preprocessors
from perceiver_jax.ops import byte_array

# Module names of the encoder's cross-attention (not the P2 decoder's).
_CROSS_ATTENTION = re.compile(r'(^|/)encoder/~/cross_attend_\d+/~/attention$')
# Latents drawn in a grid when none are chosen: all up to this many, else
# this many evenly spaced.
MAX_GRID_LATENTS = 64
_TILE = 48  # Pixels per latent map in the grid.
_MEAN_SIZE = 128  # Pixels of the image and mean map.
# Viridis at 0, 1/4, 1/2, 3/4, 1 (RGB), linearly interpolated.
_COLOURS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140],
                     [94, 201, 98], [253, 231, 37]], np.float32)


def check_image_model(model: ml_collections.ConfigDict) -> None:
  """ValueError unless the model reads an image through cross-attention."""
  kind = model.preprocessor.get('type')
  if kind != 'image':
    raise ValueError(
        f"Attention maps need an image model (preprocessor type 'image'); "
        f'this config has preprocessor type {kind!r}.')


def grid_shape(image_shape: Sequence[int], num_positions: int
               ) -> tuple[int, int]:
  """(h, w) of the M byte array positions over an [H, W, C] image.

  The grid keeps the image's aspect: pixels (H, W), or fewer points for
  patches and conv downsampling (a 224 image gives 56 x 56 after conv).
  """
  height, width = image_shape[:2]
  h = max(1, round(math.sqrt(num_positions * height / width)))
  if num_positions % h:
    raise ValueError(f'{num_positions} byte array positions do not form a '
                     f'grid over a {height} x {width} image.')
  return h, num_positions // h


def _capturing_forward(model: ml_collections.ConfigDict
                       ) -> hk.TransformedWithState:
  """Forward pass returning what each encoder cross-attention receives."""

  def forward(images):
    captured = []

    def interceptor(next_f, args, kwargs, context):
      if (context.method_name == '__call__' and
          isinstance(context.module, attention.Attention) and
          _CROSS_ATTENTION.search(context.module.module_name)):
        name = context.module.module_name
        prepared = kwargs['prepared']
        captured.append({
            'module': name, 'queries': args[0],  # [B, N, D], after LN.
            'inputs': byte_array.dense(prepared['inputs']),  # [B, M, C]
            'affine': prepared['affine'], 'mask': kwargs.get('mask')})
      return next_f(*args, **kwargs)

    with ops.use_backend('reference'), hk.intercept_methods(interceptor):
      models.build_model(model)(images, is_training=False)
    return captured

  return hk.transform_with_state(forward)


def _weights(capture: dict[str, Any], params: hk.Params,
             num_heads: int) -> jax.Array:
  """softmax(q k^T / sqrt(K)) [B, A, N, M] from one cross-attention's inputs."""
  name = capture['module']
  w_q, b_q = params[f'{name}/~/query']['w'], params[f'{name}/~/query']['b']
  w_k, b_k = params[f'{name}/~/key']['w'], params[f'{name}/~/key']['b']
  x = capture['inputs'].astype(jnp.float32)
  if capture['affine'] is not None:
    scale, offset = capture['affine']
    x = x * scale + offset  # The input LayerNorm's affine part.
  q = capture['queries'].astype(jnp.float32) @ w_q + b_q  # [B, N, QK]
  k = x @ w_k + b_k  # [B, M, QK]
  head = q.shape[-1] // num_heads
  q = q.reshape(q.shape[:2] + (num_heads, head))  # [B, N, A, K]
  k = k.reshape(k.shape[:2] + (num_heads, head))  # [B, M, A, K]
  logits = jnp.einsum('bnak,bmak->banm', q, k) / math.sqrt(head)
  mask = capture['mask']
  if mask is not None:
    mask = ops.check_mask(mask, q.shape[0], q.shape[1], k.shape[1])
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1)


def attention_maps(model: ml_collections.ConfigDict, params: hk.Params,
                   state: hk.State, images: np.ndarray) -> list[np.ndarray]:
  """Each encoder cross-attend's attention over the image grid.

  Args:
    model: the model section of an image config.
    params: the model's parameters.
    state: its Haiku state ({} for models without BatchNorm).
    images: float32 [B, H, W, C], preprocessed as the model expects.

  Returns:
    One float32 [B, A, N, h, w] array per cross-attend, in schedule order;
    each latent's map sums to 1 over the h * w grid (un-permuted).
  """
  check_image_model(model)
  images = np.asarray(images, np.float32)
  if images.ndim != 4:
    raise ValueError(f'images must be [B, H, W, C], got {images.shape}.')
  forward = _capturing_forward(model)
  num_heads = model.encoder.get('num_cross_heads', 1)

  @jax.jit
  def compute(params, state, images):
    captured, _ = forward.apply(params, state, None, images)
    return [_weights(c, params, num_heads) for c in captured]

  maps = [np.asarray(w) for w in compute(params, state, images)]
  if not maps:
    raise ValueError('The model ran no encoder cross-attention.')
  num_positions = maps[0].shape[-1]
  seed = model.preprocessor.get('permutation_seed')
  if seed is not None:  # Position j of the byte array is pixel perm[j].
    unpermute = np.argsort(preprocessors.make_permutation(num_positions, seed))
    maps = [m[..., unpermute] for m in maps]
  h, w = grid_shape(images.shape[1:], num_positions)
  return [m.reshape(m.shape[:-1] + (h, w)) for m in maps]


def load_image(path: str, data: ml_collections.ConfigDict) -> np.ndarray:
  """An image file as the config's evaluation feeds it: [H, W, C] float32.

  ImageNet: `imagenet.load_eval_image`. Digits: greyscale, resized to the
  data's input_shape, in [0, 1] (the data set's scale).

  Raises:
    FileNotFoundError: no such file.
    ValueError: an undecodable file, or data without an image loader.
  """
  name = data.get('name')
  if name == 'imagenet':
    return imagenet.load_eval_image(path, data)
  if name != 'digits':
    raise ValueError(f'No image preprocessing known for data {name!r}; '
                     "attention_maps handles 'imagenet' and 'digits'.")
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Image file {path} does not exist.')
  height, width = data.input_shape[:2]
  try:
    with Image.open(path) as image:
      grey = image.convert('L').resize((width, height), Image.BILINEAR)
  except (OSError, ValueError) as e:
    raise ValueError(f'Cannot decode {path} as an image: {e}') from e
  return (np.asarray(grey, np.float32) / 255.0)[..., None]


def _colour(values: np.ndarray) -> np.ndarray:
  """[...] values in [0, 1] -> uint8 [..., 3] RGB."""
  x = np.clip(values, 0.0, 1.0) * (len(_COLOURS) - 1)
  low = np.minimum(np.floor(x).astype(int), len(_COLOURS) - 2)
  frac = (x - low)[..., None]
  rgb = _COLOURS[low] * (1 - frac) + _COLOURS[low + 1] * frac
  return rgb.round().astype(np.uint8)


def _tile(rgb: np.ndarray, size: int) -> np.ndarray:
  """uint8 [h, w, 3] scaled so its longer side is `size` pixels."""
  h, w = rgb.shape[:2]
  scale = size / max(h, w)
  target = (max(1, round(w * scale)), max(1, round(h * scale)))
  method = Image.NEAREST if scale >= 1 else Image.BOX
  return np.asarray(Image.fromarray(rgb).resize(target, method))


def _normalised(x: np.ndarray) -> np.ndarray:
  return x / max(float(x.max()), 1e-30)


def _image_rgb(image: np.ndarray) -> np.ndarray:
  """A preprocessed [H, W, C] image rescaled to uint8 RGB for display."""
  lo, hi = float(image.min()), float(image.max())
  x = (image - lo) / max(hi - lo, 1e-12)
  if x.shape[-1] != 3:
    x = np.repeat(x.mean(-1, keepdims=True), 3, axis=-1)
  return (x * 255).round().astype(np.uint8)


def _grid(tiles: Sequence[np.ndarray], gap: int = 2) -> np.ndarray:
  """Tiles of one shape in a near-square grid, white gaps between them."""
  cols = math.ceil(math.sqrt(len(tiles)))
  rows = math.ceil(len(tiles) / cols)
  th, tw = tiles[0].shape[:2]
  out = np.full([rows * (th + gap) - gap, cols * (tw + gap) - gap, 3], 255,
                np.uint8)
  for i, tile in enumerate(tiles):
    top, left = (j * (size + gap) for j, size in zip(divmod(i, cols),
                                                     (th, tw)))
    out[top:top + th, left:left + tw] = tile
  return out


def _row(parts: Sequence[np.ndarray], gap: int = 8) -> np.ndarray:
  height = max(p.shape[0] for p in parts)
  padded = [np.pad(p, ((0, height - p.shape[0]), (0, gap), (0, 0)),
                   constant_values=255) for p in parts]
  return np.concatenate(padded, axis=1)[:, :-gap]


def choose_latents(num_latents: int,
                   latents: Optional[Sequence[int]] = None) -> list[int]:
  """The latents drawn in grids: `latents`, or all / MAX_GRID_LATENTS."""
  if latents is None:
    count = min(num_latents, MAX_GRID_LATENTS)
    return sorted({int(i) for i in np.linspace(0, num_latents - 1, count)})
  bad = [i for i in latents if not 0 <= i < num_latents]
  if bad or not latents:
    raise ValueError(f'latents {list(latents)} must be a non-empty list of '
                     f'indices in [0, {num_latents}); bad: {bad}.')
  return list(latents)


def render(maps: Sequence[np.ndarray], image: np.ndarray, out_dir: str, *,
           latents: Optional[Sequence[int]] = None) -> dict[str, Any]:
  """Writes the PNGs, attention.npz and maps.json of one image's maps.

  Args:
    maps: `attention_maps` output for a batch of one image.
    image: that image, [H, W, C] as fed to the model.
    out_dir: created if needed.
    latents: latent indices for the grids (default `choose_latents`).

  Returns:
    The maps.json content: {'files': [...], 'latents': [...],
    'grid': [h, w], 'num_cross_attends': T}; file paths relative to out_dir.
  """
  os.makedirs(out_dir, exist_ok=True)
  chosen = choose_latents(maps[0].shape[2], latents)
  picture = _tile(_image_rgb(image), _MEAN_SIZE)
  files, rows = [], []
  for k, weights in enumerate(maps):
    per_latent = weights[0].mean(axis=0)  # [N, h, w], averaged over heads.
    grid = _grid([_tile(_colour(_normalised(per_latent[i])), _TILE)
                  for i in chosen])
    mean = _tile(_colour(_normalised(per_latent.mean(axis=0))), _MEAN_SIZE)
    for suffix, pixels in (('latents', grid), ('mean', _row([picture, mean]))):
      name = f'cross_attend_{k}_{suffix}.png'
      Image.fromarray(pixels).save(os.path.join(out_dir, name), optimize=True)
      files.append(name)
    rows.append(_row([picture, mean, grid]))
  width = max(r.shape[1] for r in rows)
  overview = np.concatenate(
      [np.pad(r, ((0, 8), (0, width - r.shape[1]), (0, 0)),
              constant_values=255) for r in rows], axis=0)[:-8]
  Image.fromarray(overview).save(os.path.join(out_dir, 'overview.png'),
                                 optimize=True)
  np.savez_compressed(os.path.join(out_dir, 'attention.npz'),
                      **{f'cross_attend_{k}': m[0] for k, m in enumerate(maps)})
  listing = {'files': files + ['overview.png', 'attention.npz'],
             'latents': chosen, 'grid': list(maps[0].shape[-2:]),
             'num_cross_attends': len(maps)}
  with open(os.path.join(out_dir, 'maps.json'), 'w') as f:
    json.dump(listing, f, indent=1)
  return listing


def write_attention_maps(config: ml_collections.ConfigDict, checkpoint: str,
                         image_path: str, out_dir: str, *,
                         latents: Optional[Sequence[int]] = None
                         ) -> dict[str, Any]:
  """scripts/attention_maps.py's work: a checkpoint's maps of one image file.

  Args:
    config: the experiment config; its model must be an image model.
    checkpoint: a checkpoint root, series or step directory.
    image_path: the image file (read first, so a bad file fails at once).
    out_dir: where the files go.
    latents: latent indices for the grids.

  Returns:
    `render`'s listing, plus 'image' and 'out_dir'.

  Raises:
    ValueError: a config without an image model, an undecodable image, bad
      latents; classify.CheckpointMismatch for another model's checkpoint.
    FileNotFoundError: a missing image or checkpoint.
  """
  exp = config.experiment_kwargs.config
  check_image_model(exp.model)
  image = load_image(image_path, exp.data)
  params, state = classify.restore_params(exp.model, checkpoint, image)
  maps = attention_maps(exp.model, params, state, image[None])
  listing = render(maps, image, out_dir, latents=latents)
  return {'image': image_path, 'out_dir': out_dir, **listing}
