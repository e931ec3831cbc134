"""Device and dtype policy, in one place (notebook 00).

The course runs on a laptop CPU, on Colab's T4 (fp16, no bf16), on A100/L4 (bf16)
and on Apple silicon (mps). Every notebook asks this module rather than deciding
for itself.
"""

from __future__ import annotations

import os

import torch


def default_device() -> torch.device:
    """``COURSE_DEVICE`` if set, else cuda, then mps, then cpu."""
    name = os.environ.get("COURSE_DEVICE")
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """The dtype to hold the frozen base model in on ``device``.

    cpu and mps: float32 (half precision is slow or unsupported for training there).
    cuda: bfloat16 where the card supports it (A100, L4, H100), else float16 (T4).
    Trainable adapter weights stay in float32 in any case (see ``course.train``).
    """
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
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
