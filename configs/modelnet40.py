r"""ModelNet40 point clouds with the Perceiver: P1 Tab. 4, 85.7% top-1.

2,000 points per object (x, y, z) as M = 2,000 inputs of 387 channels: 3D
Fourier features of the coordinates (64 bands, max resolution 1120:
3 * (2 * 64 + 1) = 387), no other features. 512 x 1024 latents, 2
cross-attends x 6 self-attention blocks, ImageNet sharing and widths
otherwise. LAMB constant 1e-3, batch 512, 50,000 steps. Training
augmentation: per-point scaling in [0.99, 1.01], then zero mean and unit
cube; evaluation without augmentation. Eval reports overall accuracy, mean
class accuracy and per-class accuracy.

  python scripts/prepare_modelnet40.py ...   # once, for the OFF meshes
  python scripts/train.py --config=configs/modelnet40.py \
      --config.experiment_kwargs.config.data.data_dir=/path/to/modelnet40_ply_hdf5_2048

Presets: debug (tiny model on the committed fixture, tests/testdata/
modelnet40), seed=N.

Deviations: weight decay 0.1 / clip 10 / label smoothing 0.1 follow the
ImageNet settings ("otherwise the ImageNet settings", P1 Sec. 4.4); the
387-channel input without other features is inferred.
"""

import os
from typing import Optional

from configs import common
import ml_collections

NUM_CLASSES = 40
_FIXTURE = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'tests', 'testdata', 'modelnet40')


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  options = common.parse_arg(arg, debug=False, seed=0)
  num_points, batch_size, training_steps = 2000, 512, 50_000
  encoder = dict(
      num_latents=512, latent_dim=1024, num_cross_attends=2,
      num_self_attends_per_block=6, num_cross_heads=1, num_self_heads=8,
      cross_widening_factor=1, self_widening_factor=1,
      share_cross_attends=True, share_latent_transformer=True,
      dropout_prob=0.0)
  data = dict(
      name='modelnet40', train_split='train', eval_split='test',
      num_train_examples=9843, num_classes=NUM_CLASSES,
      input_shape=(num_points, 3),
      data_dir=ml_collections.FieldReference(None, field_type=str),
      format='h5', num_points=num_points, scale_low=0.99, scale_high=1.01)
  if options.debug:
    num_points, batch_size, training_steps = 128, 16, 4
    encoder.update(num_latents=16, latent_dim=32, num_self_attends_per_block=1,
                   num_self_heads=2)
    data.update(data_dir=os.path.join(_FIXTURE, 'modelnet40_ply_hdf5_2048'),
                num_points=num_points, input_shape=(num_points, 3),
                num_train_examples=100)

  experiment = ml_collections.ConfigDict(dict(
      experiment='classification', data=data,
      model=dict(
          preprocessor=dict(type='point_cloud', num_freq_bands=64,
                            max_resolution=1120),
          encoder=encoder,
          decoder=dict(type='average', num_classes=NUM_CLASSES)),
      optimizer=common.optimizer(name='lamb', base_lr=1e-3,
                                 weight_decay=0.1, clip_grad_norm=10.0,
                                 schedule='constant'),
      training=dict(batch_size=batch_size, label_smoothing=0.1,
                    precision='float32', data_seed=options.seed,
                    log_every_steps=100, total_steps=training_steps),
      evaluation=dict(batch_size=batch_size, per_class_metrics=True),
  ))
  config = common.jaxline_config(
      experiment=experiment, training_steps=training_steps,
      checkpoint_dir='/tmp/perceiver_jax/modelnet40',
      save_checkpoint_interval=2000, log_interval=100)
  config.random_seed = options.seed
  exp = config.experiment_kwargs.config
  exp.training.total_steps = config.get_ref('training_steps')
  config.lock()
  return config
