"""Device and dtype policy, in one place (notebook 00).

The course runs on a laptop CPU, on Colab's T4 (float16, no bfloat16), on A100/L4/H100
(bfloat16) and on Apple silicon (mps). Every notebook asks this module rather than
deciding for itself. ``COURSE_DEVICE`` and ``COURSE_DTYPE`` override the choices.
"""

from __future__ import annotations

import os

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
    - cpu and mps: float32. Measured on the course's CPU, which has native bfloat16
      (AVX512-BF16), a LoRA training step on the base model (batch 16) was only 1.3x
      faster in bfloat16, and greedy answers to 32 questions 2.1x slower
      (``benchmarks/cpu_dtype.py``), so the CPU keeps float32.

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


def describe() -> str:
    """One line: device, dtype and thread count, for the notebooks' environment report."""
    device = default_device()
    extra = ""
    if device.type == "cuda":
        extra = f" ({torch.cuda.get_device_name(device)})"
    elif device.type == "cpu":
        extra = f" ({torch.get_num_threads()} threads)"
    return f"{device.type}{extra}, base model dtype {str(default_dtype(device)).removeprefix('torch.')}"
