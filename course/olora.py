"""OLoRA: LoRA initialised from a QR decomposition of the pretrained weight (notebook 04).

Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models".
Plain LoRA starts with ``B = 0``. OLoRA starts from the weight itself: with the thin
QR decomposition ``W = Q R`` (Q has orthonormal columns, R is upper triangular)::

    B0 = Q[:, :r]      (out, r), orthonormal columns
    A0 = R[:r]         (r, in),  the coordinates of W along those columns

and, so that the layer still computes ``W x`` at step 0, it changes the base weight
to the residual::

    W_res = W - s B0 A0            s = alpha / r,  so  W_res + s B0 A0 = W

``olora_init`` is that maths on one matrix, the same numbers PEFT's
``init_lora_weights="olora"`` puts in a layer (QR in float32, as PEFT does).
``OLoRALinear`` is ``LoRALinear`` with that initialisation, so that
``inject_lora(model, targets, r, alpha, layer=OLoRALinear)`` gives a whole model
OLoRA (and changes its base weights).

Because the base weights changed, a trained OLoRA adapter only works on its own
residual base, and no other adapter works on that base. After training (A1, B1)::

    W_res + s B1 A1 = W + s (B1 A1 - B0 A0) = W + s [B1 | -B0] [A1 ; A0]

so the trained adapter is a plain LoRA adapter of rank 2r on the original W, with
alpha doubled so that the scaling stays (``olora_to_lora``; PEFT's
``save_pretrained(path_initial_model_for_weight_conversion=...)`` computes the same).
``to_lora`` does it for a whole model, ready for ``save_peft_adapter``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from course.lora import LoRALayer, LoRALinear, lora_layers
from course.peft_format import register_variant
from course.surgery import swap_in

__all__ = ["OLoRALinear", "olora_init", "olora_to_lora", "to_lora"]


def olora_init(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OLoRA's initial factors and the residual base weight (notebook 04; Büyükakyüz 2024, section 3).

    ``Q, R = qr(W)`` in float32; ``A = R[:r]`` (r, in), ``B = Q[:, :r]`` (out, r),
    ``residual = W - scaling * B @ A``; all three cast back to the dtype of ``weight``.
    These are exactly the numbers PEFT's layer holds: over a float16 / bfloat16 base PEFT
    keeps A and B in float32, but only after they went through the base dtype once.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("olora_init takes a weight matrix (out_features, in_features), "
                         f"got {type(weight).__name__} of shape {tuple(getattr(weight, 'shape', ()))}.")
    if not weight.is_floating_point():
        raise TypeError(f"OLoRA needs a floating-point weight (float32, float16, bfloat16), got {weight.dtype}. "
                        "For a quantised (4-bit / 8-bit) base use PEFT's init_lora_weights='olora', which "
                        "de-quantises the weight first (notebook 04, section 6).")
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(weight.shape):
        raise ValueError(f"r must be an integer from 1 to min(out, in) = {min(weight.shape)} (the number of "
                         f"columns of Q in the thin QR decomposition), got {r!r}.")
    W = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    Q, R = torch.linalg.qr(W)  # thin QR: Q (out, k), R (k, in), k = min(out, in)
    B, A = Q[:, :r].contiguous(), R[:r].contiguous()
    residual = W - scaling * B @ A  # PEFT's order: (scaling * B) @ A
    return A.to(weight.dtype), B.to(weight.dtype), residual.to(weight.dtype)


def olora_to_lora(A0: torch.Tensor, B0: torch.Tensor, A1: torch.Tensor,
                  B1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A trained OLoRA adapter as a plain LoRA adapter of rank 2r on the original weight (notebook 04).

    ``(A0, B0)`` are the initial factors (``olora_init``), ``(A1, B1)`` the trained ones.
    Returns ``A = [A1 ; A0]`` (2r, in) and ``B = [B1 | -B0]`` (out, 2r), so that
    ``B @ A = B1 @ A1 - B0 @ A0``: the change training made to ``W``. Use it with
    ``alpha`` doubled, so that ``alpha / r`` stays (``alpha * sqrt(2)`` with rsLoRA). The
    order is PEFT's (``LoraModel.subtract_mutated_init``), so the tensors are PEFT's too.
    """
    if A0.shape != A1.shape or B0.shape != B1.shape:
        raise ValueError(f"The initial and trained adapters must have the same shapes: A0 {tuple(A0.shape)}, "
                         f"A1 {tuple(A1.shape)}, B0 {tuple(B0.shape)}, B1 {tuple(B1.shape)}.")
    if A0.dim() != 2 or B0.dim() != 2 or A0.shape[0] != B0.shape[1]:
        raise ValueError(f"A is (r, in) and B is (out, r): got A {tuple(A0.shape)} and B {tuple(B0.shape)}.")
    return torch.cat([A1, A0], dim=0), torch.cat([B1, -B0], dim=1)


class OLoRALinear(LoRALinear):
    """``LoRALinear`` with OLoRA's initialisation (notebook 04): A, B from the QR of W, W -> W_res.

    Constructing it changes ``base.weight`` to ``W - scaling * B0 A0``, so the layer's
    output equals the base layer's at step 0 (up to float rounding). The initial factors
    stay in the buffers ``initial_A`` / ``initial_B`` for ``to_lora``. Saved with
    ``save_peft_adapter``, the config says ``init_lora_weights="olora"``: PEFT then redoes
    the QR (and the change of W) on a pristine base when it loads the adapter.
    """

    peft_flags = {"init_lora_weights": "olora"}
    changes_base_weight = True  # load_peft_adapter puts the weights back if loading fails

    def __init__(self, base: nn.Linear, r: int, alpha: float, *, dropout: float = 0.0,
                 merge_on_eval: bool = False, rslora: bool = False):
        try:
            super().__init__(base, r, alpha, dropout=dropout, merge_on_eval=merge_on_eval, rslora=rslora)
        except ValueError as exc:
            raise ValueError(f"{exc} Note that OLoRA changes the base weight of every layer it is built on: "
                             "after a failed inject_lora, load the base model again.") from None

    def init_factors(self) -> None:
        base = self.base_layer
        A, B, residual = olora_init(base.weight, self.r, self.scaling)
        like = self._like()
        self.lora_A = nn.Linear(base.in_features, self.r, bias=False, **like)
        self.lora_B = nn.Linear(self.r, base.out_features, bias=False, **like)
        with torch.no_grad():
            self.lora_A.weight.copy_(A)
            self.lora_B.weight.copy_(B)
            base.weight.copy_(residual)  # OLoRA changes the base weight: W -> W - s B0 A0
        self.register_buffer("initial_A", A.detach().clone().to(**like))
        self.register_buffer("initial_B", B.detach().clone().to(**like))


register_variant(OLoRALinear)  # load_peft_adapter reads init_lora_weights="olora" adapters into it


def _olora_layers(model: nn.Module) -> dict[str, OLoRALinear]:
    layers = {name: m for name, m in lora_layers(model).items() if isinstance(m, OLoRALinear)}
    if not layers:
        raise ValueError("The model has no OLoRA layers: build them with "
                         "inject_lora(model, targets, r, alpha, layer=OLoRALinear).")
    return layers


def to_lora(model: nn.Module, base: nn.Module) -> nn.Module:
    """Put ``model``'s trained OLoRA adapter into ``base`` as plain LoRA of rank 2r (notebook 04).

    ``base`` is a pristine copy of the base model (never OLoRA-initialised). Every
    ``OLoRALinear`` of ``model`` becomes, at the same name in ``base``, a ``LoRALinear``
    of rank 2r, alpha doubled (times sqrt(2) with rsLoRA) and the factors of
    ``olora_to_lora``: ``base`` then computes what ``model`` computes, and
    ``save_peft_adapter(base, directory)`` writes an adapter that any pristine base loads,
    next to other adapters. ``model`` is not changed; ``base`` is changed and returned.
    Refuses rsLoRA with layers of different r or alpha (PEFT's rank_pattern /
    alpha_pattern), which PEFT's own conversion does not support either.
    """
    layers = _olora_layers(model)
    if any(m.rslora for m in layers.values()) and (len({m.r for m in layers.values()}) > 1
                                                  or len({m.alpha for m in layers.values()}) > 1):
        raise ValueError(
            "Cannot convert OLoRA with rsLoRA when the layers have different r or alpha (PEFT's rank_pattern / "
            "alpha_pattern): PEFT's conversion, save_pretrained(path_initial_model_for_weight_conversion=...), "
            "does not support that combination, and the course's follows it. Train with one r and alpha for "
            "every layer, or without rsLoRA (rslora=False)."
        )
    factors = {}
    for name, layer in layers.items():  # check every layer before changing anything in `base`
        try:
            target = base.get_submodule(name)
        except AttributeError:
            raise ValueError(f"`base` has no module {name!r}: pass a copy of the same base model.") from None
        if isinstance(target, LoRALayer) or not isinstance(target, nn.Linear):
            raise ValueError(f"{name} in `base` is a {type(target).__name__}, not a plain nn.Linear: pass a "
                             "pristine copy of the base model, e.g. course.models.load_base_model().")
        if target.weight.shape != layer.base_layer.weight.shape:
            raise ValueError(f"{name} has shape {tuple(target.weight.shape)} in `base` but "
                             f"{tuple(layer.base_layer.weight.shape)} in the model: another base model?")
        if layer.merged:
            raise ValueError(f"{name} is merged: call unmerge() on the model's layers before converting.")
        if 2 * layer.r > min(target.in_features, target.out_features):
            raise ValueError(f"{name}: the converted adapter would have rank 2r = {2 * layer.r}, more than "
                             f"min(in, out) = {min(target.in_features, target.out_features)}. Merge the "
                             "adapter into the weights instead (layer.merge()).")
        with torch.no_grad():
            A0, B0 = layer.initial_A, layer.initial_B
            mutated = layer.base_layer.weight.float()
            restored = mutated + (layer.scaling * B0.float()) @ A0.float()
            pristine = target.weight.detach().float().to(mutated.device)
            if (pristine - mutated).norm() < 0.5 * (pristine - restored).norm():
                raise ValueError(f"{name} in `base` holds OLoRA's residual weight, not the original one: "
                                 "`base` was OLoRA-initialised. Pass a pristine copy of the base model, "
                                 "e.g. course.models.load_base_model().")
            factors[name] = olora_to_lora(A0, B0, *layer.lora_factors())

    def build(name: str, target: nn.Module) -> LoRALinear:
        layer, (A, B) = layers[name], factors[name]
        alpha = layer.alpha * (math.sqrt(2) if layer.rslora else 2)
        plain = LoRALinear(target, 2 * layer.r, alpha, dropout=float(getattr(layer.dropout, "p", 0.0)),
                           rslora=layer.rslora)
        with torch.no_grad():
            plain.lora_A.weight.copy_(A)
            plain.lora_B.weight.copy_(B)
        return plain

    return swap_in(base, factors, build)
