"""Transparent huge pages for host malloc: XLA:CPU's per-step buffers.

XLA:CPU allocates an executable's buffers (its temp space: 490 MB for a
bench_a training step) with malloc at every call and frees them after it.
glibc serves blocks over its mmap threshold (32 MiB at most) with fresh
mappings and unmaps them when freed, so every step faults its working set
in again, 4 KiB at a time: ~159k page faults per bench_a training step,
15-20% of its time on a 2-core CPU. With glibc's tunable
`glibc.malloc.hugetlb=1` (glibc >= 2.35), malloc asks the kernel for
transparent huge pages (2 MiB): about a thousand faults per step, and the
same resident memory.

glibc reads tunables once, when a process starts. The entry points
(scripts/train.py, evaluate.py, benchmark.py) therefore call
`reexec_with_huge_pages()` first: on Linux with glibc, where the kernel
gives huge pages to those who ask (THP mode 'madvise'), it replaces the
process with the same command under the tunable, once. A GLIBC_TUNABLES
that already sets glibc.malloc.hugetlb is left as it is;
PERCEIVER_JAX_HUGE_PAGES=0 opts out. Accelerator memory is not affected
(it has its own allocators); host-side buffers are.

Where it hurts: huge pages that stay free for a second or two can be taken
back by a virtual machine's host, and faulting them in again is slow. On
this project's VMs (most likely virtio-balloon free page reporting, which
hands free blocks of 2 MiB and up to the host), the kernel spent 1 s per
step zeroing pages for the same number of faults that cost 0.09 s in a
process running only our steps. A training loop reuses its freed buffers
at the next step, well within that; a process that alternates two
frameworks' steps does not (`benchmark.py --compare` runs without huge
pages for this reason). Measured directly (mmap 490 MB, touch every page,
munmap, repeat): with huge pages 46-48 ms when the memory had been freed
just before, 48-412 ms after 0.7 s idle and 340-1,020 ms after 3 s; with
4 KiB pages 185-275 ms in all three cases. Even in a training loop the
kernel sometimes hands out blocks that sat free long enough: one bench_a
fusion took 54-175 ms across steps that takes 50 ms alone.
"""

import os
import platform
import sys
from typing import Mapping, Optional

TUNABLE = 'glibc.malloc.hugetlb'
OPT_OUT = 'PERCEIVER_JAX_HUGE_PAGES'
_THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'


def _tunable_entries(env: Mapping[str, str]) -> list[str]:
  """GLIBC_TUNABLES as its 'name=value' entries."""
  return [e for e in env.get('GLIBC_TUNABLES', '').split(':') if e]


def huge_pages_requested(env: Mapping[str, str] = os.environ) -> bool:
  """Whether this environment asks malloc for transparent huge pages."""
  return f'{TUNABLE}=1' in _tunable_entries(env)


def tunables_with_huge_pages(env: Mapping[str, str]) -> Optional[str]:
  """The GLIBC_TUNABLES value to re-execute with, or None to keep `env`.

  None when the user opted out or already chose a glibc.malloc.hugetlb
  value; otherwise the existing tunables with `glibc.malloc.hugetlb=1`
  appended.
  """
  if env.get(OPT_OUT, '1') == '0':
    return None
  entries = _tunable_entries(env)
  if any(e.split('=', 1)[0] == TUNABLE for e in entries):
    return None
  return ':'.join(entries + [f'{TUNABLE}=1'])


def transparent_huge_pages_mode() -> Optional[str]:
  """The kernel's THP mode ('always', 'madvise', 'never'), or None."""
  try:
    with open(_THP_MODE_FILE) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find('['), text.find(']')  # e.g. "always [madvise] never"
  return text[start + 1:end] if 0 <= start < end else None


def _glibc_has_tunable() -> bool:
  if not sys.platform.startswith('linux'):
    return False
  libc, version = platform.libc_ver()
  try:
    major_minor = tuple(int(x) for x in version.split('.')[:2])
  except ValueError:
    return False
  return libc == 'glibc' and major_minor >= (2, 35)


def reexec_with_huge_pages() -> None:
  """Re-executes this process with malloc backed by huge pages, if useful.

  Returns (doing nothing) when not on Linux with glibc >= 2.35, when the
  kernel's THP mode is not 'madvise' ('always' needs no request, 'never'
  grants none), or when
  `tunables_with_huge_pages` says to keep the environment. Otherwise it does
  not return: the same interpreter runs the same command line again, with
  the tunable set, which makes the second run return here at once.
  """
  if not _glibc_has_tunable():
    return
  # 'always' gives malloc huge pages already; 'never' gives none at all.
  if transparent_huge_pages_mode() != 'madvise':
    return
  tunables = tunables_with_huge_pages(os.environ)
  if tunables is None:
    return
  env = dict(os.environ, GLIBC_TUNABLES=tunables)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)
