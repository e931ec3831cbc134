"""Does SmolLM2's default system prompt pay for its tokens? Issue 23's first lever (run by hand).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/system_prompt.py [--seeds 5] [--questions 256]

SmolLM2's chat template adds "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
whenever a conversation has no system message: 16 of the 40 prompt tokens of an addition question.
For each seed, two arms share everything (LoRA r=8, alpha 16 on q, k, v, o; the CPU budget of
``course.train.default_budget``: 30 steps of batch 16, lr 2e-3; the same batches in the same order):

- ``default``: the template as it is (what the course does today);
- ``empty system``: an empty system message, ``<|im_start|>system\\n<|im_end|>``, in training and in
  evaluation alike;

and measures the training time, the time to answer ``--questions`` held-out questions greedily, and
their exact match. Paired 95 % t intervals (``course.evidence.compare``) over the seeds, so the
verdict on accuracy says whether the runs can tell the arms apart. The arms alternate within each
seed, so a machine that slows down mid-run slows both. The processor is printed with the figures.

Result, 2026-12-04 (AMD EPYC with AVX512-BF16, 2 threads, machine otherwise idle; ``--seeds 5
--questions 256``; 46 prompt tokens with the default template, 30 with the empty system message):

    seed  default: train / eval s / exact match    empty system: train / eval s / exact match
       0           85.5 / 18.7 / 0.730                       56.5 / 12.2 / 0.742
       1           81.9 / 16.8 / 0.703                       55.5 / 12.9 / 0.684
       2           81.5 / 18.7 / 0.730                       55.3 / 12.7 / 0.785
       3           84.1 / 17.4 / 0.781                       55.0 / 11.8 / 0.695
       4           83.3 / 17.8 / 0.648                       55.6 / 12.3 / 0.746

    accuracy: empty system - default = +0.012 [-0.076, +0.099] over 5 paired seeds: cannot tell apart
    train_s:  empty system - default = -27.7 [-29.4, -25.9] over 5 paired seeds: empty system faster
    eval_s:   empty system - default = -5.5 [-6.7, -4.3] over 5 paired seeds: empty system faster
    default / empty system: training 1.47 to 1.53 times the time, evaluation 1.30 to 1.53

So the default system prompt costs half as much time again in training and about 45 % in evaluation,
and these runs cannot tell its effect on accuracy from none (the interval allows up to 0.08 either
way). (That first run printed the two time verdicts with the better arm the wrong way round, as if
more seconds were better; ``higher_is_better`` is now set per metric. The intervals are unchanged.)
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from course.data import addition_splits
from course.device import cpu_model
from course.evidence import compare
from course.generate import accuracy
from course.lora import inject_lora, mark_only_lora_as_trainable
from course.models import load_base_model, load_tokenizer
from course.train import default_budget, train

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
ARMS = ("default", "empty system")


def with_empty_system(tokenizer):
    """A copy of ``tokenizer`` whose chat template gets an empty system message when there is none."""
    plain = copy.copy(tokenizer)
    original = tokenizer.apply_chat_template

    def apply_chat_template(messages, *args, **kwargs):
        if not messages or messages[0].get("role") != "system":
            messages = [{"role": "system", "content": ""}, *messages]
        return original(messages, *args, **kwargs)

    plain.apply_chat_template = apply_chat_template
    return plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--questions", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    tokenizer, base = load_tokenizer(default_system_prompt=True), load_base_model(progress=False)
    splits = addition_splits(n_eval=args.questions)
    budget = default_budget("cpu")
    tokenizers = {"default": tokenizer, "empty system": with_empty_system(tokenizer)}
    prompt = [{"role": "user", "content": splits["eval"][0]["prompt"]}]
    for arm, tok in tokenizers.items():
        n = len(tok(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False),
                    add_special_tokens=False)["input_ids"])
        print(f"{arm}: {n} prompt tokens for {prompt[0]['content']!r}")
    results = {arm: {"train_s": [], "eval_s": [], "accuracy": []} for arm in ARMS}
    for seed in range(args.seeds):
        for arm in ARMS if seed % 2 == 0 else ARMS[::-1]:
            model = copy.deepcopy(base)
            torch.manual_seed(seed)
            mark_only_lora_as_trainable(inject_lora(model, TARGETS, 8, 16))
            start = time.perf_counter()
            train(model, tokenizers[arm], splits["train"], steps=budget.steps, batch_size=budget.batch_size,
                  lr=budget.lr, seed=seed, progress=False)
            results[arm]["train_s"].append(time.perf_counter() - start)
            start = time.perf_counter()
            results[arm]["accuracy"].append(accuracy(model, tokenizers[arm], splits["eval"]))
            results[arm]["eval_s"].append(time.perf_counter() - start)
            print(f"seed {seed} {arm:>12}: train {results[arm]['train_s'][-1]:.1f} s, eval "
                  f"{results[arm]['eval_s'][-1]:.1f} s, exact match {results[arm]['accuracy'][-1]:.3f}", flush=True)
    print(f"\nProcessor: {cpu_model()}, {torch.get_num_threads()} threads; {args.seeds} seeds, "
          f"{args.questions} held-out questions, {budget.steps} steps of batch {budget.batch_size}")
    for metric in ("accuracy", "train_s", "eval_s"):
        c = compare(results["empty system"][metric], results["default"][metric], names=("empty system", "default"),
                    paired=True, higher_is_better=metric == "accuracy")  # seconds: lower is better
        print(f"{metric:>8}: {c.verdict}")
    for metric in ("train_s", "eval_s"):
        ratios = [d / e for d, e in zip(results["default"][metric], results["empty system"][metric], strict=True)]
        print(f"{metric:>8}: default / empty system = " + ", ".join(f"{r:.2f}" for r in ratios))


if __name__ == "__main__":
    main()
