"""LoRA adapters on disk in PEFT's format, both ways (notebook 02).

A PEFT adapter is a directory with ``adapter_config.json`` (r, lora_alpha,
target_modules, ...) and ``adapter_model.safetensors``, whose tensors are named
``base_model.model.<module name>.<suffix>``: ``lora_A.weight`` / ``lora_B.weight``
for Linear and Conv2d layers, ``lora_embedding_A`` / ``lora_embedding_B`` for
embeddings, plus whatever a variant adds (DoRA's ``lora_magnitude_vector``).

``save_peft_adapter`` writes the course's layers in that format, so that
``peft.PeftModel.from_pretrained`` loads them; ``load_peft_adapter`` reads what PEFT
wrote into the course's layers. Both are re-exported by ``course.lora``.

A layer class tells this module how it appears on disk: ``peft_state()`` (suffix -> the
live tensor, used to save and to load; a module with it is a layer this format writes),
optionally ``peft_flags`` (config entries such as ``{"use_dora": True}``), and, to be read
back, ``register_layer`` (the class for a kind of module) or ``register_variant`` (the class
a config's flags ask for). So this module imports no method; the methods import it.
Safetensors only: a pickled ``adapter_model.bin`` is never loaded.
"""

from __future__ import annotations

import importlib
import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from course.files import atomic_directory
from course.surgery import adapter_layers, is_adapted, matches_target, plain_modules, swap_in

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PEFT's prefix for the wrapped model's module names


# The format imports no method: each layer class registers what it wraps (``register_layer``) or
# which PEFT config it stands for (``register_variant``) when its module is imported. These are
# the modules that do so, imported by name only when an adapter is read.
_LAYER_MODULES = ("course.lora", "course.dora", "course.olora")
_LAYER_FOR: dict[type, type] = {}  # nn.Linear -> LoRALinear, ...
_VARIANTS: list[type] = []  # Linear classes with ``peft_flags``: DoRALinear, OLoRALinear


def register_layer(base_type: type, layer_class: type) -> type:
    """Read adapters for modules of ``base_type`` into ``layer_class`` (``nn.Linear`` -> ``LoRALinear``)."""
    _LAYER_FOR[base_type] = layer_class
    return layer_class


def register_variant(layer_class: type) -> type:
    """Read a Linear target into ``layer_class`` when the config holds its ``peft_flags`` (DoRA, OLoRA)."""
    if layer_class not in _VARIANTS:
        _VARIANTS.append(layer_class)
    return layer_class


def _load_layer_modules() -> None:
    for module in _LAYER_MODULES:
        importlib.import_module(module)


def _layer_class_for(module: nn.Module) -> type | None:
    for base_type, layer_class in _LAYER_FOR.items():
        if isinstance(module, base_type):
            return layer_class
    return None


def is_peft_layer(module: nn.Module) -> bool:
    """A layer this format can write: it says how with a ``peft_state()`` method."""
    return callable(getattr(module, "peft_state", None))


def peft_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Suffix -> the layer's own tensor, under PEFT's names (shared, not copies): ``layer.peft_state()``."""
    return layer.peft_state()


def _flag_matches(value, wanted) -> bool:
    return str(value).lower() == str(wanted).lower() if isinstance(wanted, str) else value == wanted


def _linear_class(config: dict) -> type:
    """The course class for a Linear target of this config (``use_dora`` -> ``DoRALinear``,
    ``init_lora_weights="olora"`` -> ``OLoRALinear``; as PEFT, OLoRA redoes the QR and changes the base)."""
    for variant in _VARIANTS:
        if all(_flag_matches(config.get(key), value) for key, value in variant.peft_flags.items()):
            return variant
    return _LAYER_FOR[nn.Linear]


def save_peft_adapter(model: nn.Module, directory, *, base_model_name_or_path: str | None = None,
                      task_type: str | None = None) -> Path:
    """Write the model's LoRA layers as a PEFT adapter: adapter_config.json + adapter_model.safetensors.

    ``peft.PeftModel.from_pretrained(base, directory)`` then gives the same outputs.
    Layers whose r or alpha differ from the most common go into ``rank_pattern`` /
    ``alpha_pattern``. ``task_type="CAUSAL_LM"`` makes PEFT return a
    ``PeftModelForCausalLM``. The files are written into a temporary directory next
    to ``directory`` and moved into place, so a reader never sees half a file;
    other files already in ``directory`` (a README, say) are kept. ``directory`` may be new,
    empty (``"."`` included) or an adapter folder; a file or a folder of other things is
    refused, never replaced. Returns the directory.
    """
    layers = adapter_layers(model)  # the layers lora_layers counts, no more, no fewer
    if not layers:
        raise ValueError("The model has no LoRA layers: call inject_lora first.")
    unwritable = {name: type(m).__name__ for name, m in layers.items() if not is_peft_layer(m)}
    if unwritable:
        named = ", ".join(f"{name} ({kind})" for name, kind in list(unwritable.items())[:3])
        raise ValueError(f"{len(unwritable)} of the model's {len(layers)} LoRA layers cannot be written in PEFT's "
                         f"format: {named}{', ...' if len(unwritable) > 3 else ''} have no peft_state() method. "
                         "save_peft_adapter writes the course's layer classes (course.lora.LoRALinear, DoRALinear, "
                         "...): copy your layers' A and B into a model built with course.lora.inject_lora and save "
                         "that (notebook 02, section 8).")
    if len({m.rslora for m in layers.values()}) > 1:
        raise ValueError("Some LoRA layers use rsLoRA scaling and some do not; a PEFT config holds one.")
    flags = {json.dumps(getattr(m, "peft_flags", {}), sort_keys=True) for m in layers.values()}
    if len(flags) > 1:
        raise ValueError(f"The model mixes LoRA variants ({', '.join(sorted(flags))}); a PEFT config holds one.")
    # The most common r and alpha go in the config; layers that differ go in PEFT's
    # rank_pattern / alpha_pattern, keyed by their name as a regular expression.
    r = Counter(m.r for m in layers.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in layers.values()).most_common(1)[0][0]
    rank_pattern = {re.escape(n): m.r for n, m in layers.items() if m.r != r}
    alpha_pattern = {re.escape(n): m.alpha for n, m in layers.items() if m.alpha != alpha}
    tensors = {}
    for name, layer in layers.items():
        for suffix, tensor in peft_state(layer).items():
            tensors[f"{_PREFIX}{name}.{suffix}"] = tensor.detach().contiguous()

    # Short target names ("q_proj") when they pick out exactly these layers, full names otherwise.
    plain = plain_modules(model)
    short = sorted({name.rpartition(".")[2] for name in layers})
    if {n for n in plain if n and matches_target(n, short)} != set(layers):
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
        **getattr(next(iter(layers.values())), "peft_flags", {}),
    }

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file, not a folder: save_peft_adapter writes a folder and never "
                              "replaces a file. Name a new folder (or an adapter folder to update).")
    if directory.is_dir() and not (directory / CONFIG_NAME).is_file() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} is a folder with other files in it and no {CONFIG_NAME}: not an "
                              "adapter folder. Name a new or empty folder (or an adapter folder to update).")
    with atomic_directory(directory, keep_others=True) as tmp:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return directory


_SUFFIX = re.compile(r"\.(lora_(?:A|B)\.weight|lora_embedding_(?:A|B)|lora_magnitude_vector)$")
_UNSUPPORTED = {"lora_bias": "a trained LoRA bias",
                "fan_in_fan_out": "fan_in_fan_out (GPT-2 style Conv1D layers)",
                "modules_to_save": "modules_to_save (fully trained extra modules)",
                "use_qalora": "QALoRA", "use_bdlora": "BD-LoRA"}


# init_lora_weights values whose trained tensors mean the same on the unchanged base: PEFT's own
# loading leaves the base weight alone for these (it only sets initial A and B, which the file
# overwrites). "olora" is redone by OLoRALinear. Any other value (PiSSA, CorDA and LoftQ change or
# replace the base weight when PEFT loads the adapter) is refused by name.
_SAME_ON_LOAD = {"true", "false", "gaussian", "eva", "orthogonal", "mica", "lora_ga", "olora"}


def _damaged(path: Path, what: str) -> ValueError:
    return ValueError(f"{path} is damaged: {what}. Re-save the adapter (save_pretrained or save_peft_adapter).")


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object; every way it can be damaged becomes a ValueError naming it."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _damaged(path, f"not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise _damaged(path, f"it holds a JSON {type(config).__name__}, not an object of settings")
    return config


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file with at least one tensor; a truncated or corrupt file becomes a ValueError naming it."""
    try:
        tensors = load_file(path)
    except Exception as exc:  # SafetensorError, or an OSError for a header that lies about its size
        raise _damaged(path, f"not a readable safetensors file ({type(exc).__name__}: {exc}); it may be truncated "
                       "by an interrupted copy") from None
    if not tensors:
        raise _damaged(path, "it holds no tensors")
    return tensors


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
    config = read_json_object(config_path)
    if "peft_type" not in config:
        raise _damaged(config_path, "it has no peft_type (a PEFT adapter config says \"peft_type\": \"LORA\")")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{directory} holds a {config.get('peft_type')!r} adapter; load_peft_adapter "
                         "reads LoRA adapters (peft_type 'LORA') only.")
    missing = [key for key in ("r", "lora_alpha", "target_modules") if key not in config]
    if missing:
        raise _damaged(config_path, f"it has no {', '.join(missing)} (renamed or deleted keys?)")
    for key, kind in (("r", int), ("lora_alpha", (int, float))):
        if isinstance(config[key], bool) or not isinstance(config[key], kind) or not config[key] > 0:
            raise _damaged(config_path, f"{key} is {config[key]!r}, not a positive number")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise _damaged(config_path, f"{key} is {config[key]!r}, not an object of name -> value")
    for key, what in _UNSUPPORTED.items():
        if config.get(key) not in (None, False, {}, [], "none"):
            raise ValueError(f"This adapter uses {what} ({key}={config[key]!r}), which the course's "
                             "LoRA layers do not implement.")
    init = config.get("init_lora_weights", True)
    if str(init).lower() not in _SAME_ON_LOAD:
        raise ValueError(f"{config_path} says init_lora_weights={init!r}: PEFT re-creates that initialisation when "
                         "it loads the adapter and changes (or, for LoftQ, replaces) the base weights with it, which "
                         "the course's layers do not reproduce. Load it with peft.PeftModel.from_pretrained, or "
                         "convert it to plain LoRA first (PEFT's path_initial_model_for_weight_conversion).")
    return config, read_tensors(weights_path)


def _targeted(name: str, targets) -> bool:
    """PEFT's rule: a list of names (exact, or ending in "." + name), or one regular expression."""
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, name) is not None
    return matches_target(name, list(targets))


def _check_against_config(directory: Path, config: dict, groups: dict[str, dict[str, torch.Tensor]]) -> None:
    """The config and the tensors must tell the same story: ranks, targets (PEFT refuses a mismatch too)."""
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    targets = config["target_modules"]
    if not isinstance(targets, (str, list)):
        raise _damaged(config_path, f"target_modules is {targets!r}, not a name, a regex or a list of names")
    stray = sorted(name for name in groups if not _targeted(name, targets))
    if stray:
        raise ValueError(f"{weights_path} has weights for {', '.join(stray[:3])}, which target_modules {targets!r} in "
                         f"{config_path} does not name: the two files do not belong together.")
    if isinstance(targets, list):
        unused = sorted(t for t in targets if not any(matches_target(name, [t]) for name in groups))
        if unused:
            raise ValueError(f"{config_path} targets {', '.join(unused)}, but {weights_path} has no weights for "
                             "them: the two files do not belong together (or the weights are incomplete).")
    for name, state in sorted(groups.items()):
        A = state.get("lora_A.weight", state.get("lora_embedding_A"))
        B = state.get("lora_B.weight", state.get("lora_embedding_B"))
        if A is None or B is None:
            raise ValueError(f"{weights_path} has {sorted(state)} for {name}; a LoRA layer needs both A and B.")
        if A.dim() < 2 or B.dim() < 2:
            raise _damaged(weights_path, f"{name}'s factors have shapes {tuple(A.shape)} and {tuple(B.shape)}, "
                           "not matrices")
        r = _pattern_value(config.get("rank_pattern") or {}, name, config["r"])
        rank_of_A, rank_of_B = A.shape[0], B.shape[1]  # A (r, in ...), B (out, r ...); embeddings alike
        if rank_of_A != r or rank_of_B != r:
            raise ValueError(f"{config_path} gives {name} rank r={r}, but its tensors in {weights_path} have rank "
                             f"{rank_of_A} (A {tuple(A.shape)}, B {tuple(B.shape)}); the scaling alpha/r would be "
                             "wrong. The two files do not belong together (fix r or rank_pattern).")


def load_peft_adapter(model: nn.Module, directory) -> nn.Module:
    """Put a PEFT LoRA adapter (a directory PEFT or ``save_peft_adapter`` wrote) into ``model``.

    Each module named in the adapter is wrapped in the course's layer for it (``DoRALinear``
    when the config says ``use_dora``) with the adapter's tensors, r (read from A's shape,
    so ``rank_pattern`` works), lora_alpha (or its ``alpha_pattern`` entry), lora_dropout
    and use_rslora; the outputs equal PEFT's. Nothing in ``model`` changes unless the whole
    adapter fits. A config that disagrees with its tensors (rank, targets), an initialisation
    PEFT redoes on the base weights (PiSSA, CorDA, LoftQ), and a damaged file are refused with
    a ValueError naming the file. Returns ``model``.
    """
    directory = Path(directory)
    config, tensors = _read_adapter(directory)
    made_for = config.get("base_model_name_or_path") or "an unnamed base model"
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _SUFFIX.search(key)
        if match is None:
            raise ValueError(f"Unexpected tensor {key!r} in {directory / WEIGHTS_NAME}: not a LoRA tensor "
                             "(renamed keys?). Re-save the adapter.")
        name = key[: match.start()].removeprefix(_PREFIX)
        groups.setdefault(name, {})[match.group(1)] = tensor
    _check_against_config(directory, config, groups)

    _load_layer_modules()
    # OLoRA layers change their base weight when built: swap_in puts the originals back on failure.
    return swap_in(model, sorted(groups), lambda name, module: _layer_from_peft(name, groups[name], module, config,
                                                                                made_for),
                   changes_base_weight=getattr(_linear_class(config), "changes_base_weight", False))


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rule for rank_pattern / alpha_pattern: a key is a regex for the end of the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _layer_from_peft(name: str, state: dict, base: nn.Module | None, config: dict, made_for: str) -> nn.Module:
    if base is None:
        raise ValueError(f"The adapter has weights for {name!r}, which this model does not have: "
                         f"the adapter was made for another model ({made_for}).")
    lora_class = _layer_class_for(base)
    if lora_class is None or is_adapted(base):
        raise ValueError(f"{name} is a {type(base).__name__}, which cannot take this LoRA adapter.")
    A = state.get("lora_A.weight", state.get("lora_embedding_A"))
    if A is None:
        raise ValueError(f"The adapter has no A factor for {name} (only {sorted(state)}); it needs A and B.")
    r = A.shape[0]  # from A: honours rank_pattern
    alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
    options = {"rslora": bool(config.get("use_rslora"))}
    if lora_class is _LAYER_FOR.get(nn.Linear):
        lora_class = _linear_class(config)
    elif config.get("use_dora"):
        raise ValueError(f"This DoRA adapter puts DoRA on {name}, a {type(base).__name__}; the course's "
                         "DoRALinear handles nn.Linear layers only. Load it with peft.PeftModel.from_pretrained.")
    if not isinstance(base, nn.Embedding):  # PEFT's embedding layers have no dropout
        options["dropout"] = float(config.get("lora_dropout") or 0.0)
    try:
        layer = lora_class(base, r, alpha, **options)
    except ValueError as exc:
        raise ValueError(f"The adapter's {name} does not fit this model ({exc}); it was made for "
                         f"another base model ({made_for}).") from None
    own = peft_state(layer)
    if set(own) != set(state):
        raise ValueError(f"The adapter has {sorted(state)} for {name}, but a {type(layer).__name__} needs "
                         f"{sorted(own)}.")
    for suffix, tensor in state.items():
        if tensor.shape != own[suffix].shape:
            raise ValueError(
                f"Tensor {suffix} of {name} has shape {tuple(tensor.shape)} in the adapter, but this "
                f"model needs {tuple(own[suffix].shape)}: the adapter was made for another base model "
                f"({made_for})."
            )
        with torch.no_grad():
            own[suffix].copy_(tensor)
    return layer


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "is_peft_layer", "load_peft_adapter", "peft_state", "read_json_object",
           "read_tensors", "register_layer", "register_variant", "save_peft_adapter"]
