"""Forward + backward time of course.lora.LoRALinear against PEFT's lora.Linear (run by hand).

    .venv/bin/python benchmarks/lora_vs_peft.py [--repeats 30] [--threads 1]

For each layer size both layers get the same base weight, the same r, alpha and
factors, and the same input (a batch of 8 x 128 tokens). Timings are interleaved
(course, PEFT, course, PEFT, ...) so that load from other processes hits both
alike; the median of each is reported with the ratio course / PEFT. The course's
layer should be no slower: ratio <= 1.05.
"""

from __future__ import annotations

import copy

import peft
import torch
from layer_timing import main
from torch import nn

from course.lora import LoRALinear

SIZES = [(576, 576), (576, 1536), (2048, 2048)]


def _peft_linear(base: nn.Linear, r: int, alpha: float) -> nn.Module:
    holder = nn.ModuleDict({"target": base})
    peft.inject_adapter_in_model(peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["target"]), holder)
    return holder["target"]


def pair(n_in: int, n_out: int, r: int, tokens: tuple[int, int]):
    """The course's layer and PEFT's on the same base weight and factors, and an input for both."""
    torch.manual_seed(0)
    base = nn.Linear(n_in, n_out)
    ours = LoRALinear(copy.deepcopy(base), r, 2 * r)
    theirs = _peft_linear(copy.deepcopy(base), r, 2 * r)
    with torch.no_grad():
        ours.lora_B.weight.normal_()
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
    x = torch.randn(*tokens, n_in, requires_grad=True)
    return ours, theirs, x


if __name__ == "__main__":
    main(__doc__, SIZES, pair, target=1.05)  # the timing harness: layer_timing.py
