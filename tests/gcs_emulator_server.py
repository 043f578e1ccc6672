"""Runs gcp-storage-emulator in memory, with the headers tensorstore needs.

  python -m tests.gcs_emulator_server PORT BUCKET

GCS answers a media download (`?alt=media`) with `x-goog-generation` and
`x-goog-metageneration` headers; tensorstore reads the object's generation
from them (OCDBT, which orbax writes, makes conditional writes against it and
fails with "Malformed StorageGeneration" without them). gcp-storage-emulator
2026.7 sends neither, so its download handler is wrapped to add them.
"""

import sys
import time

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params['bucket_name'],
                               request.params['object_id'])
  except Exception:  # pylint: disable=broad-except
    return  # Not found: the wrapped handler set the status.
  response['x-goog-generation'] = str(obj['generation'])
  response['x-goog-metageneration'] = str(obj.get('metageneration', 1))


def main(port: int, bucket: str) -> None:
  objects.download = _download_with_generation
  emulator = server.create_server('127.0.0.1', port, in_memory=True,
                                  default_bucket=bucket)
  emulator.start()
  try:
    while True:
      time.sleep(1)
  finally:
    emulator.stop()


if __name__ == '__main__':
  main(int(sys.argv[1]), sys.argv[2])
