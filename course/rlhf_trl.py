"""TRL on the course task, the configuration side (notebook 07): the chapter's budget, every TRL
configuration in one place, and the course task in the formats TRL takes.

``rlhf_budget`` derives from ``course.train.default_budget`` and so honours ``COURSE_QUICK=1``;
``sft_config``, ``dpo_config`` and ``grpo_config`` are offline, report nowhere, save nothing
and keep the trainer's scratch folder temporary. ``sft_dataset``, ``preference_dataset`` and
``grpo_dataset`` hold the addition task; ``number_only_reward`` is GRPO's format reward beside
``course.data.addition_reward``. Re-exported by ``course.rlhf``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch

from course.data import addition_preferences, addition_reward, addition_splits, extract_number
from course.device import default_device, default_dtype
from course.train import default_budget

__all__ = ["RLHFBudget", "rlhf_budget", "scratch_dir", "lora_config", "sft_config", "dpo_config", "grpo_config",
           "sft_dataset", "preference_dataset", "grpo_dataset", "addition_reward", "number_only_reward"]

# ---------------------------------------------------------------------------
# Budgets and TRL configurations, in one place
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RLHFBudget:
    """How much notebook 07 trains at each stage (see ``rlhf_budget``)."""

    sft_steps: int
    batch_size: int
    lr: float
    seeds: tuple[int, ...]
    dpo_steps: int
    dpo_batch_size: int
    dpo_lr: float
    beta: float
    grpo_steps: int
    grpo_prompts: int
    num_generations: int
    max_completion_length: int
    grpo_lr: float
    eval_examples: int


def rlhf_budget(device: torch.device | str | None = None) -> RLHFBudget:
    """The chapter's budget, derived from ``course.train.default_budget`` (so ``COURSE_QUICK=1`` shrinks it).

    On a 2-core CPU (``default_budget``: 30 steps of 16) each SFT run is 12 steps of 8 examples,
    DPO 12 steps of 4 pairs, GRPO 16 steps of 3 prompts x 4 sampled completions, about a minute
    each (notebook 07 prints the times); on a GPU everything grows with ``default_budget``. The
    learning rates are for LoRA (section 2 of the notebook): SFT at ``default_budget``'s rate, DPO
    at a quarter of it and GRPO, whose gradients are the noisiest, at a tenth.
    """
    base = default_budget(device)
    quick = os.environ.get("COURSE_QUICK") == "1"
    steps = max(2, round(base.steps * 0.4))  # CPU: 12 of chapter 02's 30
    return RLHFBudget(
        sft_steps=steps,
        batch_size=max(2, base.batch_size // 2),
        lr=base.lr,
        seeds=(0, 1) if quick else (0, 1, 2),
        dpo_steps=steps,
        dpo_batch_size=max(2, base.batch_size // 4),
        dpo_lr=base.lr / 4,
        beta=0.1,
        grpo_steps=steps + steps // 3,
        grpo_prompts=max(2, base.batch_size * 3 // 16),
        num_generations=4,
        max_completion_length=8,
        grpo_lr=base.lr / 10,
        eval_examples=base.eval_examples,
    )


_SCRATCH: tempfile.TemporaryDirectory | None = None


def scratch_dir(name: str) -> str:
    """A fresh folder for a trainer's ``output_dir``, inside one temporary folder removed at exit."""
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = tempfile.TemporaryDirectory(prefix="course-trl-")
    return tempfile.mkdtemp(prefix=f"{name}-", dir=_SCRATCH.name)


def _common(name: str, steps: int, batch_size: int, lr: float, seed: int) -> dict:
    """What every TRL config here shares: offline, quiet, nothing saved, precision from ``course.device``."""
    device = default_device()
    dtype = default_dtype(device)
    return {
        "output_dir": scratch_dir(name),
        "max_steps": steps,
        "per_device_train_batch_size": batch_size,
        "learning_rate": lr,
        "lr_scheduler_type": "constant",  # as course.train: short runs, no decay
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "seed": seed,
        "logging_steps": 1,  # a log entry per step: the curves in the notebook
        "report_to": "none",  # no wandb, tensorboard, trackio...
        "save_strategy": "no",  # the notebook saves what it needs itself
        "disable_tqdm": True,  # fit() shows the course's own bar instead
        **_no_activation_checkpointing(),
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "use_cpu": device.type == "cpu",
        "dataloader_pin_memory": device.type == "cuda",
        "push_to_hub": False,
    }


def _no_activation_checkpointing() -> dict:
    """TRL turns activation (gradient) checkpointing on by default; a 135M model does not need it.

    transformers 5 renamed the option ``activation_checkpointing`` and warns about the old name.
    """
    from transformers import TrainingArguments

    fields = getattr(TrainingArguments, "__dataclass_fields__", {})
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: False}


def lora_config(r: int = 8, alpha: int = 16, *, use_dora: bool = False, target_modules="all-linear"):
    """PEFT's ``LoraConfig`` for a causal LM: all linear layers but the output head by default."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules,
                      use_dora=use_dora, task_type="CAUSAL_LM")


def sft_config(budget: RLHFBudget, *, lr: float | None = None, seed: int = 0, steps: int | None = None):
    """``SFTConfig`` for the addition task in prompt-completion chat format (loss on the answer only)."""
    from trl import SFTConfig

    return SFTConfig(**_common("sft", steps or budget.sft_steps, budget.batch_size, lr or budget.lr, seed),
                     max_length=64, completion_only_loss=True)


def dpo_config(budget: RLHFBudget, *, seed: int = 0):
    """``DPOConfig``: sigmoid loss with ``budget.beta``; the reference is the model with its adapter disabled."""
    from trl import DPOConfig

    return DPOConfig(**_common("dpo", budget.dpo_steps, budget.dpo_batch_size, budget.dpo_lr, seed),
                     beta=budget.beta, loss_type="sigmoid", max_length=64)


def grpo_config(budget: RLHFBudget, *, seed: int = 0):
    """``GRPOConfig``: ``grpo_prompts`` prompts x ``num_generations`` sampled completions per step."""
    from trl import GRPOConfig

    batch = budget.grpo_prompts * budget.num_generations  # TRL counts completions, not prompts
    return GRPOConfig(**_common("grpo", budget.grpo_steps, batch, budget.grpo_lr, seed),
                      num_generations=budget.num_generations, max_completion_length=budget.max_completion_length,
                      temperature=1.0, beta=0.0, log_completions=False)


# ---------------------------------------------------------------------------
# The course task in TRL's formats, and the rewards
# ---------------------------------------------------------------------------


def sft_dataset(split: str = "train"):
    """The addition task as conversational prompt-completion pairs: SFTTrainer trains on the completion only."""
    data = addition_splits()[split]
    return data.map(lambda row: {"prompt": [row["messages"][0]], "completion": [row["messages"][1]]},
                    remove_columns=data.column_names)


def preference_dataset(split: str = "train"):
    """``course.data.addition_preferences``: conversational ``prompt``, ``chosen`` (right), ``rejected`` (a
    plausible mistake), plus ``answer``."""
    return addition_preferences()[split]


def grpo_dataset(split: str = "train"):
    """Conversational prompts with their ``answer`` column, which TRL passes to the reward functions."""
    data = addition_splits()[split]
    return data.map(lambda row: {"prompt": [row["messages"][0]]}, remove_columns=["messages"])


def number_only_reward(completions, **kwargs) -> list[float]:
    """GRPO reward for the format: 1.0 when the reply is a number and nothing else, else 0.0.

    Beside ``addition_reward`` (which reads only the first number of a reply) it closes a
    loophole: "82 and 83" earns the correctness reward for 82, but not this one.
    """
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if extract_number(t) is not None and t.strip() == extract_number(t) else 0.0 for t in texts]
