"""What a LoRA adapter is made of: its weight change and its parameter count (notebook 01).

LoRA (Hu et al., 2021, eq. 3) adds ``scaling * B @ A`` to a frozen weight ``W``
(out x in), with ``A`` (r x in), ``B`` (out x r) and ``scaling = lora_alpha / r``.
These are the reference answers of ``check.delta_weight`` and
``check.lora_parameter_count``.
"""

from __future__ import annotations

import torch
from torch import nn

from course.surgery import as_targets, matches_target


def delta_weight(peft_model, module_name: str) -> torch.Tensor:
    """``scaling * B @ A`` of the active adapter in the LoRA layer ``module_name`` (out x in).

    ``module_name`` is a name from ``peft_model.named_modules()``.
    """
    layer = peft_model.get_submodule(module_name)
    name = peft_model.active_adapter
    A = layer.lora_A[name].weight  # (r, in)
    B = layer.lora_B[name].weight  # (out, r)
    return layer.scaling[name] * B @ A


def lora_parameter_count(model: nn.Module, r: int, target_modules) -> int:
    """Parameters a LoRA of rank ``r`` adds to ``model``: ``r * (in + out)`` per targeted Linear.

    A module is targeted when its name is one of ``target_modules`` or ends in ``"." + target``
    (PEFT's rule for a list of names, ``course.surgery.matches_target``: ``"q_proj"`` and
    ``"self_attn.q_proj"`` both pick every query projection). LoRA adds no bias.
    """
    targets = as_targets(target_modules)
    return sum(
        r * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and matches_target(name, targets)
    )
