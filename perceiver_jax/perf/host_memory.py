"""glibc malloc settings for XLA:CPU's per-step host buffers.

XLA:CPU allocates an executable's buffers (its temp space: 490 MB for a
bench_a training step) with malloc at every call and frees them after it.
glibc serves blocks over its mmap threshold (32 MiB at most) with fresh
mappings and unmaps them when freed, so every step faults its working set
in again, 4 KiB at a time: ~159k page faults per bench_a training step,
15-20% of its time on a 2-core CPU. scripts/benchmark.py therefore calls
`reexec_with_malloc_settings()` first: glibc reads its tunables once, at
process start, so the process is replaced by the same command with
GLIBC_TUNABLES set, once. Training and evaluation never re-execute
themselves; docs/performance.md gives the GLIBC_TUNABLES a user can set
for them. The setting is PERCEIVER_JAX_MALLOC:

- 'huge_pages': `glibc.malloc.hugetlb=1` (glibc >= 2.35; only where the
  kernel hands out transparent huge pages on request, THP mode 'madvise'):
  malloc asks for 2 MiB pages, about a thousand faults per step, the same
  resident memory. Freed buffers still go back to the kernel at every step.
- 'keep': huge pages as above, and freed memory stays in the process:
  `mmap_max=0` (no block gets its own mapping), a 1 TiB `trim_threshold`
  (the heap is never given back) and `arena_max=1`. The last is needed
  because glibc serves a block too large for a thread's own arena (64 MiB
  heaps) with a fresh mapping even when mmap_max is 0; with one arena every
  thread allocates from the main heap. After the first steps no page is
  faulted in at all, and the kernel's share of the CPU during bench_b
  training falls from 8-16% to under 1%, for more resident memory: the heap
  keeps its high-water mark and its fragments (docs/performance.md, "Kept
  memory", has the measurements).
- 'system': glibc's defaults.
- 'auto' (default): 'keep' on hosts without an accelerator
  (`has_accelerator`), where XLA's buffers are host memory; 'huge_pages'
  elsewhere, where host malloc serves the input pipeline's many threads
  and one arena would make them queue for its lock.

Tunables already in GLIBC_TUNABLES are the user's choice and are never
changed; PERCEIVER_JAX_HUGE_PAGES=0 (the older switch) means 'system'.
Accelerator memory has its own allocators and is not affected.

Why freed huge pages are slow to get back: huge pages that stay free for a
second or two can be taken back by a virtual machine's host, and faulting
them in again is slow. On this project's VMs (most likely virtio-balloon
free page reporting, which hands free blocks of 2 MiB and up to the host),
the kernel spent 1 s per step zeroing pages for the same number of faults
that cost 0.09 s in a process running only our steps. Measured directly
(mmap 490 MB, touch every page, munmap, repeat): with huge pages 46-48 ms
when the memory had been freed just before, 48-412 ms after 0.7 s idle and
340-1,020 ms after 3 s; with 4 KiB pages 185-275 ms in all three cases.
'keep' avoids this altogether; `benchmark.py --compare` (two frameworks
taking turns) runs under glibc's defaults for both.
"""

import glob
import os
import platform
import sys
from typing import Mapping, Optional

MODE_VARIABLE = 'PERCEIVER_JAX_MALLOC'
MODES = ('auto', 'keep', 'huge_pages', 'system')
OLD_OPT_OUT = 'PERCEIVER_JAX_HUGE_PAGES'
HUGE_PAGES = 'glibc.malloc.hugetlb=1'
KEEP_FREED = ('glibc.malloc.mmap_max=0',
              'glibc.malloc.trim_threshold=1099511627776',
              'glibc.malloc.arena_max=1')
_THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'
# Device nodes of NVIDIA GPUs and of TPUs (accel: v2-v4; vfio: v5e and later).
_ACCELERATOR_NODES = ('/dev/nvidiactl', '/dev/nvidia[0-9]*', '/dev/accel[0-9]*',
                      '/dev/vfio/[0-9]*')


def _tunable_entries(env: Mapping[str, str]) -> list[str]:
  """GLIBC_TUNABLES as its 'name=value' entries."""
  return [e for e in env.get('GLIBC_TUNABLES', '').split(':') if e]


def _name(entry: str) -> str:
  return entry.split('=', 1)[0]


def huge_pages_requested(env: Mapping[str, str] = os.environ) -> bool:
  """Whether this environment asks malloc for transparent huge pages."""
  return HUGE_PAGES in _tunable_entries(env)


def keeps_freed_memory(env: Mapping[str, str] = os.environ) -> bool:
  """Whether this environment keeps freed memory in the process."""
  return set(KEEP_FREED) <= set(_tunable_entries(env))


def has_accelerator(env: Mapping[str, str] = os.environ) -> bool:
  """Whether JAX will find a GPU or TPU here, judged without importing it.

  JAX_PLATFORMS decides where set ('cpu' alone: no); otherwise the device
  nodes of NVIDIA GPUs and TPUs.
  """
  platforms = [p.strip() for p in env.get('JAX_PLATFORMS', '').split(',')
               if p.strip()]
  if platforms:
    return any(p != 'cpu' for p in platforms)
  return any(glob.glob(pattern) for pattern in _ACCELERATOR_NODES)


def malloc_mode(env: Mapping[str, str] = os.environ, *,
                accelerator: Optional[bool] = None) -> str:
  """PERCEIVER_JAX_MALLOC resolved to 'keep', 'huge_pages' or 'system'.

  Raises:
    ValueError: a value not in MODES.
  """
  if MODE_VARIABLE not in env and env.get(OLD_OPT_OUT) == '0':
    return 'system'
  mode = env.get(MODE_VARIABLE, '').strip().lower() or 'auto'  # '' = unset.
  if mode not in MODES:
    raise ValueError(f'{MODE_VARIABLE}={env[MODE_VARIABLE]!r}: expected one '
                     f'of {", ".join(MODES)}.')
  if mode == 'auto':
    if accelerator is None:
      accelerator = has_accelerator(env)
    return 'huge_pages' if accelerator else 'keep'
  return mode


def tunables_for(env: Mapping[str, str], mode: str, *,
                 thp_mode: Optional[str],
                 glibc: tuple[int, int]) -> Optional[str]:
  """The GLIBC_TUNABLES value for `mode`, or None if `env` needs no change.

  Args:
    env: the environment; its GLIBC_TUNABLES entries are kept, and a tunable
      it names already is not set again.
    mode: 'keep', 'huge_pages' or 'system'.
    thp_mode: the kernel's transparent-huge-page mode; huge pages are asked
      for only in 'madvise' mode ('always' needs no request, 'never' grants
      none).
    glibc: glibc's (major, minor) version: hugetlb needs 2.35, the others
      2.26.
  """
  wanted = []
  if mode == 'keep' and glibc >= (2, 26):
    wanted += KEEP_FREED
  if mode in ('keep', 'huge_pages') and thp_mode == 'madvise' and (
      glibc >= (2, 35)):
    wanted.append(HUGE_PAGES)
  entries = _tunable_entries(env)
  named = {_name(e) for e in entries}
  added = [w for w in wanted if _name(w) not in named]
  return ':'.join(entries + added) if added else None


def transparent_huge_pages_mode() -> Optional[str]:
  """The kernel's THP mode ('always', 'madvise', 'never'), or None."""
  try:
    with open(_THP_MODE_FILE) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find('['), text.find(']')  # e.g. "always [madvise] never"
  return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> Optional[tuple[int, int]]:
  """(major, minor) of the glibc this process runs on; None if another."""
  if not sys.platform.startswith('linux'):
    return None
  libc, version = platform.libc_ver()
  try:
    major_minor = tuple(int(x) for x in version.split('.')[:2])
  except ValueError:
    return None
  return major_minor if libc == 'glibc' and len(major_minor) == 2 else None


def reexec_with_malloc_settings() -> None:
  """Re-executes this process under PERCEIVER_JAX_MALLOC's glibc tunables.

  Returns (doing nothing) when not on Linux with glibc, or when
  `tunables_for` says the environment needs no change (which is the case in
  the re-executed process). Otherwise it does not return: the same
  interpreter runs the same command line again, with the tunables set.

  Raises:
    ValueError: PERCEIVER_JAX_MALLOC is not one of MODES.
  """
  mode = malloc_mode(os.environ)
  glibc = glibc_version()
  if glibc is None:
    return
  tunables = tunables_for(os.environ, mode,
                          thp_mode=transparent_huge_pages_mode(), glibc=glibc)
  if tunables is None:
    return
  env = dict(os.environ, GLIBC_TUNABLES=tunables)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)
