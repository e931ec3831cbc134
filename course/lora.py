"""LoRA from scratch, interchangeable with PEFT (notebook 02).

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models")
freezes a pretrained weight W0 and learns a low-rank change to it. Equation 3
of the paper::

    h = W0 x + (alpha / r) B A x        A: (r, in),  B: (out, r),  r << min(in, out)

A starts random and B starts at zero, so at step 0 the layer is exactly the base
layer, yet both factors get gradients once B moves. Only r * (in + out) numbers
are trained instead of in * out. After training, ``merge()`` folds
``(alpha / r) B A`` into W0 so that inference costs nothing extra.

This module holds one small class per layer kind, in the spirit of microsoft's
``loralib/layers.py``, with PEFT's names (``base_layer``, ``lora_A``, ``lora_B``,
``scaling``, ``get_delta_weight``) so that adapters move both ways:
``save_peft_adapter`` writes a directory that ``peft.PeftModel.from_pretrained``
loads, and ``load_peft_adapter`` reads one that PEFT wrote.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "LoRALinear",
    "LoRAEmbedding",
    "LoRAConv2d",
    "MergedLoRALinear",
    "inject_lora",
    "mark_only_lora_as_trainable",
    "lora_state_dict",
    "save_peft_adapter",
    "load_peft_adapter",
]


# ---------------------------------------------------------------------------
# The layers
# ---------------------------------------------------------------------------


class LoRALayer(nn.Module):
    """What every LoRA layer shares: the frozen base layer, the scaling, merge and unmerge.

    A subclass creates ``lora_A`` and ``lora_B``, and defines ``forward`` and
    ``get_delta_weight()`` (the change ``scaling * B A`` in the shape of the base weight).
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

    def get_delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + scaling * B A. Afterwards the forward is the base layer alone. Idempotent."""
        if not self.merged:
            self.base_layer.weight += self.get_delta_weight().to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take ``scaling * B A`` out of W0 again (exact up to float rounding). Idempotent."""
        if self.merged:
            self.base_layer.weight -= self.get_delta_weight().to(self.base_layer.weight.dtype)
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
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 merge_on_eval: bool = False, *, rslora: bool = False):
        super().__init__(base, nn.Linear, r, alpha, dropout, merge_on_eval, rslora)
        if r > min(base.in_features, base.out_features):
            raise ValueError(
                f"r={r} is larger than min(in_features, out_features) = "
                f"{min(base.in_features, base.out_features)}: B A can never have a higher rank than that, "
                "so the extra parameters would be wasted. Choose a smaller r."
            )
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **like)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **like)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # W0 already holds W0 + scaling * B A
            return self.base_layer(x)
        result = self.base_layer(x)
        # The adapter may be float32 over a half-precision base (course.train keeps it so).
        lora = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return result + (lora * self.scaling).to(result.dtype)

    def get_delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling


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

    def __init__(self, base: nn.Embedding, r: int, alpha: float, merge_on_eval: bool = False,
                 *, rslora: bool = False):
        super().__init__(base, nn.Embedding, r, alpha, 0.0, merge_on_eval, rslora)
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, base.num_embeddings, **like))
        self.lora_embedding_B = nn.Parameter(torch.randn(base.embedding_dim, r, **like))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        base = self.base_layer
        after_A = F.embedding(x, self.lora_embedding_A.T, base.padding_idx, base.max_norm,
                              base.norm_type, base.scale_grad_by_freq, base.sparse)
        return base(x) + (after_A @ self.lora_embedding_B.T) * self.scaling

    def get_delta_weight(self) -> torch.Tensor:
        # (num_embeddings, dim), the shape of the embedding weight: the transpose of B A.
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling


class LoRAConv2d(LoRALayer):
    """LoRA on a frozen ``nn.Conv2d`` (notebook 02), shaped as PEFT does it.

    ``lora_A`` is a convolution with the base's kernel, stride, padding and dilation
    but only r output channels; ``lora_B`` is a 1x1 convolution from r channels to
    the base's out_channels. Composing them is one convolution whose kernel is
    ``B A`` (contracted over r), so it merges into the base kernel. Only
    ``groups == 1`` is supported.
    """

    def __init__(self, base: nn.Conv2d, r: int, alpha: float, dropout: float = 0.0,
                 merge_on_eval: bool = False, *, rslora: bool = False):
        super().__init__(base, nn.Conv2d, r, alpha, dropout, merge_on_eval, rslora)
        if base.groups != 1:
            raise ValueError(f"LoRAConv2d supports groups=1 only, this convolution has groups={base.groups}.")
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding,
                                base.dilation, bias=False, padding_mode=base.padding_mode, **like)
        self.lora_B = nn.Conv2d(r, base.out_channels, 1, bias=False, **like)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        result = self.base_layer(x)
        lora = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return result + (lora * self.scaling).to(result.dtype)

    def get_delta_weight(self) -> torch.Tensor:
        # B: (out, r, 1, 1), A: (r, in, kh, kw)  ->  (out, in, kh, kw)
        B = self.lora_B.weight[:, :, 0, 0]
        return torch.einsum("or,rikl->oikl", B, self.lora_A.weight) * self.scaling


class MergedLoRALinear(LoRALayer):
    """LoRA on a fused projection such as ``qkv = nn.Linear(d, 3 * d)`` (notebook 02).

    The output splits into ``len(enable_lora)`` equal parts; part i gets its own
    pair (A_i, B_i) when ``enable_lora[i]`` is true, nothing otherwise. With
    ``enable_lora=[True, False, True]`` only q and v adapt, exactly like separate
    ``LoRALinear`` layers on q and v (loralib's ``MergedLinear``). ``lora_A`` stacks
    the A_i, so x is multiplied once: its weight is (n * r, in), n = parts with
    LoRA; ``lora_B`` holds the B_i as one (n, out / parts, r) tensor.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, enable_lora: list[bool],
                 dropout: float = 0.0, merge_on_eval: bool = False, *, rslora: bool = False):
        super().__init__(base, nn.Linear, r, alpha, dropout, merge_on_eval, rslora)
        parts = len(enable_lora)
        if parts == 0 or base.out_features % parts:
            raise ValueError(f"enable_lora needs one flag per part and out_features ({base.out_features}) "
                             f"must split evenly into {parts} parts.")
        self.enabled = [i for i, on in enumerate(enable_lora) if on]
        if not self.enabled:
            raise ValueError("enable_lora is all False: no part would get LoRA. Use the plain nn.Linear.")
        self.part_size = base.out_features // parts
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, len(self.enabled) * r, bias=False, **like)
        self.lora_B = nn.Parameter(torch.zeros(len(self.enabled), self.part_size, r, **like))
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        after_A = self.lora_A(self.dropout(x)).unflatten(-1, (len(self.enabled), self.r))
        delta = torch.einsum("...nr,npr->...np", after_A, self.lora_B) * self.scaling
        parts = list(result.split(self.part_size, dim=-1))
        for n, i in enumerate(self.enabled):
            parts[i] = parts[i] + delta[..., n, :]
        return torch.cat(parts, dim=-1)

    def get_delta_weight(self) -> torch.Tensor:
        A = self.lora_A.weight.unflatten(0, (len(self.enabled), self.r))  # (n, r, in)
        per_part = torch.einsum("npr,nri->npi", self.lora_B, A) * self.scaling
        delta = self.lora_A.weight.new_zeros(self.base_layer.weight.shape)
        for n, i in enumerate(self.enabled):
            delta[i * self.part_size:(i + 1) * self.part_size] = per_part[n]
        return delta


# ---------------------------------------------------------------------------
# Putting LoRA into a model
# ---------------------------------------------------------------------------

_LORA_FOR = {nn.Linear: LoRALinear, nn.Embedding: LoRAEmbedding, nn.Conv2d: LoRAConv2d}


def _lora_class_for(module: nn.Module) -> type[LoRALayer] | None:
    for base_type, lora_class in _LORA_FOR.items():
        if isinstance(module, base_type):
            return lora_class
    return None


def _plain_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Named modules, leaving out the insides of LoRA layers already there."""
    out: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, LoRALayer):
            inside.append(name)
        out[name] = module
    return out


def _matches(name: str, targets: list[str]) -> bool:
    # PEFT's rule for a list of targets: the exact name, or a name ending in "." + target.
    return any(name == t or name.endswith("." + t) for t in targets)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def inject_lora(model: nn.Module, target_modules, r: int, alpha: float, dropout: float = 0.0) -> nn.Module:
    """Wrap every module whose name matches ``target_modules`` in its LoRA layer (notebook 02).

    A name matches a target when it is the target or ends in ``"." + target``
    (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``), as in PEFT.
    Changes ``model`` in place and returns it. Other parameters keep their
    ``requires_grad``: call ``mark_only_lora_as_trainable`` to freeze them.
    """
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    modules = _plain_modules(model)
    chosen = [name for name in modules if name and _matches(name, targets)]
    if not chosen:
        names = sorted({name.rpartition(".")[2] for name, m in modules.items()
                        if name and _lora_class_for(m) and not isinstance(m, LoRALayer)})
        raise ValueError(f"No module matches target_modules={targets}. Modules that LoRA can "
                         f"target here (nn.Linear, nn.Embedding, nn.Conv2d): {', '.join(names) or 'none'}.")
    for name in chosen:  # check them all before changing anything
        if isinstance(modules[name], LoRALayer):
            raise ValueError(f"{name} already has LoRA; inject LoRA into a module once.")
        if _lora_class_for(modules[name]) is None:
            raise TypeError(f"{name} is a {type(modules[name]).__name__}; LoRA here wraps nn.Linear, "
                            "nn.Embedding or nn.Conv2d. Target a more specific name.")
    for name in chosen:
        lora_class = _lora_class_for(modules[name])
        extra = {} if lora_class is LoRAEmbedding else {"dropout": dropout}
        _replace(model, name, lora_class(modules[name], r, alpha, **extra))
    return model


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


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """The part of ``model.state_dict()`` that LoRA trains: what to save (see ``bias`` above)."""
    _check_bias_mode(bias)
    lora_biases = _lora_bias_names(model)
    return {k: v for k, v in model.state_dict().items()
            if "lora_" in k or (bias == "all" and k.endswith("bias"))
            or (bias == "lora_only" and k in lora_biases)}


# ---------------------------------------------------------------------------
# Adapters on disk, in PEFT's format
# ---------------------------------------------------------------------------

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PEFT's prefix for the wrapped model's module names


def _peft_tensors(name: str, layer: LoRALayer) -> dict[str, torch.Tensor]:
    if isinstance(layer, MergedLoRALinear):
        raise ValueError(f"{name} is a MergedLoRALinear: PEFT has no fused layer, so it cannot be "
                         "saved as a PEFT adapter. Use separate q/k/v projections with LoRALinear.")
    if isinstance(layer, LoRAEmbedding):
        return {f"{_PREFIX}{name}.lora_embedding_A": layer.lora_embedding_A,
                f"{_PREFIX}{name}.lora_embedding_B": layer.lora_embedding_B}
    return {f"{_PREFIX}{name}.lora_A.weight": layer.lora_A.weight,
            f"{_PREFIX}{name}.lora_B.weight": layer.lora_B.weight}


def save_peft_adapter(model: nn.Module, directory, *, base_model_name_or_path: str | None = None,
                      task_type: str | None = None) -> Path:
    """Write the model's LoRA layers as a PEFT adapter: adapter_config.json + adapter_model.safetensors.

    ``peft.PeftModel.from_pretrained(base, directory)`` then gives the same outputs.
    Layers whose r or alpha differ from the most common go into ``rank_pattern`` /
    ``alpha_pattern``. ``task_type="CAUSAL_LM"`` makes PEFT return a
    ``PeftModelForCausalLM``. The files are written into a temporary directory next
    to ``directory`` and moved into place, so a reader never sees half an adapter.
    Returns the directory.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}
    if not layers:
        raise ValueError("The model has no LoRA layers: call inject_lora first.")
    if len({m.rslora for m in layers.values()}) > 1:
        raise ValueError("Some LoRA layers use rsLoRA scaling and some do not; a PEFT config holds one.")
    # The most common r and alpha go in the config; layers that differ go in PEFT's
    # rank_pattern / alpha_pattern, keyed by their name as a regular expression.
    r = Counter(m.r for m in layers.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in layers.values()).most_common(1)[0][0]
    rank_pattern = {re.escape(n): m.r for n, m in layers.items() if m.r != r}
    alpha_pattern = {re.escape(n): m.alpha for n, m in layers.items() if m.alpha != alpha}
    tensors = {}
    for name, layer in layers.items():
        tensors.update({k: v.detach().contiguous() for k, v in _peft_tensors(name, layer).items()})

    # Short target names ("q_proj") when they pick out exactly these layers, full names otherwise.
    plain = _plain_modules(model)
    short = sorted({name.rpartition(".")[2] for name in layers})
    if {n for n in plain if n and _matches(n, short)} != set(layers):
        short = sorted(layers)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    dropouts = {float(getattr(m.dropout, "p", 0.0)) for m in layers.values()}
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": max(dropouts),
        "target_modules": short,
        "use_rslora": next(iter(layers.values())).rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if directory.exists():  # replace file by file (each rename is atomic), keep other files
            for name in (WEIGHTS_NAME, CONFIG_NAME):
                os.replace(tmp / name, directory / name)
        else:
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


_PEFT_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B",
                  ".lora_embedding_A": "A", ".lora_embedding_B": "B"}
_UNSUPPORTED = {"use_dora": "DoRA (see course.dora)", "lora_bias": "a trained LoRA bias",
                "fan_in_fan_out": "fan_in_fan_out (GPT-2 style Conv1D layers)",
                "modules_to_save": "modules_to_save (fully trained extra modules)"}


def _read_adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory. A PEFT adapter is a directory with "
                                f"{CONFIG_NAME} and {WEIGHTS_NAME} (from save_pretrained or save_peft_adapter).")
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: a PEFT adapter directory holds {CONFIG_NAME} "
                                f"and {WEIGHTS_NAME}.")
    if not weights_path.is_file():
        pickled = (directory / "adapter_model.bin").is_file()
        raise FileNotFoundError(f"{weights_path} is missing." + (
            " There is an adapter_model.bin (a pickle), which is never loaded here: it can run code. "
            "Re-save the adapter with safetensors (PEFT's default)." if pickled else ""))
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{directory} holds a {config.get('peft_type')!r} adapter; load_peft_adapter "
                         "reads LoRA adapters (peft_type 'LORA') only.")
    for key, what in _UNSUPPORTED.items():
        if config.get(key) not in (None, False, {}, [], "none"):
            raise ValueError(f"This adapter uses {what} ({key}={config[key]!r}), which the course's "
                             "LoRA layers do not implement.")
    return config, load_file(weights_path)


def load_peft_adapter(model: nn.Module, directory) -> nn.Module:
    """Put a PEFT LoRA adapter (a directory PEFT or ``save_peft_adapter`` wrote) into ``model``.

    Each module named in the adapter is wrapped in the course's LoRA layer with the
    adapter's A and B, r (read from A's shape, so ``rank_pattern`` works), lora_alpha
    (or its ``alpha_pattern`` entry), lora_dropout and use_rslora; the outputs equal
    PEFT's. Nothing in ``model`` changes unless the whole adapter fits. Returns ``model``.
    """
    directory = Path(directory)
    config, tensors = _read_adapter(directory)
    made_for = config.get("base_model_name_or_path") or "an unnamed base model"
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(_PREFIX)
        suffix = next((s for s in _PEFT_SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"Unexpected tensor {key!r} in {directory / WEIGHTS_NAME}: not a LoRA A or B.")
        pairs.setdefault(name.removesuffix(suffix), {})[_PEFT_SUFFIXES[suffix]] = tensor

    modules = _plain_modules(model)
    was_trainable = {p: p.requires_grad for p in model.parameters()}
    new_layers = {}
    try:
        for name, pair in sorted(pairs.items()):
            new_layers[name] = _layer_from_peft(name, pair, modules.get(name), config, made_for)
    except Exception:
        for p, flag in was_trainable.items():  # building a layer froze its base: undo that
            p.requires_grad_(flag)
        raise
    for name, layer in new_layers.items():  # everything fitted: now change the model
        _replace(model, name, layer)
    return model


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rule for rank_pattern / alpha_pattern: a key is a regex for the end of the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _layer_from_peft(name: str, pair: dict, base: nn.Module | None, config: dict, made_for: str) -> LoRALayer:
    if set(pair) != {"A", "B"}:
        raise ValueError(f"The adapter has only {sorted(pair)} for {name}; it needs both A and B.")
    if base is None:
        raise ValueError(f"The adapter has weights for {name!r}, which this model does not have: "
                         f"the adapter was made for another model ({made_for}).")
    lora_class = _lora_class_for(base)
    if lora_class is None or isinstance(base, LoRALayer):
        raise ValueError(f"{name} is a {type(base).__name__}, which cannot take this LoRA adapter.")
    options = {"rslora": bool(config.get("use_rslora"))}
    if lora_class is not LoRAEmbedding:
        options["dropout"] = float(config.get("lora_dropout") or 0.0)
    alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
    layer = lora_class(base, pair["A"].shape[0], alpha, **options)  # r: from A, honours rank_pattern
    if isinstance(layer, LoRAEmbedding):
        own = {"A": layer.lora_embedding_A, "B": layer.lora_embedding_B}
    else:
        own = {"A": layer.lora_A.weight, "B": layer.lora_B.weight}
    for which, tensor in pair.items():
        if tensor.shape != own[which].shape:
            raise ValueError(
                f"Tensor {which} of {name} has shape {tuple(tensor.shape)} in the adapter, but this "
                f"model needs {tuple(own[which].shape)}: the adapter was made for another base model "
                f"({made_for})."
            )
        with torch.no_grad():
            own[which].copy_(tensor)
    return layer
