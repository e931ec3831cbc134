"""NOLA: LoRA's factors as linear combinations of a seeded random basis (notebook 05).

NOLA (Koohpayegani et al. 2024, "NOLA: Compressing LoRA using Linear Combination of
Random Basis") keeps LoRA's low-rank update ``ΔW = (alpha / r) B A`` but no longer trains
A and B. Each is written as a mix of fixed random matrices, and only the mixing
coefficients are trained (the paper's method section)::

    A = sum_k a_k A_k   (k = 1..K_A, each A_k of shape (r, in), uniform in [-1, 1])
    B = sum_k b_k B_k   (k = 1..K_B, each B_k of shape (out, r))

An adapter is then ``K_A + K_B`` numbers per layer plus a seed, whatever r and the layer's
size: below LoRA's floor of ``in + out`` numbers per layer at rank 1.

Three parts, each fixing a fault of the reference code in the paper's repository:

* ``random_basis``: the basis is a pure function of (seed, element index), computed with
  integer tensor operations (a counter-based generator). The reference code reseeds torch's
  global generator instead, which changes the learner's random stream and gives other numbers
  on another device, so an adapter trained on a GPU is garbage on a CPU.
* ``GenerateParams``: ``sum_k c_k basis_k`` generated a chunk of basis matrices at a time;
  backward regenerates the chunks. The reference code materialises all K matrices at once, in
  forward and again in backward.
* ``NOLALoRALinear``: a small subclass of ``course.lora.LoRALinear`` that only says how A and B
  are made (``init_factors``, ``lora_factors``), so forward, merge and unmerge are LoRA's own,
  and merging uses the generated factors (the reference merge ignored the coefficients).
  ``save_nola`` / ``load_nola`` store coefficients, seeds and shapes only;
  ``course.lora.save_peft_adapter`` exports the generated A and B as a plain PEFT LoRA adapter.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from course.files import atomic_directory
from course.lora import LoRALinear
from course.nola_basis import (  # noqa: F401  (re-exported: the basis is part of this module's story)
    _SEED_LIMIT,
    GENERATOR,
    GenerateParams,
    _check_shape,
    basis_chunks,
    derive_seed,
    generate_params,
    random_basis,
)
from course.surgery import adapter_layers, swap_in

__all__ = [
    "GENERATOR",
    "random_basis",
    "basis_chunks",
    "GenerateParams",
    "generate_params",
    "derive_seed",
    "NOLALoRALinear",
    "nola_layer",
    "nola_layers",
    "save_nola",
    "load_nola",
]


# ---------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------


class NOLALoRALinear(LoRALinear):
    """LoRA whose A and B are generated from coefficients and a seed (NOLA; notebook 05).

    ``A = generate(lora_A_coefficients, r, in, seed_A) / sqrt(K_A)`` and
    ``B = generate(lora_B_coefficients, out, r, seed_B) / sqrt(K_B)``, with
    ``seed_A = derive_seed(seed, "lora_A")``, ``seed_B = derive_seed(seed, "lora_B")``. The
    division by sqrt(K) (as in the authors' code) keeps the entries of A and B, and the
    change one optimiser step makes to them, about the same whatever K.

    At the start B's coefficients are zero (so the layer is the base layer) and A's are drawn
    from the same counter-based generator (seed ``derive_seed(seed, "init")``), scaled so that
    A's entries have the variance of LoRA's Kaiming-uniform A: the layer at step 0 is a pure
    function of its seed, and no global random state is used.

    Everything else (forward, ``merge``, ``unmerge``, ``get_delta_weight``) is ``LoRALinear``'s,
    through the generated factors. Only ``lora_A_coefficients`` and ``lora_B_coefficients``
    train (their names contain ``lora_``, for ``mark_only_lora_as_trainable``). Without
    gradients (evaluation, generation, merging) the generated factors are cached until the
    coefficients change.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, *, num_basis_A: int, num_basis_B: int, seed: int,
                 dropout: float = 0.0, merge_on_eval: bool = False, rslora: bool = False,
                 chunk_size: int | None = None):
        for name, value in (("num_basis_A", num_basis_A), ("num_basis_B", num_basis_B)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int (NOLA's K, e.g. 64 or 1024), got {value!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _SEED_LIMIT:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}.")
        # Plain attributes may be set before nn.Module.__init__; init_factors (called by it) needs them.
        self.num_basis_A, self.num_basis_B, self.seed, self.chunk_size = num_basis_A, num_basis_B, seed, chunk_size
        self.seed_A, self.seed_B = derive_seed(seed, "lora_A"), derive_seed(seed, "lora_B")
        self._cache = None
        super().__init__(base, r, alpha, dropout=dropout, merge_on_eval=merge_on_eval, rslora=rslora)
        _check_shape(num_basis_A, r, base.in_features, self.seed_A)  # a basis too large for the generator
        _check_shape(num_basis_B, base.out_features, r, self.seed_B)

    def init_factors(self) -> None:
        """``lora_A_coefficients`` (K_A numbers, from the seed) and ``lora_B_coefficients`` (K_B zeros)."""
        like = self._like()
        in_features = self.base_layer.in_features
        # A_ij = sum_k a_k U_k / sqrt(K) has variance E[a^2] / 3 = bound^2 / 9 for a ~ U(-bound, bound);
        # LoRA's Kaiming-uniform A has 1 / (3 in): bound = sqrt(3 / in).
        unit = random_basis(1, 1, self.num_basis_A, derive_seed(self.seed, "init"), dtype=torch.float32)[0, 0]
        self.lora_A_coefficients = nn.Parameter((unit * math.sqrt(3 / in_features)).to(**like))
        self.lora_B_coefficients = nn.Parameter(torch.zeros(self.num_basis_B, **like))

    def compute_dtype(self) -> torch.dtype:
        return self.lora_A_coefficients.dtype

    def _generate(self) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.base_layer
        A = generate_params(self.lora_A_coefficients, self.r, base.in_features, self.seed_A,
                            chunk_size=self.chunk_size) / math.sqrt(self.num_basis_A)
        B = generate_params(self.lora_B_coefficients, base.out_features, self.r, self.seed_B,
                            chunk_size=self.chunk_size) / math.sqrt(self.num_basis_B)
        return A, B

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B), generated from the coefficients: (r, in) and (out, r)."""
        if torch.is_grad_enabled():
            self._cache = None
            return self._generate()
        a, b = self.lora_A_coefficients, self.lora_B_coefficients
        key = (a.data_ptr(), a._version, b.data_ptr(), b._version, a.dtype, a.device, self.seed, self.chunk_size)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._generate())
        return self._cache[1]

    def peft_state(self) -> dict[str, torch.Tensor]:
        """The generated A and B under PEFT's names: ``save_peft_adapter`` exports a plain LoRA adapter."""
        with torch.no_grad():
            A, B = self.lora_factors()
        return {"lora_A.weight": A, "lora_B.weight": B}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_basis_A={self.num_basis_A}, num_basis_B={self.num_basis_B}, "
                f"seed={self.seed}")


def nola_layer(model: nn.Module, seed: int):
    """A layer factory for ``inject_lora``: each layer's seed is ``derive_seed(seed, its module name)``.

    ``inject_lora(model, targets, r, alpha, layer=nola_layer(model, 0), num_basis_A=64, num_basis_B=64)``
    gives every adapted layer its own basis, and the same one in every process: the seed depends
    only on ``seed`` and the module's name, not on the order of injection or on which other
    modules are targeted. (One seed for all would give, say, every q_proj the same basis.)
    """
    names = {id(module): name for name, module in model.named_modules()}

    def make(base: nn.Linear, r: int, alpha: float, *, dropout: float = 0.0, **options) -> NOLALoRALinear:
        if id(base) not in names:
            raise ValueError("This layer is not in the model nola_layer was made for: call nola_layer(model, seed) "
                             "with the model you inject into.")
        if "seed" in options:
            raise TypeError("nola_layer(model, seed) sets each layer's seed: do not pass seed= to inject_lora too.")
        return NOLALoRALinear(base, r, alpha, seed=derive_seed(seed, names[id(base)]), dropout=dropout, **options)

    return make


def nola_layers(model: nn.Module) -> dict[str, NOLALoRALinear]:
    """``{name: layer}`` for every ``NOLALoRALinear`` in ``model``: the layers ``course.lora.lora_layers``
    finds (``course.surgery.adapter_layers``) that are NOLA's."""
    return {name: m for name, m in adapter_layers(model).items() if isinstance(m, NOLALoRALinear)}


# ---------------------------------------------------------------------------
# On disk: coefficients, seeds and shapes
# ---------------------------------------------------------------------------

# Not PEFT's file names (``course.peft_format.CONFIG_NAME``, ``WEIGHTS_NAME``): PEFT must not take a NOLA
# folder for a LoRA adapter, and one name means one file in the whole course.
NOLA_CONFIG_NAME, NOLA_WEIGHTS_NAME = "nola_config.json", "nola_coefficients.safetensors"


_SHARED = ("r", "alpha", "num_basis_A", "num_basis_B", "dropout", "rslora")


def _settings(layer: NOLALoRALinear) -> dict:
    return {"r": layer.r, "alpha": layer.alpha, "num_basis_A": layer.num_basis_A, "num_basis_B": layer.num_basis_B,
            "dropout": float(getattr(layer.dropout, "p", 0.0)), "rslora": layer.rslora}


def save_nola(model: nn.Module, directory) -> Path:
    """Write the model's NOLA layers as coefficients (safetensors) + seeds and shapes (JSON), atomically.

    The directory holds ``nola_coefficients.safetensors`` (``<layer>.lora_A_coefficients`` and
    ``<layer>.lora_B_coefficients``) and ``nola_config.json``: the generator's name, the settings
    most layers share (r, alpha, K_A, K_B, dropout, rslora) and, per layer, its in/out features,
    its seed and any setting that differs. ``load_nola`` rebuilds the layers on any device.
    Returns the directory.
    """
    layers = nola_layers(model)
    if not layers:
        raise ValueError("The model has no NOLALoRALinear layers: inject them first (inject_lora with "
                         "layer=nola_layer(model, seed)).")
    settings = {name: _settings(layer) for name, layer in layers.items()}
    shared = {key: Counter(json.dumps(s[key]) for s in settings.values()).most_common(1)[0][0] for key in _SHARED}
    shared = {key: json.loads(value) for key, value in shared.items()}
    tensors, entries = {}, {}
    for name, layer in layers.items():
        tensors[f"{name}.lora_A_coefficients"] = layer.lora_A_coefficients.detach().float().cpu().contiguous()
        tensors[f"{name}.lora_B_coefficients"] = layer.lora_B_coefficients.detach().float().cpu().contiguous()
        own = {key: value for key, value in settings[name].items() if value != shared[key]}
        entries[name] = {"in_features": layer.base_layer.in_features, "out_features": layer.base_layer.out_features,
                         "seed": layer.seed, **own}
    # One line per layer: still readable, and small next to the coefficients.
    head = json.dumps({"peft_type": "NOLA (course)", "generator": GENERATOR, **shared}, indent=1)[:-2]
    body = ",\n".join(f"  {json.dumps(name)}: {json.dumps(entry)}" for name, entry in entries.items())
    text = f'{head},\n "layers": {{\n{body}\n }}\n}}\n'
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        save_file(tensors, tmp / NOLA_WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / NOLA_CONFIG_NAME).write_text(text, encoding="utf-8")
    return directory


def _check_nola_config(path: Path, config: dict) -> None:
    """Every setting a layer needs is there, shared or its own: a damaged file is named, not a KeyError."""
    layers = config.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{path} is damaged: it has no \"layers\" object naming the adapted layers. "
                         "Save the adapter again with save_nola.")
    needed = ("r", "alpha", "num_basis_A", "num_basis_B", "seed", "in_features", "out_features")
    for name, entry in layers.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{path} is damaged: layer {name!r} is {entry!r}, not an object of settings.")
        missing = [key for key in needed if key not in entry and key not in config]
        if missing:
            raise ValueError(f"{path} is damaged: layer {name!r} has no {', '.join(missing)} (renamed or deleted "
                             "keys?). Save the adapter again with save_nola.")


def load_nola(model: nn.Module, directory) -> nn.Module:
    """Put a NOLA adapter written by ``save_nola`` into ``model`` (a plain base model); returns it.

    Every layer is checked before the model changes: a missing module, another shape,
    another generator or a damaged file (bad JSON, missing keys or tensors, a truncated
    safetensors file) raises a ValueError naming the file, and leaves the model as it was.
    """
    directory = Path(directory)
    config_path, weights_path = directory / NOLA_CONFIG_NAME, directory / NOLA_WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{directory} is not a NOLA adapter: it needs {NOLA_CONFIG_NAME} and {NOLA_WEIGHTS_NAME} "
                                "(written by course.nola.save_nola).")
    from course.peft_format import read_json_object, read_tensors

    config = read_json_object(config_path)
    if config.get("generator") != GENERATOR:
        raise ValueError(f"This adapter's basis comes from generator {config.get('generator')!r}, this course "
                         f"has {GENERATOR!r}: its coefficients would multiply other random matrices.")
    _check_nola_config(config_path, config)
    tensors = read_tensors(weights_path)
    wanted = {f"{name}.{part}" for name in config["layers"] for part in ("lora_A_coefficients", "lora_B_coefficients")}
    if wanted - tensors.keys() or tensors.keys() - wanted:
        missing, extra = sorted(wanted - tensors.keys()), sorted(tensors.keys() - wanted)
        raise ValueError(f"{weights_path} does not match {config_path}: "
                         + "; ".join(part for part in (missing and f"missing {', '.join(missing[:3])}",
                                                       extra and f"unexpected {', '.join(extra[:3])}") if part)
                         + ". The adapter is damaged (renamed keys?): save it again with save_nola.")
    def build(name: str, base: nn.Module | None) -> NOLALoRALinear:
        spec = {**{key: config[key] for key in _SHARED if key in config}, **config["layers"][name]}
        if not isinstance(base, nn.Linear) or isinstance(base, LoRALinear):
            raise ValueError(f"The adapter has a layer {name!r}, which is not a plain nn.Linear in this model: "
                             "load it into the base model it was trained on.")
        if (base.in_features, base.out_features) != (spec["in_features"], spec["out_features"]):
            raise ValueError(f"{name} is {base.in_features} -> {base.out_features} here but "
                             f"{spec['in_features']} -> {spec['out_features']} in the adapter: another base model.")
        layer = NOLALoRALinear(base, spec["r"], spec["alpha"], num_basis_A=spec["num_basis_A"],
                               num_basis_B=spec["num_basis_B"], seed=spec["seed"],
                               dropout=spec.get("dropout", 0.0), rslora=spec.get("rslora", False))
        with torch.no_grad():
            for part in ("lora_A_coefficients", "lora_B_coefficients"):
                saved, own = tensors[f"{name}.{part}"], getattr(layer, part)
                if saved.shape != own.shape:
                    raise ValueError(f"{name}.{part} has shape {tuple(saved.shape)} in the file, the config "
                                     f"says {tuple(own.shape)}: the adapter is damaged.")
                own.copy_(saved)
        return layer

    return swap_in(model, config["layers"], build)  # every layer checked before the model changes
