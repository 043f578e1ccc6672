"""The entry points' glibc malloc settings and re-execution (host_memory)."""

import subprocess
import sys
import textwrap

import pytest

from perceiver_jax.perf import host_memory
from tests import helpers

_KEEP = ':'.join(host_memory.KEEP_FREED)


@pytest.mark.parametrize('env, accelerator, expected', [
    ({}, False, 'keep'),
    ({}, True, 'huge_pages'),
    ({'PERCEIVER_JAX_MALLOC': 'auto'}, True, 'huge_pages'),
    ({'PERCEIVER_JAX_MALLOC': ''}, False, 'keep'),
    ({'PERCEIVER_JAX_MALLOC': 'Keep'}, True, 'keep'),
    ({'PERCEIVER_JAX_MALLOC': 'huge_pages'}, False, 'huge_pages'),
    ({'PERCEIVER_JAX_MALLOC': 'system'}, False, 'system'),
    ({'PERCEIVER_JAX_HUGE_PAGES': '0'}, False, 'system'),  # The older switch.
    ({'PERCEIVER_JAX_HUGE_PAGES': '1'}, False, 'keep'),
    ({'PERCEIVER_JAX_HUGE_PAGES': '0', 'PERCEIVER_JAX_MALLOC': 'keep'}, False,
     'keep'),
])
def test_malloc_mode(env, accelerator, expected):
  assert host_memory.malloc_mode(env, accelerator=accelerator) == expected


def test_malloc_mode_rejects_unknown_values():
  with pytest.raises(ValueError, match=r"PERCEIVER_JAX_MALLOC='kept'.*keep"):
    host_memory.malloc_mode({'PERCEIVER_JAX_MALLOC': 'kept'})


def test_has_accelerator(tmp_path, monkeypatch):
  assert not host_memory.has_accelerator({'JAX_PLATFORMS': 'cpu'})
  assert host_memory.has_accelerator({'JAX_PLATFORMS': 'cuda'})
  assert host_memory.has_accelerator({'JAX_PLATFORMS': 'cpu, tpu'})
  monkeypatch.setattr(host_memory, '_ACCELERATOR_NODES',
                      (str(tmp_path / 'nvidia[0-9]*'),))
  assert not host_memory.has_accelerator({})
  (tmp_path / 'nvidia0').touch()
  assert host_memory.has_accelerator({})
  assert not host_memory.has_accelerator({'JAX_PLATFORMS': 'cpu'})


@pytest.mark.parametrize('env, mode, thp, glibc, expected', [
    ({}, 'keep', 'madvise', (2, 35), _KEEP + ':glibc.malloc.hugetlb=1'),
    ({}, 'keep', 'always', (2, 39), _KEEP),  # Huge pages come unasked.
    ({}, 'keep', None, (2, 31), _KEEP),  # No hugetlb before glibc 2.35.
    ({}, 'keep', 'madvise', (2, 17), None),  # No tunables at all.
    ({}, 'huge_pages', 'madvise', (2, 35), 'glibc.malloc.hugetlb=1'),
    ({}, 'huge_pages', 'never', (2, 35), None),
    ({}, 'system', 'madvise', (2, 35), None),
    # The user's own tunables stay, and win over ours.
    ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, 'huge_pages', 'madvise',
     (2, 35), 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'),
    ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4:glibc.malloc.hugetlb=0'},
     'keep', 'madvise', (2, 35),
     'glibc.malloc.arena_max=4:glibc.malloc.hugetlb=0:'
     'glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776'),
    # Already complete: nothing to do (the re-executed process).
    ({'GLIBC_TUNABLES': _KEEP + ':glibc.malloc.hugetlb=1'}, 'keep', 'madvise',
     (2, 35), None),
])
def test_tunables_for(env, mode, thp, glibc, expected):
  assert host_memory.tunables_for(env, mode, thp_mode=thp,
                                  glibc=glibc) == expected


def test_requested_settings():
  keep = {'GLIBC_TUNABLES': _KEEP + ':glibc.malloc.hugetlb=1'}
  assert host_memory.huge_pages_requested(keep)
  assert host_memory.keeps_freed_memory(keep)
  assert not host_memory.huge_pages_requested(
      {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'})
  assert not host_memory.keeps_freed_memory(
      {'GLIBC_TUNABLES': 'glibc.malloc.mmap_max=0'})
  assert not host_memory.huge_pages_requested({})
  assert not host_memory.keeps_freed_memory({})


@pytest.mark.parametrize('text, mode', [
    ('always [madvise] never\n', 'madvise'),
    ('[always] madvise never\n', 'always'),
    ('always madvise [never]\n', 'never'),
    ('garbled\n', None),
])
def test_transparent_huge_pages_mode(tmp_path, monkeypatch, text, mode):
  path = tmp_path / 'enabled'
  path.write_text(text)
  monkeypatch.setattr(host_memory, '_THP_MODE_FILE', str(path))
  assert host_memory.transparent_huge_pages_mode() == mode
  monkeypatch.setattr(host_memory, '_THP_MODE_FILE', str(tmp_path / 'none'))
  assert host_memory.transparent_huge_pages_mode() is None


# Records each run of itself, then applies the settings on a kernel said to
# be in 'madvise' mode (so the test does not depend on this machine's).
_SCRIPT = textwrap.dedent("""
    import os, sys
    from perceiver_jax.perf import host_memory
    with open(sys.argv[1], 'a') as f:
      f.write(os.environ.get('GLIBC_TUNABLES', '-') + ' ' +
              ' '.join(sys.argv[2:]) + '\\n')
    host_memory.transparent_huge_pages_mode = lambda: 'madvise'
    host_memory.reexec_with_malloc_settings()
    print('done', flush=True)
""")


def _run_script(tmp_path, check=True, **env):
  """Runs _SCRIPT in a fresh interpreter: (the process, the runs it logged)."""
  script = tmp_path / 'script.py'
  script.write_text(_SCRIPT)
  log = tmp_path / 'log.txt'
  out = subprocess.run(
      [sys.executable, '-u', str(script), str(log), '--flag=a b', 'x'],
      env=helpers.environ_without_malloc_settings(**env),
      capture_output=True, text=True, check=check, cwd=helpers.ROOT)
  return out, log.read_text().splitlines()


_needs_glibc = pytest.mark.skipif(
    (host_memory.glibc_version() or (0, 0)) < (2, 35),
    reason='needs Linux with glibc >= 2.35')


@_needs_glibc
def test_reexecutes_once_with_the_tunables_and_the_same_arguments(tmp_path):
  out, runs = _run_script(tmp_path, PERCEIVER_JAX_MALLOC='keep',
                          GLIBC_TUNABLES='glibc.malloc.arena_max=4')
  assert out.stdout == 'done\n'  # Printed by the second run only.
  assert runs == [
      'glibc.malloc.arena_max=4 --flag=a b x',
      'glibc.malloc.arena_max=4:glibc.malloc.mmap_max=0:'
      'glibc.malloc.trim_threshold=1099511627776:glibc.malloc.hugetlb=1 '
      '--flag=a b x']


@pytest.mark.parametrize('env', [{'PERCEIVER_JAX_MALLOC': 'system'},
                                 {'PERCEIVER_JAX_HUGE_PAGES': '0'}])
def test_system_malloc_runs_once(tmp_path, env):
  out, runs = _run_script(tmp_path, **env)
  assert out.stdout == 'done\n'
  assert runs == ['- --flag=a b x']


def test_a_bad_setting_stops_at_start(tmp_path):
  out, runs = _run_script(tmp_path, check=False, PERCEIVER_JAX_MALLOC='fast')
  assert out.returncode != 0
  assert "PERCEIVER_JAX_MALLOC='fast'" in out.stderr
  assert 'done' not in out.stdout and len(runs) == 1


# Allocates and frees 256 MB on one thread, then allocates it again on
# another (XLA:CPU's executor threads do so at every step) and prints the
# page faults of that second allocation.
_REUSE = textwrap.dedent("""
    import resource, threading
    import numpy as np
    n = 64 * 2**20
    def fill():
      np.ones(n, np.float32)  # Touches every page, then frees them.
    t = threading.Thread(target=fill); t.start(); t.join()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = threading.Thread(target=fill); t.start(); t.join()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _reuse_faults(tunables):
  out = subprocess.run([sys.executable, '-c', _REUSE],
                       env=helpers.environ_without_malloc_settings(
                           GLIBC_TUNABLES=tunables),
                       capture_output=True, text=True, check=True)
  return int(out.stdout)


@pytest.mark.skipif((host_memory.glibc_version() or (0, 0)) < (2, 26),
                    reason='needs Linux with glibc >= 2.26')
def test_keep_reuses_freed_memory_without_page_faults():
  keep = _reuse_faults(_KEEP)
  system = _reuse_faults('')
  # Without arena_max=1 the second thread's arena maps the block afresh.
  no_arena_max = _reuse_faults(':'.join(host_memory.KEEP_FREED[:2]))
  # 256 MB is 65,536 pages of 4 KiB, 128 of 2 MiB (numpy asks for those).
  assert keep < 50 < min(system, no_arena_max), (keep, system, no_arena_max)
