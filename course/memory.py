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
import gc
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["peak_memory", "cpu_peak_supported", "tensor_bytes", "resident_bytes", "memory_growth"]

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


# ---------------------------------------------------------------------------
# A model's size, and the memory in use now (notebook 07)
# ---------------------------------------------------------------------------


def tensor_bytes(model) -> int:
    """Bytes held by a model's parameters and buffers (each shared tensor once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def resident_bytes(device=None) -> int:
    """Memory in use now: allocated CUDA memory on a GPU, else the process's resident set size."""
    device = torch.device(device) if device is not None else _default_device()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    import psutil  # a dependency of accelerate, which TRL needs

    return psutil.Process().memory_info().rss


def memory_growth(make):
    """``(make(), bytes)``: what ``make()`` returns and how much the memory in use grew while it ran.

    On a GPU the allocator's count (exact); on the CPU the resident set size, which counts a
    model's weights once they have been read (run a forward pass inside ``make``).
    """
    gc.collect()
    before = resident_bytes()
    result = make()
    gc.collect()
    return result, resident_bytes() - before


def _default_device():
    from course.device import default_device

    return default_device()
