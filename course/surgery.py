"""Model surgery: find the modules an adapter targets and swap layers in place (notebook 02).

One rule for "is this module a target?", the one PEFT uses for a list of names
(``peft.tuners.tuners_utils.check_target_module_exists``): a module is targeted when
its full name *is* a target, or ends in ``"." + target``. So ``"q_proj"`` matches
``model.layers.0.self_attn.q_proj``, ``"self_attn.q_proj"`` matches the same module
(a dotted suffix), and ``"proj"`` does not match ``q_proj`` (whole name parts only).
``course.lora.inject_lora``, the adapter files, the checks and ``python -m course
finetune`` all use ``matches_target``.

The other helpers are the plumbing every method's injection shares: the named modules
that are not inside an adapter layer already, and putting a new layer where an old one
was. They import nothing from the methods, so every method can import them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["adapter_layers", "as_targets", "is_adapted", "matches_target", "plain_modules", "replace_module",
           "swap_in", "targeted_names"]


def as_targets(target_modules) -> list[str]:
    """``"q_proj"`` or ``["q_proj", "v_proj"]`` as a list of names (a single string is one name)."""
    if isinstance(target_modules, str):
        return [target_modules]
    targets = list(target_modules)
    bad = [t for t in targets if not isinstance(t, str) or not t]
    if bad:
        raise TypeError(f"target_modules holds module names (strings such as 'q_proj' or "
                        f"'self_attn.q_proj'), got {bad!r}.")
    return targets


def matches_target(name: str, target_modules: Iterable[str] | str) -> bool:
    """Whether the module called ``name`` is one of ``target_modules``, by PEFT's rule for a list.

    True when ``name`` equals a target or ends in ``"." + target``; a single string is taken
    as a one-name list (not as PEFT's regular expression).
    """
    return any(name == t or name.endswith("." + t) for t in as_targets(target_modules))


def targeted_names(model: nn.Module, target_modules) -> list[str]:
    """The names in ``model.named_modules()`` that ``target_modules`` picks, in model order."""
    targets = as_targets(target_modules)
    return [name for name, _ in model.named_modules() if name and matches_target(name, targets)]


def is_adapted(module: nn.Module) -> bool:
    """An adapter layer already: the course's (it has ``base_layer``) or a learner's (it has ``lora_A``)."""
    return hasattr(module, "base_layer") or hasattr(module, "lora_A")


def plain_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of ``model``, leaving out the insides of adapter layers already there."""
    out: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if name and is_adapted(module):
            inside.append(name)
        out[name] = module
    return out


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` for every adapter layer of ``model``: the one rule for what counts as a layer.

    A layer is a named module that ``is_adapted`` (the course's, PEFT's or a learner's), outside any
    other adapter layer (its ``base_layer`` is not a second one). ``course.lora.lora_layers``,
    ``course.nola.nola_layers``, OLoRA's ``to_lora`` and ``save_peft_adapter`` all start from it.
    """
    return {name: m for name, m in plain_modules(model).items() if name and is_adapted(m)}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the module ``name`` (a dotted name from ``named_modules()``) was.

    ``setattr(model, "layers.0.q_proj", new)`` would only add an attribute with dots in its
    name: the new module is set on its parent instead.
    """
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def swap_in(model: nn.Module, names: Iterable[str], build: Callable[[str, nn.Module | None], nn.Module], *,
            changes_base_weight: bool = False) -> nn.Module:
    """Put ``build(name, module)`` in place of each named module: all of them, or none.

    Every new layer is built before any is put in. Building one freezes its base (and OLoRA's
    changes the base weight, ``changes_base_weight=True``), so when a build fails every
    ``requires_grad`` flag and every changed weight is put back before the error goes on: the
    model is as it was. ``module`` is ``None`` for a name the model does not have (``build``
    says what to do). ``inject_lora``, ``load_peft_adapter`` and ``load_nola`` all swap this way.
    """
    names = list(names)
    modules = plain_modules(model)
    was_trainable = {p: p.requires_grad for p in model.parameters()}
    originals = {}
    if changes_base_weight:
        originals = {name: modules[name].weight.detach().clone() for name in names
                     if isinstance(getattr(modules.get(name), "weight", None), torch.Tensor)}
    new = {}
    try:
        for name in names:
            new[name] = build(name, modules.get(name))
    except BaseException:
        for p, flag in was_trainable.items():
            p.requires_grad_(flag)
        with torch.no_grad():
            for name, weight in originals.items():
                modules[name].weight.copy_(weight)
        raise
    for name, layer in new.items():  # everything fitted: now change the model
        replace_module(model, name, layer)
    return model
