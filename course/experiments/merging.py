"""Chapter 06's merges of the two shipped adapters, as registered experiments (notebook 06).

Each arm merges weight changes into a fresh copy of the base model, the way notebook 06's
sections 4 and 5 do ("TIES on ΔW (yours), merged into the weights"): for every layer, the
ΔW of each shipped adapter that adapts it (``addition`` on q, k, v, o; ``pirate`` on q, v), merged
with ``course.merging`` (weights [1, 1]; TIES per tensor, as PEFT), added to the layer's weight.
It is then scored on one task, so each comparison has one experiment per metric:

- addition: held-out exact match (greedy, 10 new tokens, as the notebook's ``task_replies``) on 64
  additions the addition adapter never trained on;
- pirate: the fraction of greedy 24-token replies to 32 held-out everyday questions that are pirate
  speech by the written-down lexicon of ``course.pirate_speech``.

The seed picks which held-out questions are scored (disjoint blocks, one per seed: the metric's
own sampling noise, so that a merge with no randomness still gets an honest interval) and, for
DARE, the random drop masks (``torch.manual_seed(seed)`` before the draws). Arms of one seed score
the same questions: the comparison is paired.

- ``06-ties-vs-task-arithmetic-{addition,pirate}``: TIES at density 0.5 (the chapter's ``DENSITY``)
  against the plain weighted sum (section 5, "Your TIES against PEFT's").
- ``06-dare-density-{addition,pirate}``: the DARE merge (drop and rescale each ΔW, then the weighted
  sum: PEFT's ``dare_linear`` on ΔW) at density 0.05 against the chapter's 0.5 (section 5).
- ``06-dare-addition-alone``: the addition adapter alone, DARE at density 0.05 and 0.5 against the
  adapter merged whole (section 4: one draw of the mask decides nothing; five draws do).
"""

from __future__ import annotations

import copy
import functools
import os
import random

from course.experiments.registry import QUICK, Arm, Budget, Experiment, register

ADDITION_METRIC = "held-out exact match"
PIRATE_METRIC = "pirate replies (lexicon)"
PAIR = ("addition", "pirate")
DENSITY = 0.5  # notebook 06's DENSITY for ties and dare_*
ADDITION_TOKENS = 10  # notebook 06's task_replies: room for "Arr, matey!" before the number

# Nothing trains: the budget is the held-out questions scored.
ADDITIONS = Budget(steps=0, batch_size=0, eval_examples=64)
QUESTIONS = Budget(steps=0, batch_size=0, eval_examples=32)


@functools.cache
def _deltas(model_name, adapters):
    """{module name: {adapter: ΔW (float32)}} of the shipped adapters on the base model, once per process."""
    import torch
    from peft import PeftModel

    from course.adapters import adapter_path
    from course.experiments.addition import context

    _, base, _ = context()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), adapter_path(PAIR[0]), adapter_name=PAIR[0])
    peft_model.load_adapter(adapter_path(PAIR[1]), adapter_name=PAIR[1])
    deltas = {}
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            present = [a for a in PAIR if a in getattr(module, "lora_A", {})]
            if present:
                deltas[name.removeprefix("base_model.model.")] = {
                    a: module.get_delta_weight(a).detach().float().clone() for a in present}
    del peft_model
    return deltas


def deltas() -> dict:
    return _deltas(os.environ.get("COURSE_MODEL"), os.environ.get("COURSE_ADAPTERS"))


def merged_model(method: str, density: float, adapters=PAIR):
    """A fresh copy of the base model with ``adapters``' ΔW merged by ``method`` into its weights.

    ``method``: ``"sum"`` (task arithmetic), ``"ties"`` or ``"dare"`` (drop and rescale, then the sum);
    DARE draws from torch's global generator (seed it first).
    """
    import torch

    from course.experiments.addition import context
    from course.merging import dare_merge, task_arithmetic, ties_merge

    _, base, _ = context()
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name, by_adapter in sorted(deltas().items()):
            present = [by_adapter[a] for a in adapters if a in by_adapter]
            if not present:
                continue
            weights = [1.0] * len(present)
            if method == "sum":
                delta = task_arithmetic(present, weights)
            elif method == "ties":
                delta = ties_merge(present, weights, density)
            elif method == "dare":
                delta = dare_merge(present, weights, density)
            else:
                raise ValueError(f"unknown merge method {method!r}: use 'sum', 'ties' or 'dare'")
            weight = model.get_submodule(name).weight
            weight += delta.to(weight.dtype)
    return model


@functools.cache
def _addition_pool(seed: int) -> tuple[tuple[int, int], ...]:
    """Two-digit pairs the addition adapter never trained on, in a fixed shuffled order."""
    from course.adapters.recipes import RECIPES
    from course.data import _all_pairs, addition_pairs

    recipe = RECIPES["addition"]
    trained = set(addition_pairs(recipe.n_train, recipe.n_eval, recipe.seed)[0])
    pool = [pair for pair in _all_pairs() if pair not in trained]
    random.Random(seed).shuffle(pool)
    return tuple(pool)


def addition_sample(seed: int, n: int) -> tuple[list[str], list[str]]:
    """(prompts, answers): block ``seed`` of ``n`` held-out additions (disjoint across seeds)."""
    from course.data import QUESTION

    pool = _addition_pool(2026)
    start = (seed % (len(pool) // n)) * n
    pairs = pool[start : start + n]
    return [QUESTION.format(a=a, b=b) for a, b in pairs], [str(a + b) for a, b in pairs]


def score(model, task: str, seed: int, n: int) -> float:
    """``model``'s score on block ``seed`` of ``n`` held-out questions of ``task`` (addition or pirate)."""
    from course.experiments.addition import context

    tokenizer, _, _ = context()
    if task == "addition":
        from course.data import exact_match
        from course.generate import generate

        prompts, answers = addition_sample(seed, n)
        return exact_match(generate(model, tokenizer, prompts, max_new_tokens=ADDITION_TOKENS, batch_size=32),
                           answers)
    from course.pirate_speech import pirate_score, question_sample

    return pirate_score(model, tokenizer, question_sample(seed, n)).fraction


def merge_arm(name: str, *, task: str, method: str, density: float = DENSITY, adapters=PAIR) -> Arm:
    """An arm that merges ``adapters`` by ``method`` at ``density`` and scores ``task`` (see the module)."""
    budget = ADDITIONS if task == "addition" else QUESTIONS

    def run(seed: int, quick: bool) -> float:
        import torch

        torch.manual_seed(seed)  # DARE's drop masks
        model = merged_model(method, density, adapters)
        return score(model, task, seed, (QUICK if quick else budget).eval_examples)

    settings = {"method": {"sum": "task arithmetic", "ties": "TIES", "dare": "DARE (drop, rescale, sum)"}[method],
                "adapters": list(adapters), "weights": [1.0] * len(adapters)}
    if method != "sum":
        settings["density"] = density
    return Arm(name, run, settings)


def _pair_experiments(task: str, metric: str, budget: Budget) -> list[Experiment]:
    return [
        Experiment(
            f"06-ties-vs-task-arithmetic-{task}", "06_merging", metric,
            arms=(merge_arm("task arithmetic", task=task, method="sum"),
                  merge_arm("TIES d=0.5", task=task, method="ties")),
            verdict=("TIES d=0.5", "task arithmetic"), budget=budget,
            description=f"TIES (density 0.5, per tensor) against the plain sum of the addition and pirate "
                        f"adapters' ΔW, scored on the {task} task."),
        Experiment(
            f"06-dare-density-{task}", "06_merging", metric,
            arms=(merge_arm("DARE d=0.5", task=task, method="dare"),
                  merge_arm("DARE d=0.05", task=task, method="dare", density=0.05)),
            verdict=("DARE d=0.05", "DARE d=0.5"), budget=budget,
            description=f"DARE's merge of the two adapters at density 0.05 against the chapter's 0.5 (the "
                        f"drop masks drawn from the seed), scored on the {task} task."),
    ]


EXPERIMENTS = [
    *_pair_experiments("addition", ADDITION_METRIC, ADDITIONS),
    *_pair_experiments("pirate", PIRATE_METRIC, QUESTIONS),
    Experiment(
        "06-dare-addition-alone", "06_merging", ADDITION_METRIC,
        arms=(merge_arm("adapter merged", task="addition", method="sum", adapters=("addition",)),
              merge_arm("DARE d=0.5", task="addition", method="dare", adapters=("addition",)),
              merge_arm("DARE d=0.05", task="addition", method="dare", density=0.05, adapters=("addition",))),
        verdict=("DARE d=0.05", "adapter merged"), budget=ADDITIONS,
        description="The addition adapter alone merged into the base, DARE-pruned at density 0.05 (and 0.5) "
                    "against the whole adapter: does dropping 95% of ΔW's entries cost the skill?"),
]

for _experiment in EXPERIMENTS:
    register(_experiment, replace=True)
