"""Chapter 07's before/after comparisons and its learning-rate rule, as registered experiments (notebook 07).

Every arm runs TRL exactly as notebook 07 does (``course.rlhf``: ``sft_config``, ``dpo_config``,
``grpo_config``, ``fit``; LoRA r=8, alpha 16 on every linear layer) at the chapter's CPU budget
(``RLHF_CPU``, equal to ``course.rlhf.rlhf_budget("cpu")``, fixed here so that results from any device
compare). The seed is the trainers' ``seed`` (data order, LoRA's random start) at every stage, and
the sampling seed of GRPO's held-out reward, so the arms of one seed are paired. Chapter 07 chains
its stages (SFT, then DPO on the merged SFT model, then GRPO on the merged DPO model): an arm
"after" a stage runs the stages before it for the same seed; a stage's merged model is kept for
the next arm of the same seed, so a seed trains each stage once.

- ``07-sft``: the base model against SFT with LoRA, held-out exact match on the chapter's 64
  additions (section 1; the base arm has no randomness: its interval is zero wide).
- ``07-dpo``: the SFT model against SFT + DPO, on the chapter's held-out preference pairs: the share
  of pairs whose chosen (right) answer is more likely than the rejected one (section 4).
- ``07-grpo``: the SFT + DPO model against SFT + DPO + GRPO, GRPO's held-out reward (right sum +
  bare number, 0 to 2), 4 sampled completions per held-out prompt (section 5).
- ``07-lr-rule``: section 2's learning rates: LoRA at full fine-tuning's rate (5e-5), ten times it,
  and the course's forty times (2e-3), with full fine-tuning at 5e-5 for the gap, each for half
  the SFT steps; the metric is the chapter's, the training loss of the last two steps (lower is
  better). The verdict: the course's rate against ten times.
"""

from __future__ import annotations

import copy
import functools
import os

from course.experiments.registry import QUICK, Arm, Budget, Experiment, register

#: Notebook 07's budget on a CPU (``rlhf_budget("cpu")`` without ``COURSE_QUICK``; a test keeps them equal).
#: Plain numbers, so that listing the experiments does not import torch (``course.rlhf_trl.RLHFBudget``).
RLHF_CPU = {"sft_steps": 12, "batch_size": 8, "lr": 2e-3, "seeds": (0, 1, 2), "dpo_steps": 12, "dpo_batch_size": 4,
            "dpo_lr": 5e-4, "beta": 0.1, "grpo_steps": 16, "grpo_prompts": 3, "num_generations": 4,
            "max_completion_length": 8, "grpo_lr": 2e-4, "eval_examples": 64}
#: ``--quick``: every stage for two steps of a couple of examples (a smoke test, never a result).
RLHF_QUICK = {**RLHF_CPU, "sft_steps": QUICK.steps, "batch_size": 2, "dpo_steps": QUICK.steps, "dpo_batch_size": 2,
              "grpo_steps": QUICK.steps, "grpo_prompts": 2, "num_generations": 2, "max_completion_length": 4,
              "eval_examples": QUICK.eval_examples}
FULL_LR = 5e-5  # notebook 07, section 2: a typical full fine-tuning rate
SAMPLES = 4  # GRPO's held-out reward: sampled completions per prompt (notebook 07, section 5)


def rlhf_budget(quick: bool):
    """The ``course.rlhf.RLHFBudget`` every arm trains with: notebook 07's CPU budget, or the quick one."""
    from course.rlhf_trl import RLHFBudget

    return RLHFBudget(**(RLHF_QUICK if quick else RLHF_CPU))


@functools.cache
def _context(model_name, device, dtype):
    from course.models import load_base_model, load_tokenizer

    return load_tokenizer(), load_base_model(progress=False)


def context():
    """Tokenizer and base model, loaded once per process (and per base model)."""
    from course.device import default_device, default_dtype

    device = default_device()
    return _context(os.environ.get("COURSE_MODEL"), str(device), str(default_dtype(device)))


def lora():
    """Notebook 07's ``lora()``: a fresh LoraConfig, r=8, alpha 16, every linear layer."""
    from course.rlhf import lora_config

    return lora_config(8, 16)


def _train(trainer, desc: str):
    from course.rlhf import fit

    return fit(trainer, desc)


def sft_run(seed: int, quick: bool, *, lr: float | None = None, steps: int | None = None, peft: bool = True):
    """Notebook 07's ``run_sft``: SFTTrainer on a fresh copy of the base model; a ``course.rlhf.Run``."""
    from trl import SFTTrainer

    from course.rlhf import quiet_progress, sft_config, sft_dataset

    tokenizer, base = context()
    budget = rlhf_budget(quick)
    with quiet_progress():
        data = sft_dataset("train")
        if quick:
            data = data.select(range(budget.sft_steps * budget.batch_size))
        trainer = SFTTrainer(model=copy.deepcopy(base), args=sft_config(budget, seed=seed, lr=lr, steps=steps),
                             train_dataset=data, processing_class=tokenizer, peft_config=lora() if peft else None)
    return _train(trainer, f"SFT, seed {seed}")


def plain(model):
    """``model`` without the ``forward`` a trainer leaves on the instance (accelerate wraps it for mixed
    precision, and PEFT's merge hands back the model with the wrapper on): through it a deep copy of the
    trained model keeps computing with the weights of the model that was trained, not its own. Chapter 07's
    chain deep-copies each stage's model for the next, so without this DPO and GRPO scored exactly as
    their inputs (tests/test_experiments.py)."""
    for module in (model, getattr(model, "get_base_model", lambda: None)()):
        if module is not None:
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_original_forward", None)
    return model


# One merged model per stage, for the latest (seed, quick, base model): the next arm of that seed reuses it.
_STAGES: dict[str, tuple[tuple, object]] = {}


def _key(seed: int, quick: bool) -> tuple:
    from course.device import default_device

    return seed, quick, os.environ.get("COURSE_MODEL"), str(default_device())


def _stage(stage: str, seed: int, quick: bool, make):
    key = _key(seed, quick)
    held = _STAGES.get(stage)
    if held is None or held[0] != key:
        _STAGES.pop(stage, None)  # free the previous seed's model first
        _STAGES[stage] = (key, make())
    return _STAGES[stage][1]


def sft_model(seed: int, quick: bool):
    """The SFT LoRA of ``seed`` merged into its base (notebook 07's ``save_merge_reload``, in memory)."""
    return _stage("sft", seed, quick, lambda: plain(sft_run(seed, quick).model.merge_and_unload()).eval())


def dpo_model(seed: int, quick: bool):
    """DPO with a LoRA on the SFT model of ``seed`` (reference: the adapter disabled), merged."""

    def make():
        from trl import DPOTrainer

        from course.rlhf import dpo_config, preference_dataset, quiet_progress

        tokenizer, _ = context()
        budget = rlhf_budget(quick)
        with quiet_progress():
            data = preference_dataset("train")
            if quick:
                data = data.select(range(budget.dpo_steps * budget.dpo_batch_size))
            trainer = DPOTrainer(model=copy.deepcopy(sft_model(seed, quick)), ref_model=None,
                                 args=dpo_config(budget, seed=seed), train_dataset=data, processing_class=tokenizer,
                                 peft_config=lora())
        return plain(_train(trainer, f"DPO, seed {seed}").model.merge_and_unload()).eval()

    return _stage("dpo", seed, quick, make)


def grpo_model(seed: int, quick: bool):
    """GRPO with a LoRA on the DPO model of ``seed``, notebook 07's two rewards, merged."""
    from trl import GRPOTrainer

    from course.rlhf import grpo_config, grpo_dataset, quiet_progress

    tokenizer, _ = context()
    budget = rlhf_budget(quick)
    with quiet_progress():
        data = grpo_dataset("train")
        if quick:
            data = data.select(range(budget.grpo_steps * budget.grpo_prompts))
        trainer = GRPOTrainer(model=copy.deepcopy(dpo_model(seed, quick)), reward_funcs=reward_funcs(),
                              args=grpo_config(budget, seed=seed), train_dataset=data, processing_class=tokenizer,
                              peft_config=lora())
    return plain(_train(trainer, f"GRPO, seed {seed}").model)


def reward_funcs():
    from course.rlhf import addition_reward, number_only_reward

    return [addition_reward, number_only_reward]


# ---------------------------------------------------------------------------
# The metrics, on the chapter's held-out data
# ---------------------------------------------------------------------------


def exact_match(model, quick: bool) -> float:
    """Held-out exact match on the chapter's ``eval_set``: the first ``eval_examples`` held-out additions."""
    from course.data import addition_splits
    from course.generate import accuracy

    tokenizer, _ = context()
    return accuracy(model, tokenizer, addition_splits()["eval"].select(range(rlhf_budget(quick).eval_examples)))


def preference_accuracy(model, quick: bool) -> float:
    """Share of the chapter's held-out pairs whose chosen answer ``model`` finds more likely than the rejected."""
    from course.rlhf import preference_dataset, preference_logps

    tokenizer, _ = context()
    pairs = preference_dataset("eval").select(range(rlhf_budget(quick).eval_examples // 2))
    chosen, rejected = preference_logps(model, tokenizer, pairs)
    return (chosen > rejected).float().mean().item()


def held_out_reward(model, seed: int, quick: bool) -> float:
    """GRPO's reward on the chapter's held-out prompts, ``SAMPLES`` sampled completions each (seeded)."""
    from course.rlhf import grpo_dataset, quiet_progress, sampled_reward

    tokenizer, _ = context()
    budget = rlhf_budget(quick)
    with quiet_progress():
        prompts = grpo_dataset("eval").select(range(max(4, budget.eval_examples // 2)))
    return sampled_reward(model, tokenizer, prompts, reward_funcs(), samples=SAMPLES,
                          max_new_tokens=budget.max_completion_length, seed=seed)["reward"]


def last_losses(run) -> float:
    """The chapter's section-2 number: the mean training loss of the last two steps."""
    losses = run.losses[-2:]
    return sum(losses) / len(losses)


# ---------------------------------------------------------------------------
# The arms and the experiments
# ---------------------------------------------------------------------------

STAGES = {
    "base": lambda seed, quick: context()[1],
    "sft": sft_model,
    "dpo": dpo_model,
    "grpo": grpo_model,
}
METRICS = {
    "exact match": lambda model, seed, quick: exact_match(model, quick),
    "preference accuracy": lambda model, seed, quick: preference_accuracy(model, quick),
    "held-out reward": held_out_reward,
}


def stage_arm(name: str, stage: str, metric: str) -> Arm:
    """An arm that scores the chain's model after ``stage`` (``base``, ``sft``, ``dpo``, ``grpo``) on ``metric``."""

    def run(seed: int, quick: bool) -> float:
        return float(METRICS[metric](STAGES[stage](seed, quick), seed, quick))

    return Arm(name, run, {"after": stage, "metric": metric, "lora": "r=8, alpha 16, all linear"})


def lr_arm(name: str, lr: float, *, peft: bool = True) -> Arm:
    """Section 2: SFT for half the steps at learning rate ``lr``, LoRA or (``peft=False``) every weight."""

    def run(seed: int, quick: bool) -> float:
        steps = max(2, rlhf_budget(quick).sft_steps // 2)
        return last_losses(sft_run(seed, quick, lr=lr, steps=steps, peft=peft))

    return Arm(name, run, {"lr": lr, "training": "LoRA r=8, alpha 16, all linear" if peft else "full fine-tuning"})


_B = RLHF_CPU
SFT = Budget(steps=_B["sft_steps"], batch_size=_B["batch_size"], eval_examples=_B["eval_examples"])
DPO = Budget(steps=_B["dpo_steps"], batch_size=_B["dpo_batch_size"], eval_examples=_B["eval_examples"] // 2)
GRPO = Budget(steps=_B["grpo_steps"], batch_size=_B["grpo_prompts"] * _B["num_generations"],
              eval_examples=_B["eval_examples"] // 2)
LR_RULE = Budget(steps=_B["sft_steps"] // 2, batch_size=_B["batch_size"], eval_examples=0)
COURSE_LR = _B["lr"]

EXPERIMENTS = [
    Experiment(
        "07-sft", "07_trl_rlhf", "held-out exact match",
        arms=(stage_arm("base model", "base", "exact match"), stage_arm("SFT (LoRA)", "sft", "exact match")),
        verdict=("SFT (LoRA)", "base model"), budget=SFT,
        description="SFTTrainer with LoRA against the base model it starts from."),
    Experiment(
        "07-dpo", "07_trl_rlhf", "held-out pairs preferring the right answer",
        arms=(stage_arm("SFT", "sft", "preference accuracy"),
              stage_arm("SFT + DPO", "dpo", "preference accuracy")),
        verdict=("SFT + DPO", "SFT"), budget=DPO,
        description="DPOTrainer with LoRA on the SFT model, against the SFT model (DPO's reference)."),
    Experiment(
        "07-grpo", "07_trl_rlhf", "held-out GRPO reward (0 to 2)",
        arms=(stage_arm("SFT + DPO", "dpo", "held-out reward"),
              stage_arm("SFT + DPO + GRPO", "grpo", "held-out reward")),
        verdict=("SFT + DPO + GRPO", "SFT + DPO"), budget=GRPO,
        description="GRPOTrainer with LoRA on the DPO model, against the DPO model, on sampled replies."),
    Experiment(
        "07-lr-rule", "07_trl_rlhf", "training loss, last two steps",
        arms=(lr_arm("full fine-tuning lr 5e-5", FULL_LR, peft=False),
              lr_arm("LoRA lr 5e-5 (1x)", FULL_LR),
              lr_arm("LoRA lr 5e-4 (10x)", 10 * FULL_LR),
              lr_arm(f"LoRA lr {COURSE_LR:g} (40x, the course's)", COURSE_LR)),
        verdict=(f"LoRA lr {COURSE_LR:g} (40x, the course's)", "LoRA lr 5e-4 (10x)"), budget=LR_RULE,
        higher_is_better=False,
        description="LoRA's learning rate against full fine-tuning's: the course's 40 times against 10 times "
                    "(and 1 time), with full fine-tuning at 5e-5 for the gap each closes."),
]

for _experiment in EXPERIMENTS:
    register(_experiment, replace=True)
