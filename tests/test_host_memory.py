"""The entry points' re-execution with huge-page malloc (host_memory)."""

import os
import subprocess
import sys
import textwrap

import pytest

from perceiver_jax import host_memory


@pytest.mark.parametrize('env, expected', [
    ({}, 'glibc.malloc.hugetlb=1'),
    ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'},
     'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'),
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, None),  # The user's choice.
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}, None),  # Already there.
    ({'PERCEIVER_JAX_HUGE_PAGES': '0'}, None),  # Opted out.
    ({'PERCEIVER_JAX_HUGE_PAGES': '1'}, 'glibc.malloc.hugetlb=1'),
])
def test_tunables_with_huge_pages(env, expected):
  assert host_memory.tunables_with_huge_pages(env) == expected


def test_huge_pages_requested():
  assert host_memory.huge_pages_requested(
      {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'})
  assert not host_memory.huge_pages_requested(
      {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'})
  assert not host_memory.huge_pages_requested({})


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


# Records each run of itself, then asks for huge pages on a kernel said to
# be in 'madvise' mode (so the test does not depend on this machine's).
_SCRIPT = textwrap.dedent("""
    import os, sys
    from perceiver_jax import host_memory
    with open(sys.argv[1], 'a') as f:
      f.write(os.environ.get('GLIBC_TUNABLES', '-') + ' ' +
              ' '.join(sys.argv[2:]) + '\\n')
    host_memory.transparent_huge_pages_mode = lambda: 'madvise'
    host_memory.reexec_with_huge_pages()
    print('done', flush=True)
""")


def _run_script(tmp_path, **env):
  """Runs _SCRIPT in a fresh interpreter: (its stdout, the runs it logged)."""
  script = tmp_path / 'script.py'
  script.write_text(_SCRIPT)
  log = tmp_path / 'log.txt'
  base = {k: v for k, v in os.environ.items()
          if k not in ('GLIBC_TUNABLES', host_memory.OPT_OUT)}
  out = subprocess.run(
      [sys.executable, '-u', str(script), str(log), '--flag=a b', 'x'],
      env={**base, **env}, capture_output=True, text=True, check=True,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return out.stdout, log.read_text().splitlines()


@pytest.mark.skipif(not host_memory._glibc_has_tunable(),
                    reason='needs Linux with glibc >= 2.35')
def test_reexecutes_once_with_the_tunable_and_the_same_arguments(tmp_path):
  stdout, runs = _run_script(tmp_path,
                             GLIBC_TUNABLES='glibc.malloc.arena_max=4')
  assert stdout == 'done\n'  # Printed by the second run only.
  assert runs == ['glibc.malloc.arena_max=4 --flag=a b x',
                  'glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1 '
                  '--flag=a b x']


def test_opting_out_runs_once(tmp_path):
  stdout, runs = _run_script(tmp_path, PERCEIVER_JAX_HUGE_PAGES='0')
  assert stdout == 'done\n'
  assert runs == ['- --flag=a b x']
