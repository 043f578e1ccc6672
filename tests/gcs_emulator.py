"""A local Google Cloud Storage emulator for tests of gs:// paths.

`gcp-storage-emulator` (a test extra in setup.py; started through
tests/gcs_emulator_server.py, which adds two headers it lacks) serves the GCS JSON API on a
loopback port, in memory. Which of our libraries can be pointed at it:
  - tensorstore (orbax's array data): TENSORSTORE_GCS_HTTP_URL;
  - etils.epath through gcsfs (orbax's directories, our checkpoint series,
    TensorBoard events, the run lock): EPATH_USE_TF=false, so epath takes
    gcsfs rather than tf.io.gfile, and STORAGE_EMULATOR_HOST for gcsfs;
  - not tf.io.gfile: TensorFlow's GCS client has the endpoint
    https://www.googleapis.com/storage/v1/ compiled in (no variable or flag
    moves it; checked in TF 2.20's libtensorflow_framework). Reading tfds
    tfrecords from gs:// (tf.data) therefore cannot be tested here.
"""

import importlib.util
import subprocess
import sys
import time
import urllib.request

import pytest

from tests import helpers

BUCKET = 'perceiver-test'


def environment(url: str) -> dict[str, str]:
  """The variables that send every library we can redirect to `url`."""
  return {
      'EPATH_USE_TF': 'false',
      'STORAGE_EMULATOR_HOST': url,
      'TENSORSTORE_GCS_HTTP_URL': url,
      # tensorstore asks for a token; the emulator accepts any.
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
      # gcsfs would ask Google (credentials, the metadata server) what kind
      # of bucket each one is: plain GCS here.
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
      'NO_GCE_CHECK': 'true',
  }


@pytest.fixture(scope='module')
def gcs_url():
  """Starts the emulator with bucket `BUCKET`; yields its http://host:port."""
  if importlib.util.find_spec('gcp_storage_emulator') is None:
    pytest.fail('gcp-storage-emulator is not installed: '
                "pip install -e '.[test]' installs it")
  port = helpers.free_port()
  url = f'http://127.0.0.1:{port}'
  proc = subprocess.Popen(
      [sys.executable, '-m', 'tests.gcs_emulator_server', str(port), BUCKET],
      cwd=helpers.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 30
    while True:
      try:
        urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}', timeout=2)
        break
      except OSError:
        if time.time() > deadline or proc.poll() is not None:
          pytest.fail('the GCS emulator did not start')
        time.sleep(0.2)
    yield url
  finally:
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def gcs_env(gcs_url, monkeypatch):
  """The emulator's variables set in this process; gcsfs's cached clients
  (made before, pointing elsewhere) dropped."""
  for name, value in environment(gcs_url).items():
    monkeypatch.setenv(name, value)
  _forget_clients()
  yield environment(gcs_url)
  _forget_clients()


def _forget_clients() -> None:
  """epath decides once per process whether gs:// goes through TensorFlow
  and keeps one gcsfs client (both functools caches), made with the
  variables of their time; drop them."""
  # pylint: disable=g-import-not-at-top,protected-access
  from etils.epath import backend
  from etils.epath import gpath
  import gcsfs
  gpath._is_tf_installed.cache_clear()
  backend.fsspec_backend._get_filesystem.cache_clear()
  gcsfs.GCSFileSystem.clear_instance_cache()


def forget_listings() -> None:
  """Drops gcsfs's cached directory listings (made before another process
  wrote to the bucket)."""
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  backend.fsspec_backend._get_filesystem('gs').invalidate_cache()  # pylint: disable=protected-access


def list_objects(url: str, prefix: str) -> list[str]:
  """Names of the objects under `prefix` in `BUCKET`, straight from the API."""
  import json  # pylint: disable=g-import-not-at-top
  names, token = [], ''
  while True:
    query = f'prefix={prefix}' + (f'&pageToken={token}' if token else '')
    with urllib.request.urlopen(
        f'{url}/storage/v1/b/{BUCKET}/o?{query}', timeout=10) as response:
      page = json.load(response)
    names += [item['name'] for item in page.get('items', [])]
    token = page.get('nextPageToken')
    if not token:
      return sorted(names)
