"""The chapters' comparisons on the addition task, as registered experiments (notebooks 02-05).

Each arm fine-tunes a fresh copy of the base model with adapters for one seed, exactly as its
notebook does (same targets, rank, alpha, learning rate, steps and batch: the notebook's CPU
budget, fixed here so that results from any device compare), and returns the held-out exact
match of greedy replies (``course.generate.accuracy``). The seed sets the order of the training
examples (``course.train.train(seed=)``) and the adapters' random start (``torch.manual_seed``
before injection; NOLA's basis seed and VeRA's projection key too), so two arms of one seed see
the same batches in the same order: the comparison is paired.

- ``02-lora-rank``: LoRA r=8 against r=2 on q, k, v, o at alpha 16 (Hu et al.'s alpha / r rule),
  notebook 02's rank sweep (section 6).
- ``03-dora-vs-lora``: DoRA against LoRA at r=2, alpha 4, every linear layer of the top half,
  lr 5e-3, notebook 03's seeds section.
- ``04-olora-vs-lora-lr-2e-4`` and ``04-olora-vs-lora-lr-2e-3``: OLoRA against LoRA at r=8 on
  q, k, v, o, at a tenth of the course's learning rate and at the course's (notebook 04, section 4).
- ``05-nola-vs-lora``: NOLA (K=256 per factor, r=8) against rank-1 LoRA, LoRA's floor, with VeRA
  (r=256) as a third arm, on q and v, each at its notebook's learning rate (notebook 05, section 7).
"""

from __future__ import annotations

import copy
import functools
import os

from course.experiments.registry import QUICK, Arm, Budget, Experiment, register

METRIC = "held-out exact match"
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
QV = ("q_proj", "v_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@functools.cache
def _context(model_name, device, dtype):
    """Tokenizer, base model and addition splits, loaded once per process (and per base model)."""
    from course.data import addition_splits
    from course.models import load_base_model, load_tokenizer

    return load_tokenizer(), load_base_model(progress=False), addition_splits()


def context():
    from course.device import default_device, default_dtype

    device = default_device()
    return _context(os.environ.get("COURSE_MODEL"), str(device), str(default_dtype(device)))


def top_half(model, kinds=ALL_LINEAR) -> list[str]:
    """Full names of the ``kinds`` of linear layers in the upper half of the blocks (notebook 03's TOP_HALF)."""
    from torch import nn

    blocks = model.config.num_hidden_layers
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)
            and name.rpartition(".")[2] in kinds and name.startswith("model.layers.")
            and int(name.split(".")[2]) >= blocks // 2]


def _train_and_score(model, seed: int, quick: bool, budget: Budget, lr: float) -> float:
    from course.generate import accuracy
    from course.train import train

    tokenizer, _, splits = context()
    b = QUICK if quick else budget
    data = splits["train"]
    if quick:  # train() tokenises the whole split first: give it only the questions the quick steps use
        data = data.select(range(b.steps * b.batch_size))
    train(model, tokenizer, data, steps=b.steps, batch_size=b.batch_size, lr=lr, seed=seed, progress=False)
    return accuracy(model, tokenizer, splits["eval"].select(range(b.eval_examples)))


def lora_arm(name: str, *, budget: Budget, r: int, alpha: float, lr: float, targets=QKVO, layer: str = "lora",
             **options) -> Arm:
    """An arm that trains course adapters: ``layer`` is ``lora``, ``dora``, ``olora`` or ``nola``;
    ``targets`` a list of module names or a function of the model that returns them."""

    def run(seed: int, quick: bool) -> float:
        import torch

        from course.lora import LoRALinear, inject_lora, mark_only_lora_as_trainable

        _, base, _ = context()
        model = copy.deepcopy(base)
        torch.manual_seed(seed)  # the adapters' random start
        if layer == "dora":
            from course.dora import DoRALinear as kind
        elif layer == "olora":
            from course.olora import OLoRALinear as kind
        elif layer == "nola":
            from course.nola import nola_layer

            kind = nola_layer(model, seed=seed)
        else:
            kind = LoRALinear
        chosen = targets(model) if callable(targets) else list(targets)
        mark_only_lora_as_trainable(inject_lora(model, chosen, r, alpha, layer=kind, **options))
        return _train_and_score(model, seed, quick, budget, lr)

    settings = {"layer": layer, "r": r, "alpha": alpha, "lr": lr, **options,
                "targets": "top half, all linear" if callable(targets) else list(targets)}
    return Arm(name, run, settings)


def vera_arm(name: str, *, budget: Budget, r: int, lr: float, targets=QV) -> Arm:
    """PEFT's VeRA (Kopiczko et al. 2024) with projection key ``seed``."""

    def run(seed: int, quick: bool) -> float:
        import torch
        from peft import VeraConfig, get_peft_model

        _, base, _ = context()
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(base), VeraConfig(r=r, target_modules=list(targets),
                                                               projection_prng_key=seed))
        return _train_and_score(model, seed, quick, budget, lr)

    return Arm(name, run, {"layer": "vera (PEFT)", "r": r, "lr": lr, "targets": list(targets)})


# The notebooks' CPU budgets (course.train.default_budget: 30 steps of batch 16, lr 2e-3, 64 questions).
RANK_SWEEP = Budget(steps=6, batch_size=8, eval_examples=32)  # notebook 02, section 6
DORA = Budget(steps=15, batch_size=8, eval_examples=64)  # notebook 03, section 6
OLORA = Budget(steps=12, batch_size=8, eval_examples=32)  # notebook 04, section 4
NOLA = Budget(steps=15, batch_size=8, eval_examples=64)  # notebook 05, section 7

EXPERIMENTS = [
    Experiment(
        "02-lora-rank", "02_lora_from_scratch", METRIC,
        arms=(lora_arm("LoRA r=2", budget=RANK_SWEEP, r=2, alpha=16, lr=2e-3),
              lora_arm("LoRA r=8", budget=RANK_SWEEP, r=8, alpha=16, lr=2e-3)),
        verdict=("LoRA r=8", "LoRA r=2"), budget=RANK_SWEEP,
        description="LoRA's rank at a fixed alpha (alpha / r): does r=8 beat r=2 after the same steps?"),
    Experiment(
        "03-dora-vs-lora", "03_dora", METRIC,
        arms=(lora_arm("LoRA", budget=DORA, r=2, alpha=4, lr=5e-3, targets=top_half),
              lora_arm("DoRA", budget=DORA, r=2, alpha=4, lr=5e-3, targets=top_half, layer="dora")),
        verdict=("DoRA", "LoRA"), budget=DORA,
        description="DoRA against LoRA at rank 2 on every linear layer of the top half of the blocks."),
    *[Experiment(
        f"04-olora-vs-lora-lr-{label}", "04_olora", METRIC,
        arms=(lora_arm("LoRA", budget=OLORA, r=8, alpha=16, lr=lr),
              lora_arm("OLoRA", budget=OLORA, r=8, alpha=16, lr=lr, layer="olora")),
        verdict=("OLoRA", "LoRA"), budget=OLORA,
        description=f"OLoRA against LoRA at learning rate {lr:g} ({which}).")
      for lr, label, which in ((2e-4, "2e-4", "a tenth of the course's"), (2e-3, "2e-3", "the course's, tuned for LoRA"))],
    Experiment(
        "05-nola-vs-lora", "05_nola", METRIC,
        arms=(lora_arm("NOLA K=256", budget=NOLA, r=8, alpha=16, lr=1e-2, targets=QV, layer="nola",
                       num_basis_A=256, num_basis_B=256),
              lora_arm("LoRA r=1", budget=NOLA, r=1, alpha=2, lr=5e-3, targets=QV),
              vera_arm("VeRA r=256", budget=NOLA, r=256, lr=1e-1)),
        verdict=("NOLA K=256", "LoRA r=1"), budget=NOLA,
        description="NOLA, with fewer trained numbers than rank-1 LoRA, against rank-1 LoRA; VeRA beside them."),
]

for _experiment in EXPERIMENTS:
    register(_experiment, replace=True)
