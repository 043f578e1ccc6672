"""TensorBoard event files written through etils.epath, for any path a run uses.

jaxline's own writer goes through `tf.summary`, i.e. TensorFlow's file systems.
This one writes the same event files (scalars under the 'scalars' plugin,
images under 'images') with `epath`, so TensorBoard logs land wherever the
checkpoints do: a local directory, gs:// through TensorFlow's GCS client, or
gs:// through gcsfs when `EPATH_USE_TF=false` (how the tests reach a local GCS
emulator, which TensorFlow's GCS client cannot be pointed at).

An event file is a sequence of TFRecord-framed `Event` protos. Object stores
cannot append, so on a remote path each flush rewrites the whole file (a few
KB per thousand scalars); past `max_file_bytes` the writer starts a new file,
which TensorBoard reads as the continuation of the same run.
"""

import io
import os
import socket
import tempfile
import time
from typing import Any, Mapping, Optional

from etils import epath
import numpy as np
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.image import summary as image_summary
from tensorboard.plugins.scalar import summary as scalar_summary
from tensorboard.summary.writer import record_writer

from perceiver_jax.training import tree_io


def _value(tag: str, summary: Any) -> summary_pb2.Summary.Value:
  """The one value of a plugin's `pb` summary, tagged `tag` as tf.summary does.

  The `pb` helpers return TensorFlow's Summary class when TensorFlow is
  installed and append a suffix to the tag; the bytes are the same.
  """
  value, = summary_pb2.Summary.FromString(summary.SerializeToString()).value
  value.tag = tag
  return value


class EventFileWriter:
  """Writes TensorBoard events for one run directory (e.g. <ckpt_dir>/train).

  write_scalars / write_images follow jaxline's Writer protocol; every call
  ends with a flush, as jaxline's TensorBoardLogger does, so a crash loses
  nothing already written.
  """

  def __init__(self, log_dir: tree_io.PathLike, *,
               max_file_bytes: int = 1 << 20):
    self._dir = tree_io.as_path(log_dir)
    self._local = not self._dir.as_posix().startswith(('gs://', 's3://'))
    self._max_file_bytes = max_file_bytes
    self._dir.mkdir(parents=True, exist_ok=True)
    self._path: Optional[epath.Path] = None
    self._buffer = io.BytesIO()
    self._start_file()

  @property
  def path(self) -> epath.Path:
    """The event file written now."""
    assert self._path is not None
    return self._path

  def _start_file(self) -> None:
    now = time.time()
    name = (f'events.out.tfevents.{int(now)}.{socket.gethostname()}.'
            f'{os.getpid()}.{time.time_ns() % 10**9}.v2')
    self._path = self._dir / name
    self._buffer = io.BytesIO()
    self._append(event_pb2.Event(wall_time=now, file_version='brain.Event:2'))
    self._flush()

  def _append(self, event: event_pb2.Event) -> None:
    record_writer.RecordWriter(self._buffer).write(event.SerializeToString())

  def _flush(self) -> None:
    data = self._buffer.getvalue()
    if self._local:
      # Append what is new: the buffer holds only unwritten records locally.
      with self.path.open('ab') as f:
        f.write(data)
      self._buffer = io.BytesIO()
    else:
      self.path.write_bytes(data)
      if len(data) > self._max_file_bytes:
        self._start_file()

  def _write(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
    self._append(event_pb2.Event(
        wall_time=time.time(), step=int(step),
        summary=summary_pb2.Summary(value=values)))
    self._flush()

  def write_scalars(self, global_step: int, scalars: Mapping[str, Any]) -> None:
    values = []
    for name, value in scalars.items():
      values.append(_value(
          name, scalar_summary.pb(name, float(np.asarray(value)))))
    self._write(global_step, values)

  def write_images(self, global_step: int,
                   images: Mapping[str, np.ndarray]) -> None:
    """images: name -> [H, W], [H, W, C] or [B, H, W, C] uint8 or [0, 1] floats."""
    values = []
    for name, image in images.items():
      image = np.asarray(image)
      if image.ndim == 2:
        image = image[..., None]
      if image.ndim == 3:
        image = image[None]
      if image.dtype != np.uint8:
        image = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
      values.append(_value(name, image_summary.pb(name, image)))
    self._write(global_step, values)


def create_writer(config: Any, mode: str) -> EventFileWriter:
  """jaxline's writer factory: events under `<checkpoint_dir>/<mode>`."""
  return EventFileWriter(tree_io.as_path(config.checkpoint_dir) / mode)


def read_scalars(log_dir: tree_io.PathLike) -> dict[str, list[tuple[int, float]]]:
  """name -> [(step, value)] from every event file in `log_dir`, in order.

  For tests and tools; reads with epath, so it sees what `EventFileWriter`
  wrote on any file system it can reach.
  """
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  out: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(tree_io.as_path(log_dir).glob('events.out.tfevents.*')):
    # The loader reads local files; copy a remote one to a temporary file.
    with tempfile.NamedTemporaryFile(suffix='.tfevents') as tmp:
      tmp.write(path.read_bytes())
      tmp.flush()
      for event in event_file_loader.EventFileLoader(tmp.name).Load():
        for value in event.summary.value:
          if value.metadata.plugin_data.plugin_name != 'scalars':
            continue
          number = float(tensor_util.make_ndarray(value.tensor))
          out.setdefault(value.tag, []).append((int(event.step), number))
  return out
