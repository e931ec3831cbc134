"""Device and dtype policy, in one place (notebook 00).

The course runs on a laptop CPU, on Colab's T4 (float16, no bfloat16), on A100/L4/H100
(bfloat16) and on Apple silicon (mps). Every notebook asks this module rather than
deciding for itself. ``COURSE_DEVICE`` and ``COURSE_DTYPE`` override the choices.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> torch.device:
    """``COURSE_DEVICE`` if set, else cuda, then mps, then cpu."""
    name = os.environ.get("COURSE_DEVICE")
    if name:
        try:
            return torch.device(name)
        except RuntimeError:
            raise ValueError(f"COURSE_DEVICE={name!r} is not a device torch knows; use cpu, cuda or mps.") from None
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _forced_dtype() -> torch.dtype | None:
    name = os.environ.get("COURSE_DTYPE")
    if not name:
        return None
    if name not in DTYPES:
        raise ValueError(f"COURSE_DTYPE={name!r} is not one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def default_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """The dtype to hold the frozen base model in on ``device``; ``COURSE_DTYPE`` overrides it.

    - cuda: bfloat16 from compute capability 8.0 (A100, L4, H100), float16 below (T4, V100).
      (``torch.cuda.is_bf16_supported()`` is not asked: it counts emulation, which is slow.)
    - cpu: float32, decided by what this processor does (``cpu_bfloat16``). Where bfloat16 is
      emulated (AVX2-only x86, for example) its matrix products are over a hundred times slower
      than float32's. Where it is native (AVX512-BF16 or AMX), ``benchmarks/cpu_dtype.py`` on an
      AMD EPYC with AVX512-BF16 measured a LoRA training step (batch 16) 1.3x faster in bfloat16
      and greedy answers to 32 questions 2.1x slower; every notebook both trains and generates,
      so float32 there too. Run the benchmark to see your own processor's figures.
    - mps: float32.

    Trainable adapter weights stay in float32 in any case (``course.lora.adapter_dtype``).
    """
    forced = _forced_dtype()
    if forced is not None:
        return forced
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    return torch.float32


def base_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a loaded model's frozen base weights are held in: read from the model, not decided again.

    ``default_dtype`` decides how to *load* a base model; once it is loaded (by the course, by TRL,
    by a learner with ``dtype=`` of their own, 4-bit with a compute dtype) everything that follows
    (autocast, loss scaling, reloading a merged copy) asks the model. The floating-point dtype that
    holds most of the parameters that do not train (adapters may be float32 beside a half-precision
    base; 4-bit weights are not floating point); float32 when every parameter trains (a full
    fine-tune, which computes in its own dtype) or there are none.
    """
    sizes: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    return max(sizes, key=sizes.get) if sizes else torch.float32


@dataclass(frozen=True)
class CPUBFloat16:
    """Whether this CPU multiplies bfloat16 matrices natively, and how that was found out."""

    native: bool
    how: str

    def __str__(self) -> str:
        return f"bfloat16 {'native' if self.native else 'emulated'} on this CPU ({self.how})"


def cpu_model() -> str:
    """The processor's model name (``lscpu``'s "Model name"), for reports and saved timings."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("model name", "Model name")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _matmul_ratio(size: int = 512, repeats: int = 5) -> float:
    """Best bfloat16 time over best float32 time for a ``size`` square matrix product, interleaved
    so that a busy machine slows both alike."""
    a = {dtype: torch.randn(size, size, generator=torch.Generator().manual_seed(0)).to(dtype)
         for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(a, float("inf"))
    for _ in range(repeats + 1):  # the first round warms up and is not counted
        for dtype, m in a.items():
            start = time.perf_counter()
            m @ m
            best[dtype] = min(best[dtype], time.perf_counter() - start) if _ else float("inf")
    return best[torch.bfloat16] / best[torch.float32]


@functools.cache
def cpu_bfloat16() -> CPUBFloat16:
    """Does this CPU compute bfloat16 natively? ``COURSE_CPU_BFLOAT16=native|emulated`` forces the answer.

    Otherwise it is measured, in under a second: a 512x512 bfloat16 matrix product
    against the same in float32. Native bfloat16 (AVX512-BF16, AMX, Arm's BF16) runs it at
    least as fast as float32; emulated bfloat16 (AVX2-only x86) over ten times slower (a
    hundred times, measured on an AVX2-only AMD EPYC). The flags the kernel reports are
    named beside the measurement, never used instead of it: a flag says what the processor
    could do, the measurement what this torch build does with it.
    """
    forced = os.environ.get("COURSE_CPU_BFLOAT16")
    if forced:
        if forced not in {"native", "emulated"}:
            raise ValueError(f"COURSE_CPU_BFLOAT16={forced!r}: use native or emulated (or unset it to measure).")
        return CPUBFloat16(forced == "native", "forced by COURSE_CPU_BFLOAT16")
    ratio = _matmul_ratio()
    flags = sorted(_cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})
    named = f"; flags {', '.join(flags)}" if flags else "; no bfloat16 flag reported"
    return CPUBFloat16(ratio < 4.0, f"bfloat16 matmul {ratio:.2g}x float32's time{named}")


def describe() -> str:
    """One line: device, dtype and thread count, for the notebooks' environment report."""
    device = default_device()
    extra = ""
    if device.type == "cuda":
        extra = f" ({torch.cuda.get_device_name(device)})"
    elif device.type == "cpu":
        extra = f" ({cpu_model()}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
    return f"{device.type}{extra}, base model dtype {str(default_dtype(device)).removeprefix('torch.')}"
