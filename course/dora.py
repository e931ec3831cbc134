"""DoRA: a trained magnitude per row, LoRA on the direction (notebook 03).

Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", split every
pretrained weight into a magnitude and a direction::

    W0 = m0 * W0 / ||W0||_row,        m0 = ||W0||_row  (one number per output feature)

and fine-tune both: the magnitude ``m`` directly, the direction with LoRA (eq. 5)::

    W' = m * (W0 + s B A) / ||W0 + s B A||_row,        s = alpha / r

The paper writes weights as (in, out) and takes the norm of each column, ``||.||_c``;
in PyTorch's (out, in) layout those columns are rows: one norm per output feature,
taken over the input dimension. Section 4.3 treats the norm as a constant in backward
(it is detached): the gradient then flows through ``m`` and ``B A`` only, which saves
memory at no cost in accuracy in the paper's experiments.

``DoRALinear`` is ``LoRALinear`` with three hooks overridden (as PEFT's
``DoraLinearVariant`` does for its LoRA layer): ``init_factors`` adds the magnitude,
``adapt`` computes the forward from the base layer's output, ``merged_weight`` /
``unmerged_weight`` merge. The magnitude is stored under PEFT's name,
``lora_magnitude_vector`` (so that ``mark_only_lora_as_trainable``, which trains the
``lora_`` parameters, trains it, and the PEFT file format needs no renaming), and is
also reachable as ``.magnitude``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from course.lora import LoRALinear
from course.peft_format import register_variant

__all__ = ["DoRALinear", "row_norm"]


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """``||W||_row``: the L2 norm of each row of an (out, in) weight, over the input dimension; shape (out,)."""
    return torch.linalg.vector_norm(weight, dim=1)


class DoRALinear(LoRALinear):
    """``h = m / ||W0 + s B A||_row * (W0 + s B A) x + b`` around a frozen ``nn.Linear`` (eq. 5; notebook 03).

    Same arguments as ``LoRALinear``. The magnitude starts at the row norms of the base
    weight, so the layer starts as the base layer (B = 0). The bias is not scaled.
    ``merge()`` writes ``W'`` into the base weight and ``unmerge()`` restores ``W0``.
    """

    peft_flags = {"use_dora": True}  # what save_peft_adapter writes into adapter_config.json

    def init_factors(self) -> None:
        super().init_factors()  # lora_A random, lora_B zero
        # m0 = ||W0 + s B A||_row = ||W0||_row while B = 0, as PEFT initialises it.
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm())
        # The factor m / ||W0 + s B A|| that merge() multiplied in, for unmerge() (see merged_weight).
        self.register_buffer("merge_factor", None, persistent=False)

    @property
    def magnitude(self) -> nn.Parameter:
        """The trained magnitude vector m, shape (out_features,)."""
        return self.lora_magnitude_vector

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """``||W0 + s B A||_row`` in the adapter's dtype, computed without gradient: detached (section 4.3)."""
        A, B = self.lora_factors()
        weight = self.base_layer.weight.to(A.dtype)
        return row_norm(torch.addmm(weight, B, A, alpha=self.scaling))  # W0 + s B A in one product

    def adapt(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The DoRA output from the base output ``result = W0 x + b`` (x already dropped out).

        With ``f = m / ||W0 + s B A||_row``: ``h = f (W0 x + s B A x) + b``, written as PEFT
        writes it, ``result + (f - 1) W0 x + f s B A x``, so that the costly ``W0 x`` is
        reused rather than computed again. Only while dropout is active does the base path
        need ``W0`` on the dropped-out ``x``, which costs a second product (as in PEFT).
        """
        A, B = self.lora_factors()
        factor = self.magnitude / self.weight_norm()
        if self.training and not isinstance(self.dropout, nn.Identity):
            plain = F.linear(x, self.base_layer.weight.to(x.dtype))
        else:
            bias = self.base_layer.bias
            plain = result if bias is None else result - bias
        lora = F.linear(F.linear(x, A), B)
        # (f - 1) W0 x + (f s) B A x: the scaling is folded into the (out,) vector, one pass fewer.
        return torch.addcmul(torch.addcmul(result, factor - 1, plain), factor * self.scaling, lora).to(result.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W' = f (W0 + s B A)``, rounded once to the base dtype; remembers ``f`` for ``unmerge``.

        Every row of ``W'`` has norm ``|m|`` whatever ``W0`` was, so the norm of ``W0 + s B A``
        cannot be read back from the merged weight: ``unmerge`` needs the factor kept here.
        """
        combined = weight.to(self.magnitude.dtype) + self.get_delta_weight()
        self.merge_factor = (self.magnitude / row_norm(combined)).detach()
        return (self.merge_factor[:, None] * combined).to(weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W0 = W' / f - s B A``, dividing out the very factor ``merge`` multiplied in."""
        if self.merge_factor is None:
            raise RuntimeError("This DoRALinear has no merge factor: it was not merged by merge().")
        restored = weight.to(self.merge_factor.dtype) / self.merge_factor[:, None] - self.get_delta_weight()
        self.merge_factor = None
        return restored.to(weight.dtype)

    def peft_state(self) -> dict[str, torch.Tensor]:
        """PEFT's tensor names for this layer (``course.peft_format``)."""
        A, B = self.lora_factors()
        return {"lora_A.weight": A, "lora_B.weight": B, "lora_magnitude_vector": self.lora_magnitude_vector}


register_variant(DoRALinear)  # load_peft_adapter reads use_dora=True adapters into DoRALinear
