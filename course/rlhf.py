"""TRL with LoRA: supervised fine-tuning, DPO and GRPO on the course task (notebook 07).

The maths is one function, ``dpo_loss`` (eq. 7 of Rafailov et al. 2023, *Direct
Preference Optimization: Your Language Model is Secretly a Reward Model*)::

    loss_i = -log sigmoid( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )

per example i, with y_w the chosen and y_l the rejected completion; it equals TRL's
``loss_type="sigmoid"`` DPO loss (tests/test_rlhf.py). GRPO's group-relative advantages are
``grpo_advantages`` (section 4.1.2 of Shao et al. 2024, *DeepSeekMath*, as TRL's ``GRPOTrainer``
computes them; tests/test_rlhf.py runs the trainer to compare).

The rest is the plumbing that keeps the notebook short:

- the course task in the formats TRL takes (``sft_dataset``, ``preference_dataset``,
  ``grpo_dataset``) and the rule-based rewards for GRPO (``course.data.addition_reward``,
  ``number_only_reward``);
- every TRL configuration in one place (``sft_config``, ``dpo_config``, ``grpo_config``), sized
  by ``rlhf_budget``, which derives from ``course.train.default_budget`` and so honours
  ``COURSE_QUICK=1``: offline, no reporting integrations, nothing saved by the trainer, its
  scratch folder temporary;
- ``fit``: run a trainer under the course's progress bar and collect its per-step logs;
- ``preference_logps`` and ``reward_margins``: DPO's implicit reward on held-out pairs;
- ``save_merge_reload``: save the adapter, merge it, save the merged model, reload it and
  check that it computes what the trained model computes (``_compare_models``, on chapter 06's
  ``course.merging.compare_models``);
- ``sampled_reward``: GRPO's reward on held-out prompts, sampled as GRPO samples;
- ``memory_growth`` and ``tensor_bytes``: the memory a second copy of the model takes.
"""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from course.data import addition_preferences, addition_reward, addition_splits, extract_number
from course.device import default_device, default_dtype
from course.train import default_budget

__all__ = [
    "dpo_loss",
    "grpo_advantages",
    "RLHFBudget",
    "rlhf_budget",
    "lora_config",
    "sft_config",
    "dpo_config",
    "grpo_config",
    "sft_dataset",
    "preference_dataset",
    "grpo_dataset",
    "addition_reward",
    "number_only_reward",
    "fit",
    "Run",
    "preference_logps",
    "reward_margins",
    "save_merge_reload",
    "resident_bytes",
    "tensor_bytes",
    "memory_growth",
    "sampled_reward",
]


# ---------------------------------------------------------------------------
# The maths
# ---------------------------------------------------------------------------


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta: float = 0.1) -> torch.Tensor:
    """Per-example DPO loss (eq. 7 of Rafailov et al. 2023), TRL's ``loss_type="sigmoid"``.

    Each argument holds one summed log-probability per example (shape ``(batch,)``): of the
    chosen and rejected completions under the policy being trained and under the frozen
    reference. ``beta * (policy - reference)`` is DPO's implicit reward; the loss pushes the
    chosen completion's reward above the rejected one's. Returns one loss per example (take
    ``.mean()`` to train on a batch).
    """
    tensors = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"dpo_loss takes four log-probability tensors of one shape (one number per example), "
                         f"got shapes {[tuple(t.shape) for t in tensors]}.")
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """GRPO's group-relative advantages (Shao et al. 2024, section 4.1.2), as TRL's ``GRPOTrainer`` computes them.

    ``rewards`` holds one reward per completion, flat, with the ``group_size`` completions of each
    prompt consecutive (TRL's ``num_generations``). Each completion's baseline is the mean reward of
    its group; ``scale_rewards`` says what the difference is divided by:

    - ``"group"`` (TRL's default): the group's sample standard deviation (Bessel, n - 1) + 1e-4;
    - ``"batch"``: the standard deviation of the whole batch + 1e-4 (the baseline stays the group's mean);
    - ``"none"``: nothing (Dr. GRPO, Liu et al. 2025).

    ``True`` and ``False`` mean "group" and "none", as in ``GRPOConfig``. Returns a flat tensor like
    ``rewards``. TRL also accepts NaN rewards (completions no reward function scored), leaves them
    out of the statistics and gives them advantage 0; here a NaN is refused.
    """
    rewards, scale_rewards = _grpo_inputs(rewards, group_size, scale_rewards)
    groups = rewards.view(-1, group_size)  # one row per prompt
    advantages = rewards - groups.mean(dim=1).repeat_interleave(group_size)
    if scale_rewards == "none":
        return advantages
    if scale_rewards == "group":
        std = groups.std(dim=1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(rewards)
    else:
        std = rewards.std() if rewards.numel() > 1 else torch.zeros_like(rewards)
    return advantages / (std + 1e-4)


def _grpo_inputs(rewards, group_size, scale_rewards) -> tuple[torch.Tensor, str]:
    """``grpo_advantages``'s arguments, checked: a flat float tensor, whole groups, a known scaling."""
    scale = {True: "group", False: "none"}[scale_rewards] if isinstance(scale_rewards, bool) else scale_rewards
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none' (as in TRL's GRPOConfig), got "
                         f"{scale_rewards!r}.")
    rewards = torch.as_tensor(rewards)
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be flat, one reward per completion with each prompt's completions "
                         f"consecutive; got shape {tuple(rewards.shape)}. Flatten it (rewards.flatten()) in "
                         "that order.")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int (completions per prompt), got {group_size!r}.")
    if rewards.numel() == 0 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not make whole groups of {group_size}: each prompt needs "
                         "exactly group_size completions.")
    if torch.isnan(rewards).any():
        raise ValueError("rewards holds NaN: score every completion (TRL gives unscored ones advantage 0 and "
                         "leaves them out of the group statistics).")
    return rewards, scale


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


# ---------------------------------------------------------------------------
# Running a trainer: the course's progress bar, the per-step logs
# ---------------------------------------------------------------------------


class _DisplayLine:
    """A file-like object for tqdm that shows only its latest line, in place.

    In a notebook the line is an output that is updated, so the saved notebook holds the
    bar's final state (100%, the last loss), never a bar frozen at 0%.
    """

    def __init__(self):
        from IPython.display import display

        self._handle = display({"text/plain": ""}, raw=True, display_id=True)
        self._last = ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "\n").strip().rpartition("\n")[2]
        if line and line != self._last:
            self._last = line
            self._handle.update({"text/plain": line}, raw=True)

    def flush(self) -> None:
        pass


def _progress_file():
    with contextlib.suppress(ImportError):
        from IPython import get_ipython

        if get_ipython() is not None and hasattr(get_ipython(), "kernel"):
            return _DisplayLine()
    return None  # a terminal: tqdm's own bar on stderr


def progress_bar(total: int, desc: str):
    """A tqdm bar; in a notebook, a text line updated in place (see ``_DisplayLine``)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=_progress_file(), mininterval=0.5,
                bar_format="{l_bar}{bar:20}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")


def _callback(desc: str, key: str):
    from transformers import TrainerCallback

    class CourseProgress(TrainerCallback):
        """The course's bar: one tick per optimiser step, the latest loss (or reward) beside it."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = progress_bar(state.max_steps, desc)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and key in logs:
                self.bar.set_postfix_str(f"{key}={logs[key]:.3f}", refresh=False)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return CourseProgress()


@dataclass
class Run:
    """What ``fit`` returns: the per-step logs of a TRL run, its time and its model."""

    logs: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    model: object = None

    def series(self, key: str) -> list[float]:
        """One logged quantity ("loss", "reward", "rewards/margins", ...) at every step that logged it."""
        return [float(entry[key]) for entry in self.logs if key in entry]

    @property
    def losses(self) -> list[float]:
        return self.series("loss")


def fit(trainer, desc: str, *, show: str = "loss") -> Run:
    """Train ``trainer`` under the course's progress bar; return its per-step logs as a ``Run``.

    TRL's own printer and bar are removed (they would fill a notebook with dicts, or leave
    a bar at 0% in the saved file); ``show`` picks the logged number shown beside the bar.
    """
    from transformers import PrinterCallback, ProgressCallback

    for cls in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cls)
    with contextlib.suppress(ImportError):
        from transformers.utils.notebook import NotebookProgressCallback

        trainer.remove_callback(NotebookProgressCallback)
    trainer.add_callback(_callback(desc, show))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logs = [entry for entry in trainer.state.log_history if "step" in entry and "train_runtime" not in entry]
    model = trainer.model
    model.eval()
    return Run(logs=logs, seconds=seconds, model=model)


@contextlib.contextmanager
def quiet_datasets():
    """No ``datasets`` progress bars while TRL tokenises (they would be saved in the notebook at 0%)."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


# ---------------------------------------------------------------------------
# DPO's implicit reward on held-out pairs
# ---------------------------------------------------------------------------


def _chat_ids(tokenizer, messages, *, generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def _split_at_common_prefix(prompt: list[int], full: list[int]) -> tuple[list[int], list[int]]:
    n = 0
    while n < min(len(prompt), len(full)) and prompt[n] == full[n]:
        n += 1
    return full[:n], full[n:]


@torch.no_grad()
def completion_logps(model, tokenizer, prompts, completions, *, batch_size: int = 16) -> torch.Tensor:
    """Summed log-probability of each completion given its prompt (conversational messages), as TRL's
    DPOTrainer computes it: the completion is what the chat template adds after the prompt."""
    device = next(model.parameters()).device
    rows = []
    for prompt, completion in zip(prompts, completions, strict=True):
        prompt_ids = _chat_ids(tokenizer, prompt, generation_prompt=True)
        full = _chat_ids(tokenizer, list(prompt) + list(completion), generation_prompt=False)
        head, tail = _split_at_common_prefix(prompt_ids, full)
        rows.append((head + tail, len(head)))
    out = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            completion_mask = torch.zeros((len(chunk), width), dtype=torch.bool)
            for i, (seq, n_prompt) in enumerate(chunk):
                ids[i, : len(seq)] = torch.tensor(seq)
                mask[i, : len(seq)] = 1
                completion_mask[i, n_prompt : len(seq)] = True
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logps = torch.log_softmax(logits[:, :-1], dim=-1)
            targets = ids[:, 1:].to(device)
            token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            out.append((token_logps * completion_mask[:, 1:].to(device)).sum(-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def preference_logps(model, tokenizer, pairs, *, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed log-probabilities of a preference split under ``model``."""
    chosen = completion_logps(model, tokenizer, pairs["prompt"], pairs["chosen"], batch_size=batch_size)
    rejected = completion_logps(model, tokenizer, pairs["prompt"], pairs["rejected"], batch_size=batch_size)
    return chosen, rejected


def reward_margins(policy: tuple, reference: tuple, beta: float) -> torch.Tensor:
    """DPO's implicit reward margin per pair, ``beta * [(pc - rc) - (pr - rr)]``.

    ``policy`` and ``reference`` are ``(chosen, rejected)`` log-probabilities from
    ``preference_logps``. Positive: the policy has moved towards the chosen answer, relative
    to the reference. Zero for every pair when the policy is the reference.
    """
    (pc, pr), (rc, rr) = policy, reference
    return beta * ((pc - rc) - (pr - rr))


@torch.no_grad()
def sampled_reward(model, tokenizer, dataset, reward_funcs, *, samples: int = 4, max_new_tokens: int = 8,
                   temperature: float = 1.0, seed: int = 0) -> dict[str, float]:
    """Mean rewards of ``samples`` completions sampled per prompt of ``dataset``, as GRPO samples them.

    ``dataset`` has conversational ``prompt`` and ``answer`` columns (``grpo_dataset``);
    ``reward_funcs`` is a TRL reward function or a list of them. Returns the mean of each, by
    function name, and their sum as ``"reward"`` (what TRL logs under that name). Seeded,
    without touching the global random state: the same call on the same model gives the same numbers.
    """
    from course.generate import chat_prompt

    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    device = next(model.parameters()).device
    texts = [chat_prompt(tokenizer, p[-1]["content"]) for p in dataset["prompt"]]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    finally:
        tokenizer.padding_side = side
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = model.generate(**batch, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, num_return_sequences=samples,
                                 pad_token_id=tokenizer.pad_token_id)
    finally:
        model.train(was_training)
    replies = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    completions = [[{"role": "assistant", "content": r}] for r in replies]
    answers = [a for a in dataset["answer"] for _ in range(samples)]
    means = {f.__name__: sum(f(completions, answer=answers)) / len(completions) for f in funcs}
    return {**means, "reward": sum(means.values())}


# ---------------------------------------------------------------------------
# Save, merge, reload, validate
# ---------------------------------------------------------------------------


@torch.no_grad()
def _compare_models(a, b, inputs) -> dict:
    """How far apart two models are on ``inputs`` (a tokenised batch): the largest difference of
    their logits and the share of positions where they predict the same next token
    (``course.merging.compare_models``, notebook 06, in the words of this chapter's report).
    """
    from course.merging import compare_models

    comparison = compare_models(a, b, inputs)
    return {"max_abs_logit_diff": comparison.max_logit_diff, "same_next_token": comparison.top1_agreement}


def probe_inputs(tokenizer, questions, device=None) -> dict:
    """A right-padded batch of chat prompts, to compare models' logits on (``save_merge_reload``)."""
    from course.generate import chat_prompt

    device = device or default_device()
    return tokenizer([chat_prompt(tokenizer, q) for q in questions], return_tensors="pt", padding=True,
                     add_special_tokens=False).to(device)


def save_merge_reload(peft_model, tokenizer, directory, probe: dict, *, base_path=None):
    """Save the adapter, merge it into a fresh copy of its base, save that merged model, reload it.

    ``directory/adapter`` gets the PEFT adapter (safetensors), ``directory/merged`` the merged
    model and tokenizer (``save_pretrained``, safetensors). ``base_path`` is where the base the
    adapter was trained on lives (a ``save_pretrained`` folder), default the course's base model.
    Returns ``(reloaded, report)``: the merged model as loaded from disk, and ``_compare_models``
    of it against ``peft_model`` (the trained model, adapter unmerged) on ``probe``: the largest
    logit difference and the share of positions with the same next token.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from course.models import load_base_model

    directory = Path(directory)
    device = next(peft_model.parameters()).device
    dtype = default_dtype(device)
    peft_model.save_pretrained(directory / "adapter")  # adapter_model.safetensors + adapter_config.json
    with _quiet_loading():
        base = load_base_model(base_path, dtype=dtype, device=device, progress=False)
        merged = PeftModel.from_pretrained(base, directory / "adapter").merge_and_unload()
        merged.save_pretrained(directory / "merged")
        tokenizer.save_pretrained(directory / "merged")
        del base, merged
        reloaded = AutoModelForCausalLM.from_pretrained(directory / "merged", dtype=dtype).to(device).eval()
    peft_model.eval()
    return reloaded, _compare_models(reloaded, peft_model, probe)


@contextlib.contextmanager
def _quiet_loading():
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------


def tensor_bytes(model) -> int:
    """Bytes held by a model's parameters and buffers (each shared tensor once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def resident_bytes(device=None) -> int:
    """Memory in use now: allocated CUDA memory on a GPU, else the process's resident set size."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    import psutil  # a dependency of accelerate, which TRL needs

    return psutil.Process().memory_info().rss


def memory_growth(make):
    """``(make(), bytes)``: what ``make()`` returns and how much the memory in use grew while it ran.

    On a GPU the allocator's count (exact); on the CPU the resident set size, which counts a
    model's weights once they have been read (run a forward pass inside ``make``).
    """
    gc.collect()
    before = resident_bytes()
    result = make()
    gc.collect()
    return result, resident_bytes() - before
