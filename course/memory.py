"""Peak memory of one call, counting only what is live at the peak (notebook 05).

``peak_memory(fn, device)`` runs ``fn()`` and returns ``(result, bytes)``: how far memory rose
above where it stood before the call, at its highest point.

* CUDA: the caching allocator's own counters (``torch.cuda.max_memory_allocated``), which count
  live tensors only.
* CPU (Linux with glibc): the kernel's high-water mark of the resident set (``VmHWM`` in
  ``/proc/self/status``), reset before the call by writing 5 to ``/proc/self/clear_refs``.
  glibc keeps freed heap blocks for reuse, so a freed block would stay in the resident set and
  the mark would count it; during the call ``mallopt(M_MMAP_THRESHOLD, 64 KiB)`` (the in-process
  form of ``MALLOC_MMAP_THRESHOLD_=65536``) gives every block of 64 KiB or more its own mapping,
  returned to the system when freed, and ``malloc_trim(0)`` first hands back the free pages glibc
  holds, so that reusing them counts too. The mark is then the most memory live at once. Afterwards
  the thresholds are set to 32 MiB (mmap) and 64 MiB (trim), where glibc's own adaptive
  thresholds end up for big blocks, so later work (training) is not slowed by fresh mappings.
  Call ``fn`` once beforehand: a first call also maps code and allocator pools. The kernel's
  RSS counters are batched per CPU, so a block freed just before the next one is allocated can
  still count: expect an error of up to one such block (tests/test_memory.py measured it).
* elsewhere (macOS, Windows, mps): ``None``, with the result.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["peak_memory", "cpu_peak_supported"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_libc = None


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def cpu_peak_supported() -> bool:
    """Whether the CPU peak can be measured here (Linux, glibc's ``mallopt``, ``clear_refs`` writable)."""
    global _libc
    if _libc is not None:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc has them; musl does not)
        Path("/proc/self/clear_refs").write_text("5")
        _status("VmHWM")
    except (OSError, AttributeError, RuntimeError):
        return False
    _libc = libc
    return True


@contextmanager
def _freed_blocks_returned():
    _libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    _libc.malloc_trim(0)  # free pages kept by glibc would be reused without counting
    try:
        yield
    finally:
        _libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
        _libc.mallopt(_M_TRIM_THRESHOLD, 64 * 1024 * 1024)


def peak_memory(fn, device=None):
    """``(fn(), peak bytes above the starting point)``; bytes is None where it cannot be measured."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - start
    if device.type != "cpu" or not cpu_peak_supported():
        return fn(), None
    with _freed_blocks_returned():
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here
        start = _status("VmRSS")
        result = fn()
        peak = _status("VmHWM") - start
    return result, max(0, peak)
