"""Is bfloat16 worth it on the CPU? The measurement behind ``course.device.default_dtype`` (run by hand).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cpu_dtype.py [--steps 6] [--questions 32]

For float32 and bfloat16 in turn, on the real base model held in that dtype with LoRA r=8 on
every linear layer (adapters in float32, as always), it times:

- a training step (batch 16 of the addition task, forward + backward + AdamW, through
  ``course.train.train``): the time of ``--steps`` steps divided by their number, after a
  one-step warm-up run;
- greedy generation of answers (up to 6 new tokens) to ``--questions`` held-out questions in
  one batch, as ``course.generate.accuracy`` scores them, after a warm-up on two;

and prints one table with the ratio float32 / bfloat16 (above 1: bfloat16 is faster), headed by
the processor it ran on. The CPU's bfloat16 support decides the answer: with AVX512-BF16 or AMX the
matrix products are fast, the many small element-wise kernels of generation are not; without it
(AVX2 only) bfloat16 is emulated and everything is far slower. A figure from this benchmark holds
for the processor it names, not for another.
"""

from __future__ import annotations

import argparse
import time

import torch

from course.data import addition_splits
from course.device import cpu_bfloat16, cpu_model
from course.generate import generate
from course.lora import inject_lora, mark_only_lora_as_trainable
from course.models import load_base_model, load_tokenizer
from course.train import train

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def measure(dtype: torch.dtype, steps: int, n_questions: int) -> dict[str, float]:
    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    model = load_base_model(dtype=dtype, device="cpu", progress=False)
    inject_lora(model, TARGETS, r=8, alpha=16)
    mark_only_lora_as_trainable(model)
    splits = addition_splits()
    train(model, tokenizer, splits["train"], steps=1, progress=False)  # warm-up
    step = train(model, tokenizer, splits["train"], steps=steps, progress=False).seconds / steps
    model.eval()
    questions = splits["eval"]["prompt"]
    generate(model, tokenizer, questions[:2], max_new_tokens=6)  # warm-up
    start = time.perf_counter()
    generate(model, tokenizer, questions[:n_questions], max_new_tokens=6, batch_size=n_questions)
    answers = time.perf_counter() - start
    return {"step": step, "generate": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--questions", type=int, default=32)
    args = parser.parse_args()
    print(f"processor: {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {cpu_bfloat16()}")
    results = {name: measure(dtype, args.steps, args.questions)
               for name, dtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16)]}
    print(f"{'':28s}{'float32':>10s}{'bfloat16':>10s}{'f32/bf16':>10s}")
    for key, label in [("step", "training step, batch 16 (s)"), ("generate", f"greedy answers to {args.questions} (s)")]:
        f32, bf16 = results["float32"][key], results["bfloat16"][key]
        print(f"{label:28s}{f32:10.2f}{bf16:10.2f}{f32 / bf16:10.2f}")
    print(f"On {cpu_model()}: " + "; ".join(
        f"{key} {'faster' if results['float32'][key] > results['bfloat16'][key] else 'slower'} in bfloat16"
        for key in ("step", "generate")))


if __name__ == "__main__":
    main()
