"""LoRA from scratch, interchangeable with PEFT (notebook 02).

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes a pretrained
weight W0 and learns a low-rank change to it. Equation 3 of the paper::

    h = W0 x + (alpha / r) B A x        A: (r, in),  B: (out, r),  r << min(in, out)

A starts random and B starts at zero, so at step 0 the layer is exactly the base layer, yet both
factors get gradients once B moves. Only r * (in + out) numbers are trained instead of in * out.
After training, ``merge()`` folds ``(alpha / r) B A`` into W0 so that inference costs nothing extra.

This module holds one small class per layer kind, in the spirit of microsoft's ``loralib/layers.py``,
with PEFT's names (``base_layer``, ``lora_A``, ``lora_B``, ``scaling``, ``get_delta_weight``). The
relatives of LoRA in later chapters are small subclasses of ``LoRALinear`` that override a hook rather
than copy the class (as PEFT's ``LoraVariant`` does): ``lora_factors`` (NOLA generates A and B),
``adapt`` (DoRA's forward), ``merged_weight`` / ``unmerged_weight`` (DoRA's merge). Adapters move to
and from PEFT's file format with ``save_peft_adapter`` and ``load_peft_adapter`` (``course.peft_format``).

Every layer class takes ``(base, r, alpha)`` positionally and its other options by keyword
only (``LoRALinear(base, 8, 16, dropout=0.1)``): an option never lands in the wrong slot.

Precision: over a float16 or bfloat16 base the factors are kept in float32, as PEFT keeps them;
the input is cast to the factors' dtype, the LoRA branch is added to the base output in float32
and the sum is cast back, in PEFT's order of operations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from course import peft_format  # the file format: part of this interface
from course.peft_format import load_peft_adapter, save_peft_adapter
from course.surgery import adapter_layers as lora_layers  # the one rule for what counts as a layer
from course.surgery import as_targets, is_adapted, matches_target, plain_modules, swap_in

__all__ = [
    "LoRALayer", "LoRALinear", "LoRAEmbedding", "LoRAConv2d", "MergedLoRALinear", "adapter_dtype",
    "inject_lora", "inject_lora_linear", "lora_class_for", "matches_target", "lora_layers",
    "mark_only_lora_as_trainable", "lora_state_dict", "save_peft_adapter", "load_peft_adapter",
]

HALF = (torch.float16, torch.bfloat16)


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype LoRA factors are made in: float32 over a half-precision base (as PEFT does), else the base's."""
    return torch.float32 if base_dtype in HALF else base_dtype


# ---------------------------------------------------------------------------
# The layers
# ---------------------------------------------------------------------------


class LoRALayer(nn.Module):
    """What every LoRA layer shares: the frozen base layer, the scaling, merge and unmerge.

    A subclass creates its factors and defines ``forward`` and ``get_delta_weight()``
    (the change ``scaling * B A`` in the shape of the base weight). A method whose merge
    is not additive (DoRA) overrides ``merged_weight`` and ``unmerged_weight``.
    """

    def __init__(self, base_layer: nn.Module, base_type: type, r: int, alpha: float,
                 dropout: float, merge_on_eval: bool, rslora: bool):
        super().__init__()
        if not isinstance(base_layer, base_type):
            raise TypeError(
                f"{type(self).__name__} wraps an nn.{base_type.__name__}, got {type(base_layer).__name__}. "
                "Use LoRALinear for nn.Linear, LoRAEmbedding for nn.Embedding, LoRAConv2d for nn.Conv2d."
            )
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"The rank r must be a positive integer (1, 2, 4, 8, ...), got {r!r}.")
        if not alpha > 0:
            raise ValueError(f"alpha must be a positive number (often r or 2 * r), got {alpha!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout is a probability in [0, 1), got {dropout!r}.")
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)  # W0 stays frozen: only A and B learn
        self.r, self.alpha = r, alpha
        # Eq. 3 scales by alpha / r; rsLoRA (Kalajdzievski 2023) uses alpha / sqrt(r) instead.
        self.rslora = rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merge_on_eval = merge_on_eval
        self.merged = False

    def _like(self) -> dict:
        """Device and dtype for new factors: the base weight's device, ``adapter_dtype`` of its dtype."""
        weight = self.base_layer.weight
        return {"device": weight.device, "dtype": adapter_dtype(weight.dtype)}

    def get_delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Hook: the base weight with the adapter folded in (LoRA: ``W0 + scaling * B A``).

        The sum is formed in the adapter's float32 and rounded once to the base dtype, as
        PEFT's default merge does (rounding the change first would round twice).
        """
        return (weight + self.get_delta_weight()).to(weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Hook: the inverse of ``merged_weight`` (LoRA: subtract the same ``scaling * B A``)."""
        return (weight - self.get_delta_weight()).to(weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight; the forward is then the base layer alone. Idempotent."""
        if not self.merged:
            weight = self.base_layer.weight
            weight.copy_(self.merged_weight(weight))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter out of the base weight again (exact up to float rounding). Idempotent."""
        if self.merged:
            weight = self.base_layer.weight
            weight.copy_(self.unmerged_weight(weight))
            self.merged = False

    def train(self, mode: bool = True):
        """With ``merge_on_eval``: merge on ``eval()``, unmerge on ``train()`` (as loralib does)."""
        super().train(mode)
        if self.merge_on_eval:
            self.unmerge() if mode else self.merge()
        return self

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


class LoRALinear(LoRALayer):
    """``h = W0 x + b + (alpha / r) B A dropout(x)`` around a frozen ``nn.Linear`` (eq. 3; notebook 02).

    ``lora_A`` is an ``nn.Linear(in, r)`` (weight A of shape (r, in)), Kaiming-uniform
    like PEFT's default; ``lora_B`` is an ``nn.Linear(r, out)`` (weight B of shape
    (out, r)), zero, so the layer starts as the base layer. Dropout is on the LoRA
    branch only: the base path sees x unchanged.

    Hooks for the methods built on it: ``lora_factors()`` gives (A, B) as matrices,
    ``adapt(x, result)`` turns the base output into the adapted output.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, *, dropout: float = 0.0,
                 merge_on_eval: bool = False, rslora: bool = False):
        super().__init__(base, nn.Linear, r, alpha, dropout, merge_on_eval, rslora)
        if r > min(base.in_features, base.out_features):
            raise ValueError(
                f"r={r} is larger than min(in_features, out_features) = "
                f"{min(base.in_features, base.out_features)}: B A can never have a higher rank than that, "
                "so the extra parameters would be wasted. Choose a smaller r."
            )
        self.init_factors()

    def init_factors(self) -> None:
        """Create ``lora_A`` (random) and ``lora_B`` (zero). OLoRA and NOLA override this."""
        base = self.base_layer
        self.lora_A = nn.Linear(base.in_features, self.r, bias=False, **self._like())
        self.lora_B = nn.Linear(self.r, base.out_features, bias=False, **self._like())
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as matrices, (r, in) and (out, r)."""
        return self.lora_A.weight, self.lora_B.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:  # W0 already holds the adapter
            return result
        return self.adapt(self.dropout(x.to(self.compute_dtype())), result)

    def compute_dtype(self) -> torch.dtype:
        """Hook: the dtype the LoRA branch computes in, the factors' (NOLA answers without generating them)."""
        return self.lora_A.weight.dtype

    def adapt(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result + scaling * B A x``, added in the factors' dtype and cast back (PEFT's order)."""
        A, B = self.lora_factors()
        return (result + F.linear(F.linear(x, A), B) * self.scaling).to(result.dtype)

    def get_delta_weight(self) -> torch.Tensor:
        A, B = self.lora_factors()
        return (B @ A) * self.scaling

    def peft_state(self) -> dict[str, torch.Tensor]:
        """PEFT's tensor names for this layer, suffix -> the live tensor (``course.peft_format``)."""
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}


class LoRAEmbedding(LoRALayer):
    """LoRA on a frozen ``nn.Embedding`` (notebook 02), with PEFT's conventions.

    An embedding looks up row ``i`` of its weight (num_embeddings, dim), i.e. it
    multiplies a one-hot vector. ``lora_embedding_A`` (r, num_embeddings) is looked
    up the same way, then ``lora_embedding_B`` (dim, r) maps the r numbers to dim::

        h = W0[i] + scaling * B A[:, i]

    Here A starts at zero and B is normal(0, 1), the other way round from
    ``LoRALinear`` (as in loralib and PEFT); either way B A = 0 at the start.
    Like PEFT, no dropout: dropping entries of a one-hot input makes little sense.
    """

    def __init__(self, base: nn.Embedding, r: int, alpha: float, *, merge_on_eval: bool = False,
                 rslora: bool = False):
        super().__init__(base, nn.Embedding, r, alpha, 0.0, merge_on_eval, rslora)
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, base.num_embeddings, **self._like()))
        self.lora_embedding_B = nn.Parameter(torch.randn(base.embedding_dim, r, **self._like()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        base = self.base_layer
        after_A = F.embedding(x, self.lora_embedding_A.T, base.padding_idx, base.max_norm,
                              base.norm_type, base.scale_grad_by_freq, base.sparse)
        return (result + (after_A @ self.lora_embedding_B.T) * self.scaling).to(result.dtype)

    def get_delta_weight(self) -> torch.Tensor:
        # (num_embeddings, dim), the shape of the embedding weight: the transpose of B A.
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling

    def peft_state(self) -> dict[str, torch.Tensor]:
        """PEFT's tensor names for an embedding's factors (``course.peft_format``)."""
        return {"lora_embedding_A": self.lora_embedding_A, "lora_embedding_B": self.lora_embedding_B}


class LoRAConv2d(LoRALayer):
    """LoRA on a frozen ``nn.Conv2d`` (notebook 02), shaped as PEFT does it.

    ``lora_A`` is a convolution with the base's kernel, stride, padding and dilation
    but only r output channels; ``lora_B`` is a 1x1 convolution from r channels to
    the base's out_channels. Composing them is one convolution whose kernel is
    ``B A`` (contracted over r), so it merges into the base kernel. Only
    ``groups == 1`` is supported.
    """

    def __init__(self, base: nn.Conv2d, r: int, alpha: float, *, dropout: float = 0.0,
                 merge_on_eval: bool = False, rslora: bool = False):
        super().__init__(base, nn.Conv2d, r, alpha, dropout, merge_on_eval, rslora)
        if base.groups != 1:
            raise ValueError(f"LoRAConv2d supports groups=1 only, this convolution has groups={base.groups}.")
        like = self._like()
        self.lora_A = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding,
                                base.dilation, bias=False, padding_mode=base.padding_mode, **like)
        self.lora_B = nn.Conv2d(r, base.out_channels, 1, bias=False, **like)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        lora = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return (result + lora * self.scaling).to(result.dtype)

    def get_delta_weight(self) -> torch.Tensor:
        # B: (out, r, 1, 1), A: (r, in, kh, kw)  ->  (out, in, kh, kw)
        B = self.lora_B.weight[:, :, 0, 0]
        return torch.einsum("or,rikl->oikl", B, self.lora_A.weight) * self.scaling

    def peft_state(self) -> dict[str, torch.Tensor]:
        """PEFT's tensor names for this layer (``course.peft_format``): as for ``LoRALinear``."""
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}


class MergedLoRALinear(LoRALayer):
    """LoRA on a fused projection such as ``qkv = nn.Linear(d, 3 * d)`` (notebook 02).

    The output splits into ``len(enable_lora)`` equal parts; part i gets its own
    pair (A_i, B_i) when ``enable_lora[i]`` is true, nothing otherwise. With
    ``enable_lora=[True, False, True]`` only q and v adapt, exactly like separate
    ``LoRALinear`` layers on q and v (loralib's ``MergedLinear``). ``lora_A`` stacks
    the A_i, so x is multiplied once: its weight is (n * r, in), n = parts with
    LoRA; ``lora_B`` holds the B_i as one (n, out / parts, r) tensor.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, *, enable_lora: list[bool],
                 dropout: float = 0.0, merge_on_eval: bool = False, rslora: bool = False):
        super().__init__(base, nn.Linear, r, alpha, dropout, merge_on_eval, rslora)
        parts = len(enable_lora)
        if parts == 0 or base.out_features % parts:
            raise ValueError(f"enable_lora needs one flag per part and out_features ({base.out_features}) "
                             f"must split evenly into {parts} parts.")
        self.enabled = [i for i, on in enumerate(enable_lora) if on]
        if not self.enabled:
            raise ValueError("enable_lora is all False: no part would get LoRA. Use the plain nn.Linear.")
        self.part_size = base.out_features // parts
        like = self._like()
        self.lora_A = nn.Linear(base.in_features, len(self.enabled) * r, bias=False, **like)
        self.lora_B = nn.Parameter(torch.zeros(len(self.enabled), self.part_size, r, **like))
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        x = self.dropout(x.to(self.lora_A.weight.dtype))
        after_A = self.lora_A(x).unflatten(-1, (len(self.enabled), self.r))
        delta = torch.einsum("...nr,npr->...np", after_A, self.lora_B) * self.scaling
        parts = list(result.split(self.part_size, dim=-1))
        for n, i in enumerate(self.enabled):
            parts[i] = (parts[i] + delta[..., n, :]).to(result.dtype)
        return torch.cat(parts, dim=-1)

    def get_delta_weight(self) -> torch.Tensor:
        A = self.lora_A.weight.unflatten(0, (len(self.enabled), self.r))  # (n, r, in)
        per_part = torch.einsum("npr,nri->npi", self.lora_B, A) * self.scaling
        delta = self.lora_A.weight.new_zeros(self.base_layer.weight.shape)
        for n, i in enumerate(self.enabled):
            delta[i * self.part_size:(i + 1) * self.part_size] = per_part[n]
        return delta

    def peft_state(self) -> dict[str, torch.Tensor]:
        raise ValueError("A MergedLoRALinear cannot be saved as a PEFT adapter: PEFT has no fused layer. "
                         "Use separate q/k/v projections with LoRALinear.")


# ---------------------------------------------------------------------------
# Putting LoRA into a model
# ---------------------------------------------------------------------------

_LORA_FOR = {nn.Linear: LoRALinear, nn.Embedding: LoRAEmbedding, nn.Conv2d: LoRAConv2d}
for _base_type, _lora_class in _LORA_FOR.items():  # what load_peft_adapter builds for each kind of module
    peft_format.register_layer(_base_type, _lora_class)


def lora_class_for(module: nn.Module) -> type[LoRALayer] | None:
    """The course's LoRA class for a module (``LoRALinear`` for an ``nn.Linear``, ...), None if there is none."""
    for base_type, lora_class in _LORA_FOR.items():
        if isinstance(module, base_type):
            return lora_class
    return None


def inject_lora(model: nn.Module, target_modules, r: int, alpha: float, dropout: float = 0.0, *,
                layer=LoRALinear, **options) -> nn.Module:
    """Wrap every module whose name matches ``target_modules`` in a LoRA layer (notebook 02).

    A name matches a target when it is the target or ends in ``"." + target``
    (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``), as in PEFT.
    ``nn.Linear`` targets get ``layer(module, r, alpha, dropout=dropout, **options)``:
    ``LoRALinear`` by default, ``DoRALinear`` (notebook 03) or a learner's own class
    with the same signature; ``nn.Embedding`` and ``nn.Conv2d`` targets get
    ``LoRAEmbedding`` and ``LoRAConv2d``. Changes ``model`` in place and returns it; when
    any target fails (a rank too large for one layer, say) nothing changes. Other parameters
    keep their ``requires_grad``: call ``mark_only_lora_as_trainable`` to freeze them.
    """
    targets = as_targets(target_modules)
    modules = plain_modules(model)
    chosen = [name for name in modules if name and matches_target(name, targets)]
    if not chosen:
        names = sorted({name.rpartition(".")[2] for name, m in modules.items()
                        if name and lora_class_for(m) and not is_adapted(m)})
        raise ValueError(f"No module matches target_modules={targets}. Modules that LoRA can "
                         f"target here (nn.Linear, nn.Embedding, nn.Conv2d): {', '.join(names) or 'none'}.")
    for name in chosen:  # check them all before changing anything
        if is_adapted(modules[name]):
            raise ValueError(f"{name} already has LoRA; inject LoRA into a module once.")
        if lora_class_for(modules[name]) is None:
            raise TypeError(f"{name} is a {type(modules[name]).__name__}; LoRA here wraps nn.Linear, "
                            "nn.Embedding or nn.Conv2d. Target a more specific name.")
        if options and lora_class_for(modules[name]) is not LoRALinear:
            raise TypeError(f"{name} is an {type(modules[name]).__name__}: the options {sorted(options)} "
                            "are for the nn.Linear layer class only. Target nn.Linear modules only.")
    # Build every layer before swapping any in (all targets or none, OLoRA's base weights included).
    def build(name: str, module: nn.Module) -> nn.Module:
        lora_class = lora_class_for(module)
        if lora_class is LoRAEmbedding:
            return LoRAEmbedding(module, r, alpha)
        if lora_class is LoRALinear:
            return layer(module, r, alpha, dropout=dropout, **options)
        return lora_class(module, r, alpha, dropout=dropout)

    return swap_in(model, chosen, build, changes_base_weight=getattr(layer, "changes_base_weight", False))


def _check_bias_mode(bias: str) -> None:
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f'bias must be "none", "all" or "lora_only", got {bias!r}.')


def _lora_bias_names(model: nn.Module) -> set[str]:
    return {f"{name}.base_layer.bias" for name, m in model.named_modules()
            if isinstance(m, LoRALayer) and getattr(m.base_layer, "bias", None) is not None}


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> nn.Module:
    """Freeze everything but the LoRA parameters (those with ``lora_`` in their name).

    ``bias="all"`` also trains every bias; ``"lora_only"`` the biases of the layers
    that have LoRA. Returns ``model``.
    """
    _check_bias_mode(bias)
    lora_biases = _lora_bias_names(model)
    for name, p in model.named_parameters():
        is_bias = name.endswith("bias")
        p.requires_grad_("lora_" in name or (bias == "all" and is_bias)
                         or (bias == "lora_only" and name in lora_biases))
    return model


def inject_lora_linear(model: nn.Module, target_modules, r: int, alpha: float, dropout: float = 0.0, *,
                       layer=LoRALinear, **options) -> nn.Module:
    """Notebook 02's exercise 2: ``inject_lora`` on the ``nn.Linear`` modules only (a convolution called
    ``proj`` stays as it is), then ``mark_only_lora_as_trainable``, as PEFT's ``get_peft_model`` freezes."""
    targets = as_targets(target_modules)
    modules = plain_modules(model)
    chosen = [n for n, m in modules.items() if n and isinstance(m, nn.Linear) and matches_target(n, targets)]
    if not chosen:
        raise ValueError(f"No nn.Linear matches target_modules={targets} (inject_lora_linear adapts nn.Linear "
                         "only; inject_lora also takes nn.Embedding and nn.Conv2d).")
    swap_in(model, chosen, lambda name, module: layer(module, r, alpha, dropout=dropout, **options),
            changes_base_weight=getattr(layer, "changes_base_weight", False))  # all targets or none
    return mark_only_lora_as_trainable(model)


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """The part of ``model.state_dict()`` that LoRA trains: what to save (see ``bias`` above)."""
    _check_bias_mode(bias)
    lora_biases = _lora_bias_names(model)
    return {k: v for k, v in model.state_dict().items()
            if "lora_" in k or (bias == "all" and k.endswith("bias"))
            or (bias == "lora_only" and k in lora_biases)}
