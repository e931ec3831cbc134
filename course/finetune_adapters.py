"""The adapter ``python -m course finetune`` trains: PEFT's config for ``--method``, or the course's NOLA layers (notebook 08).

The targets follow PEFT's rule (``course.surgery.matches_target``), and the rank is checked
against every targeted layer before anything trains.
"""

from __future__ import annotations

import torch

from course.finetune_output import UsageError, check_rank


def _targeted_linears(model, targets) -> dict[str, torch.nn.Module]:
    """The linear layers PEFT adapts for ``targets``: names by ``course.surgery.matches_target``
    (``q_proj`` or ``self_attn.q_proj``), or every linear layer but ``lm_head`` for ``"all-linear"``."""
    from torch import nn

    from course.surgery import matches_target

    linear_types = (nn.Linear,)
    try:
        import bitsandbytes as bnb

        linear_types += (bnb.nn.Linear4bit,)
    except ImportError:  # pragma: no cover
        pass
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, linear_types):
            continue
        if targets == "all-linear":  # PEFT's all-linear: every linear layer but the output layer
            wanted = name.rpartition(".")[2] != "lm_head"
        else:
            wanted = matches_target(name, targets)
        if wanted:
            found[name] = module
    return found


def adapter_config(o, model):
    """The PEFT config of ``--method``, after checking the targets and the rank against the model."""
    from peft import LoraConfig, VeraConfig

    targets = "all-linear" if o.lora_target_modules.strip() == "all-linear" else [
        t.strip() for t in o.lora_target_modules.split(",") if t.strip()]
    found = _targeted_linears(model, targets)
    if not found:
        names = sorted({n.rpartition(".")[2] for n in _targeted_linears(model, "all-linear")})
        raise UsageError(f"--lora_target_modules {o.lora_target_modules!r} matches no linear layer of this model; "
                         f"its linear layers are called: {', '.join(names)} (give names, or dotted ends of "
                         "names such as self_attn.q_proj, comma-separated).")
    for name, module in found.items():
        check_rank(o, name, in_features=module.in_features, out_features=module.out_features)
    if o.method == "nola":
        return {"target_modules": sorted(found)}  # no PEFT config: the course's layers (nola_model)
    if o.method == "vera":
        return VeraConfig(r=o.lora_r, target_modules=targets, vera_dropout=o.lora_dropout, task_type="CAUSAL_LM")
    return LoraConfig(r=o.lora_r, lora_alpha=o.lora_alpha, lora_dropout=o.lora_dropout, target_modules=targets,
                      use_dora=o.method == "dora", init_lora_weights="olora" if o.method == "olora" else True,
                      task_type="CAUSAL_LM")


def nola_model(o, model, config: dict):
    """NOLA on the targeted linear layers with the course's ``NOLALoRALinear`` (notebook 05).

    Each layer's random basis comes from ``--seed`` and the layer's name, so every process
    builds the same one; only the coefficients train.
    """
    from course.lora import inject_lora, mark_only_lora_as_trainable
    from course.nola import nola_layer

    inject_lora(model, config["target_modules"], o.lora_r, o.lora_alpha, o.lora_dropout,
                layer=nola_layer(model, o.seed), num_basis_A=o.nola_num_basis, num_basis_B=o.nola_num_basis)
    mark_only_lora_as_trainable(model)
    return model
