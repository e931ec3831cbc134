"""Measure the README's task numbers: base model versus a short LoRA run (run by hand, not in CI).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/task_accuracy.py [--steps 30] [--seeds 0 1 2]

Held-out exact match on the 64 questions of ``addition_splits()["eval"]`` (greedy), for the
base model and for PEFT LoRA (r=8, alpha=16, all linear layers of the decoder, AdamW lr 2e-3,
batch 16) trained with ``course.train.train`` from each seed; prints seconds per step too.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from peft import LoraConfig, get_peft_model

from course.data import addition_splits
from course.generate import accuracy
from course.models import load_base_model, load_tokenizer
from course.train import train

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()

    tokenizer = load_tokenizer()
    splits = addition_splits()
    base = accuracy(load_base_model(device="cpu"), tokenizer, splits["eval"])
    print(f"base model: exact match {base:.2f} on {len(splits['eval'])} held-out questions")
    scores = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = get_peft_model(load_base_model(device="cpu"), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        history = train(model, tokenizer, splits["train"], steps=args.steps, batch_size=16, lr=2e-3, seed=seed,
                        eval_fn=lambda m: accuracy(m, tokenizer, splits["eval"]), eval_every=10, progress=False)
        scores.append(history.final_score)
        curve = ", ".join(f"{s}:{a:.2f}" for s, a in zip(history.eval_steps, history.eval_scores, strict=True))
        print(f"seed {seed}: LoRA after {args.steps} steps {history.final_score:.2f}  (step:accuracy {curve})  "
              f"{history.seconds:.0f} s with evaluations")
    if len(scores) > 1:
        print(f"mean {statistics.mean(scores):.2f}, min {min(scores):.2f}, max {max(scores):.2f} over seeds {args.seeds}")


if __name__ == "__main__":
    main()
