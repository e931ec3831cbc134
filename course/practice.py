"""Choosing and using adapters in practice (notebook 09): memory of a fine-tuning method, LoRA under a budget.

``training_memory`` counts the bytes that full fine-tuning, LoRA and QLoRA keep for the *parameters*:
weights, gradients and AdamW's state. Activations are a separate term, not counted here: they grow
with batch size and sequence length, not with the method (notebook 09 measures them with
``course.memory.peak_memory``). The rules, each one checked against a measurement in
tests/test_check_training_memory.py:

* weights: every base parameter in ``dtype``; LoRA adds the adapter's ``n_trainable`` in
  ``adapter_dtype``. QLoRA keeps the ``n_quantised`` base weights (the ``nn.Linear`` weights of the
  decoder blocks) in 4-bit NF4: half a byte each, plus bitsandbytes' quantisation constants, one
  float32 absmax per block of 64 weights (``bitsandbytes.functional.quantize_4bit``, 0.50.2: ``blocksize``
  defaults to 64 in functional.py lines 917-918, the absmax is ``torch.empty((blocks,), dtype=torch.float32)``
  in _ops.py line 234), so 0.5 + 4/64 bytes per weight. With double quantisation
  (``bnb_4bit_use_double_quant``, functional.py lines 938-940) the absmax values are quantised
  again to one byte each in blocks of 256, with one float32 absmax per such block: 0.5 + 1/64 +
  4/(64 * 256) bytes per weight. (The 16-value NF4 code and the offset, a few bytes per tensor, are
  left out.)
* gradients: one per *trainable* parameter, in its dtype; frozen weights get none.
* optimiser: ``torch.optim.AdamW`` keeps two states per trainable parameter, ``exp_avg`` and
  ``exp_avg_sq``, each ``torch.zeros_like(param)``: float32 for float32 parameters (the adapters here,
  and full fine-tuning in float32). Frozen weights have no state. (Its ``step`` counter, one
  float32 scalar per parameter tensor, is left out.)

``lora_parameter_count`` and ``largest_lora_rank`` answer "which rank fits my budget for these
targets?": a LoRA layer on an ``nn.Linear(in, out)`` adds ``r * (in + out)`` parameters (A is
(r, in), B is (out, r)), on an ``nn.Embedding(num, dim)`` ``r * (num + dim)``; ``bias="lora_only"``
also trains the biases of the targeted layers (PEFT's option of that name). Targets are picked by
PEFT's rule for a list of names, ``course.surgery.matches_target``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from course.surgery import targeted_names

__all__ = ["METHODS", "TrainingMemory", "largest_lora_rank", "lora_parameter_count", "nf4_bytes_per_weight",
           "training_memory"]

METHODS = ("full", "lora", "qlora")
NF4_BLOCKSIZE = 64  # bitsandbytes' default blocksize for 4-bit weights
DOUBLE_QUANT_BLOCKSIZE = 256  # the blocksize of the second quantisation, of the absmax values


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes kept for the parameters while training: weights, gradients, optimiser state (no activations)."""

    weights: float
    gradients: float
    optimizer_state: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer_state


def _bytes(dtype: torch.dtype) -> int:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"Expected a torch.dtype such as torch.float32 or torch.bfloat16, got {dtype!r}.")
    return torch.empty((), dtype=dtype).element_size()


def nf4_bytes_per_weight(double_quant: bool = False) -> float:
    """Bytes per 4-bit NF4 weight with its quantisation constants: 0.5 + 4/64, or 0.5 + 1/64 + 4/(64*256)."""
    if double_quant:
        return 0.5 + 1 / NF4_BLOCKSIZE + 4 / (NF4_BLOCKSIZE * DOUBLE_QUANT_BLOCKSIZE)
    return 0.5 + 4 / NF4_BLOCKSIZE


def training_memory(method: str, n_params: int, n_trainable: int, n_quantised: int = 0,
                    dtype: torch.dtype = torch.float32, adapter_dtype: torch.dtype = torch.float32,
                    double_quant: bool = False) -> TrainingMemory:
    """Bytes of weights, gradients and AdamW state for ``method`` (notebook 09; activations not included).

    ``n_params``: the base model's parameters (each shared tensor once); ``n_trainable``: the ones
    trained, all of them for ``"full"`` (in ``dtype``), the adapter's for ``"lora"`` and ``"qlora"``
    (in ``adapter_dtype``); ``n_quantised``: for ``"qlora"``, how many of the base parameters are kept
    in 4-bit NF4 (the rest stay in ``dtype``). With t = trainable bytes per parameter::

        weights   = base + adapter,  base = n_params * |dtype|  (QLoRA: quantised ones at 0.5 + 4/64)
        gradients = n_trainable * t
        optimizer = 2 * n_trainable * t   (AdamW's exp_avg and exp_avg_sq)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}.")
    for name, value in (("n_params", n_params), ("n_trainable", n_trainable), ("n_quantised", n_quantised)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a whole number of parameters (0 or more), got {value!r}.")
    if method == "full" and n_trainable > n_params:
        raise ValueError(f"Full fine-tuning trains the model's own parameters: n_trainable ({n_trainable}) "
                         f"cannot exceed n_params ({n_params}).")
    if n_quantised > n_params or (n_quantised and method != "qlora"):
        raise ValueError(f"n_quantised ({n_quantised}) counts the 4-bit base weights of QLoRA: at most n_params "
                         f"({n_params}), and 0 for {method!r}.")
    base = (n_params - n_quantised) * _bytes(dtype) + n_quantised * nf4_bytes_per_weight(double_quant)
    if method == "full":
        per_trainable, adapter = _bytes(dtype), 0
    else:
        per_trainable = _bytes(adapter_dtype)
        adapter = n_trainable * per_trainable
    return TrainingMemory(weights=base + adapter, gradients=n_trainable * per_trainable,
                          optimizer_state=2 * n_trainable * per_trainable)


# ---------------------------------------------------------------------------
# LoRA under a parameter budget
# ---------------------------------------------------------------------------

BIAS_MODES = ("none", "lora_only")


def _target_layers(model: nn.Module, target_modules) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    layers = {name: modules[name] for name in targeted_names(model, target_modules)}
    if not layers:
        raise ValueError(f"target_modules {target_modules!r} matches no module of the model: use names from "
                         "model.named_modules(), such as 'q_proj' or 'self_attn.q_proj'.")
    other = [f"{name} ({type(m).__name__})" for name, m in layers.items() if not isinstance(m, (nn.Linear, nn.Embedding))]
    if other:
        raise ValueError(f"LoRA here adapts nn.Linear and nn.Embedding layers; target_modules also picks "
                         f"{', '.join(other[:3])}. Name the layers inside, e.g. 'q_proj'.")
    return layers


def _sizes(layers: dict[str, nn.Module], bias: str) -> tuple[int, int]:
    """(parameters per unit of rank, parameters independent of the rank)."""
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {', '.join(map(repr, BIAS_MODES))}, got {bias!r}.")
    per_rank = fixed = 0
    for m in layers.values():
        if isinstance(m, nn.Linear):
            per_rank += m.in_features + m.out_features
        else:
            per_rank += m.num_embeddings + m.embedding_dim
        if bias == "lora_only" and getattr(m, "bias", None) is not None:
            fixed += m.bias.numel()
    return per_rank, fixed


def lora_parameter_count(model: nn.Module, target_modules, rank: int, bias: str = "none") -> int:
    """Trainable parameters of LoRA at ``rank`` on ``target_modules`` (notebook 09): sum of r (in + out).

    Equal to PEFT's ``get_peft_model(model, LoraConfig(r=rank, target_modules=..., bias=bias))
    .get_nb_trainable_parameters()[0]``; ``bias="lora_only"`` adds the targeted layers' biases.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a whole number, 1 or more, got {rank!r}.")
    per_rank, fixed = _sizes(_target_layers(model, target_modules), bias)
    return rank * per_rank + fixed


def largest_lora_rank(model: nn.Module, target_modules, budget: int, bias: str = "none") -> int:
    """The largest rank r whose LoRA on ``target_modules`` trains at most ``budget`` parameters; 0 if none does.

    The count is ``r * S + b`` (S = sum of in + out over the targets, b their biases with
    ``bias="lora_only"``), so r = floor((budget - b) / S), a budget met exactly included (notebook 09).
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget must be a whole number of parameters (0 or more), got {budget!r}.")
    per_rank, fixed = _sizes(_target_layers(model, target_modules), bias)
    return max(0, (budget - fixed) // per_rank)
