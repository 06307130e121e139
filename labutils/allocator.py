"""Keep freed tensor memory in the process, so that CPU training does not pay for fresh pages at every step.

glibc's malloc, the C allocator of most Linux systems, hands large blocks back to the operating system when
they are freed. A training step frees and reallocates its activations, gradients and optimizer temporaries, so
the next step maps them again and takes a page fault for every 4 KiB page it touches. On a 2-core CPU that was
about half of a training step of the small encoder with augmentation, and a fifth of the classic encoder's.
CPU tuning guides for deep learning (AMD's ZenDNN guide, for example) suggest swapping in TCMalloc or jemalloc
for this reason. Raising glibc's two thresholds has the same effect here and needs no extra library.
"""

from __future__ import annotations

import ctypes
import sys

# Parameter numbers of mallopt(3), from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest mmap threshold that mallopt(3) documents for 64-bit systems. Larger blocks are still mapped one by one.
MMAP_THRESHOLD = 32 * 1024 * 1024
# Freed memory at the top of the heap goes back to the system only above this size (2 GiB), so in practice it stays.
TRIM_THRESHOLD = 2**31 - 1


def reuse_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks of up to 32 MiB for reuse, and return whether both settings took.

    The process then keeps the memory of its largest step after the step ends instead of returning it, so its
    resident size stays at its peak. Results do not change: only where tensors live does. On macOS and Windows
    it does nothing and returns False.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # mallopt returns 0 for a setting it rejects. NOTE: only glibc has been tried, so how other Linux C libraries
    # treat these glibc parameter numbers is untested.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
