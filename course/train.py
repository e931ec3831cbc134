"""A short, readable training loop for the from-scratch chapters (notebooks 01, 02).

``train`` fine-tunes whatever parameters of ``model`` require gradients on chat
examples, with the loss on the answer tokens only. It is seeded, shows a progress
bar, evaluates every ``eval_every`` steps and returns a ``History`` to plot.
``default_budget`` scales the work with the device so that each notebook stays
within a few minutes on a 2-core CPU and does more on a GPU.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from course.device import base_dtype

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Budget:
    """How much work a notebook does: steps, batch size, learning rate, evaluation size."""

    steps: int
    batch_size: int
    lr: float
    eval_every: int
    eval_examples: int


def default_budget(device: torch.device | str | None = None) -> Budget:
    """CPU: about two minutes of training on 2 cores. GPU: longer runs, bigger batches.

    ``COURSE_QUICK=1`` shrinks everything to a smoke test (used by the test suite
    for the student notebooks).
    """
    from course.device import default_device

    device = torch.device(device) if device is not None else default_device()
    if os.environ.get("COURSE_QUICK") == "1":
        return Budget(steps=3, batch_size=4, lr=2e-3, eval_every=3, eval_examples=8)
    if device.type == "cpu":
        return Budget(steps=30, batch_size=16, lr=2e-3, eval_every=10, eval_examples=64)
    return Budget(steps=120, batch_size=32, lr=1e-3, eval_every=20, eval_examples=256)


def encode_example(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat-formatted example and labels that mask everything but the answer."""
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
        prompt_ids = prompt_ids["input_ids"]
    answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return list(prompt_ids) + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids


def collate(tokenizer, rows: list[tuple[list[int], list[int]]], device) -> dict:
    """Right-pad a list of (ids, labels) into a batch."""
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


@dataclass
class History:
    """What a run leaves behind: the loss at every step, the evaluations, the time."""

    losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_scores: list[float] = field(default_factory=list)
    seconds: float = 0.0
    loss_scales: list[float] = field(default_factory=list)  # float16 only: GradScaler's scale per step

    @property
    def final_score(self) -> float | None:
        return self.eval_scores[-1] if self.eval_scores else None


def train(
    model,
    tokenizer,
    dataset,
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 2e-3,
    eval_fn=None,
    eval_every: int | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "training",
) -> History:
    """Train the parameters of ``model`` that require gradients; return a ``History``.

    ``dataset`` has ``prompt`` and ``answer`` columns. ``eval_fn(model) -> float`` is
    called before training, every ``eval_every`` steps and at the end.
    """
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "The model has no trainable parameters. Add adapters first (course.lora.inject_lora "
            "or peft.get_peft_model), or unfreeze something."
        )
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
    if len(dataset["prompt"]) == 0:
        raise ValueError("The dataset is empty: train needs at least one example (a prompt and an answer). "
                         "Check how the data was loaded or filtered.")
    for name, p in model.named_parameters():  # adapters learn in float32 even over a half-precision base
        if p.requires_grad and "lora_" in name and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()  # (a fully trained base layer keeps its dtype: its input is half)
    device = next(model.parameters()).device
    half = base_dtype(model)  # the frozen base's dtype, as loaded
    use_autocast = device.type == "cuda" and half in (torch.float16, torch.bfloat16)
    # float16 has 5 exponent bits: small gradients flush to zero unless the loss is scaled up
    # first (and the gradients scaled back before the step). bfloat16 has float32's range.
    scaler = torch.amp.GradScaler(device.type, enabled=half == torch.float16)

    encoded = [encode_example(tokenizer, p, a) for p, a in zip(dataset["prompt"], dataset["answer"], strict=True)]
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    history = History()

    def evaluate(step: int) -> None:
        if eval_fn is not None:
            history.eval_steps.append(step)
            history.eval_scores.append(float(eval_fn(model)))

    start = time.perf_counter()
    evaluate(0)
    model.train()
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not progress)
    for step in bar:
        while len(order) < batch_size:
            order += torch.randperm(len(encoded), generator=generator).tolist()
        batch = collate(tokenizer, [encoded[i] for i in order[:batch_size]], device)
        del order[:batch_size]
        with torch.autocast(device.type, dtype=half, enabled=use_autocast):
            loss = model(**batch).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # skips the step if a gradient overflowed, then lowers the scale
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        history.losses.append(loss.item())
        if scaler.is_enabled():
            history.loss_scales.append(scaler.get_scale())
        bar.set_postfix(loss=f"{history.losses[-1]:.3f}")
        if eval_every and step % eval_every == 0 and step != steps:
            evaluate(step)
            model.train()
    evaluate(steps)
    model.eval()
    history.seconds = time.perf_counter() - start
    return history


def plot_histories(histories: dict, *, title: str | None = None):
    """Loss (left) and held-out accuracy (right) of one or more runs, by step."""
    import matplotlib.pyplot as plt

    if isinstance(histories, History):
        histories = {"run": histories}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, h in histories.items():
        left.plot(range(1, len(h.losses) + 1), h.losses, label=name)
        if h.eval_scores:
            right.plot(h.eval_steps, h.eval_scores, marker="o", label=name)
    left.set(xlabel="step", ylabel="training loss (answer tokens)", title="loss")
    right.set(xlabel="step", ylabel="exact match", title="held-out accuracy", ylim=(-0.05, 1.05))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
