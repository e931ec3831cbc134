"""Checks for notebook 06, merging adapters: ``check.task_arithmetic``, ``check.ties_merge``, ``check.dare_prune``.

Each check calls the learner's function on seeded tensors and compares the result with the
course's reference (``course.merging``, itself compared with PEFT's ``merge_utils`` in
``tests/test_merging.py``). When the answer is wrong, the result is compared with what each
typical mistake computes, so the message can say which one it is.

``dare_prune`` is random, so it is judged by what must hold for *every* draw (each entry is
either dropped or exactly ``delta / density``) and statistically for the rest (the share
kept, each entry's keep rate, the mean over many draws), with tolerances of at least five
standard deviations. The draws are seeded, so a given answer gets the same verdict every
time, and the check machinery gives the learner's random state back untouched.
"""

from __future__ import annotations

import math

import torch

from course import merging
from course.check.core import Failure, check, close, expect

# float32 sums of a few products of numbers of order 1: rounding is ~1e-7, a mistake is order 1.
RTOL, ATOL = 1e-5, 1e-6


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return close(a, b, rtol=RTOL, atol=ATOL)


def _seeded(shape, n: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) for _ in range(n)]


def _call_merge(answer, deltas, weights, *extra) -> torch.Tensor:
    """Call ``answer(deltas, weights, *extra)`` on copies; complain if it changed them or gave no tensor."""
    given = [d.clone() for d in deltas]
    out = answer(given, list(weights), *extra)
    expect(all(torch.equal(g, d) for g, d in zip(given, deltas, strict=True)),
           "Your function changed the deltas it was given (an in-place operation such as `mul_`, `+=` "
           "or `delta[mask] = 0`). Build new tensors instead: a merge must leave the adapters intact.")
    expect(isinstance(out, torch.Tensor), f"Your function returned a {type(out).__name__}; return one tensor, "
           "the merged delta.")
    expect(tuple(out.shape) == tuple(deltas[0].shape), f"The merged delta should have the deltas' shape "
           f"{tuple(deltas[0].shape)}, yours is {tuple(out.shape)}. Merge entry by entry (stack the deltas "
           "on a new dimension 0 and reduce over it).")
    return out.detach().float()


# ---------------------------------------------------------------------------
# task_arithmetic
# ---------------------------------------------------------------------------

TA_CASES = [  # (shape, number of deltas, weights): weights that neither sum to one nor are equal
    ((4, 6), 3, [0.5, -1.0, 2.0]),
    ((5,), 2, [1.0, 1.0]),
    ((2, 3, 4), 2, [0.2, 0.7]),
    ((3, 3), 1, [0.3]),
]


@check(
    "task_arithmetic",
    hint=[
        "Task arithmetic adds the weight changes, each multiplied by its weight. No division.",
        "`torch.stack(deltas)` puts the deltas on a new dimension 0; multiply by the weights "
        "(shaped to broadcast) and sum over dimension 0. Or loop: `sum(w * d for w, d in zip(weights, deltas))`.",
        "`return sum(w * d for w, d in zip(weights, deltas))`",
    ],
    solution=None,  # the solution notebook's answer, from the exercise manifest
    reference="course.merging:task_arithmetic",
)
def task_arithmetic(answer):
    """``answer(deltas, weights) -> Tensor``: ``sum_i weights[i] * deltas[i]``."""
    expect(callable(answer), f"Expected a function f(deltas, weights), got {type(answer).__name__}.")
    for seed, (shape, n, weights) in enumerate(TA_CASES):
        deltas = _seeded(shape, n, seed)
        got = _call_merge(answer, deltas, weights)
        want = merging.task_arithmetic(deltas, weights)
        if _close(got, want):
            continue
        stacked, w = torch.stack(deltas), torch.tensor(weights)
        w = w.view(-1, *([1] * len(shape)))
        mistakes = [
            ((stacked * w).mean(0), "Your result is the weighted *mean* (divided by the number of deltas). "
             "Task arithmetic is the weighted sum: the weights already say how much of each change to add, "
             "so weights [1, 1] add both adapters at full strength."),
            (stacked.sum(0), "Your result is the plain sum of the deltas: the weights are ignored. Multiply "
             "each delta by its weight before adding."),
            (stacked.mean(0), "Your result is the unweighted mean of the deltas: the weights are ignored, and "
             "task arithmetic does not divide by the number of deltas. Return sum_i weights[i] * deltas[i]."),
            ((stacked * w).sum(0) / w.sum(), "You divided by the sum of the weights. Task arithmetic uses the "
             "weights as given (they need not sum to one; a negative weight subtracts a change)."),
        ]
        for output, message in mistakes:
            expect(not _close(got, output), message)
        raise Failure(f"For {n} deltas of shape {shape} and weights {weights} your result is not "
                      "sum_i weights[i] * deltas[i].")


# ---------------------------------------------------------------------------
# ties_merge
# ---------------------------------------------------------------------------

TIES_CASES = [  # (shape, number of deltas, weights, density): density * numel is a whole number
    ((6, 8), 3, [1.0, 0.5, 2.0], 0.5),
    ((6, 8), 3, [1.0, 0.5, 2.0], 0.25),
    ((10,), 2, [0.7, 1.3], 1.0),
    ((2, 3, 4), 4, [1.0, 1.0, 0.5, 1.5], 0.5),
]


def _trim(delta: torch.Tensor, k: int, *, largest: bool = True, by_value: bool = False) -> torch.Tensor:
    scores = delta if by_value else delta.abs()
    keep = torch.zeros(delta.numel())
    keep[torch.topk(scores.reshape(-1), k, largest=largest).indices] = 1
    return delta * keep.reshape(delta.shape)


def _disjoint(trimmed: torch.Tensor, w: torch.Tensor, elected: torch.Tensor, *, divide_by=None) -> torch.Tensor:
    agrees = trimmed.sign() == elected
    total = (trimmed * w * agrees).sum(0)
    return total / (agrees.sum(0).clamp(min=1) if divide_by is None else divide_by)


def _ties_mistakes(deltas, weights, density):
    """(what a typical mistake computes, the message for it), for one case."""
    stacked = torch.stack(deltas)
    n, numel = stacked.shape[0], stacked[0].numel()
    w = torch.tensor(weights).view(-1, *([1] * (stacked.dim() - 1)))
    k = int(density * numel)
    trimmed = torch.stack([_trim(d, k) for d in deltas])
    elected = torch.where(trimmed.sum(0) >= 0, 1, -1)
    smallest = torch.stack([_trim(d, k, largest=False) for d in deltas])
    by_value = torch.stack([_trim(d, k, by_value=True) for d in deltas])
    inverse = torch.stack([_trim(d, numel - k) for d in deltas]) if k < numel else trimmed
    jointly = _trim(stacked, k * n)
    nonzero = (trimmed != 0).sum(0).clamp(min=1)

    def ties_of(t):  # elect and merge on some other trimming
        return _disjoint(t, w, torch.where(t.sum(0) >= 0, 1, -1))

    return [
        ((trimmed * w).sum(0), "Your result is the weighted sum of the trimmed deltas: TIES without the sign "
         "election. After trimming, elect each entry's sign (the sign of the sum of the trimmed deltas) and "
         "keep only the entries that agree with it."),
        ((trimmed * w).sum(0) / nonzero, "You average the trimmed entries without electing a sign: entries "
         "of opposite signs still cancel. Elect each entry's sign from the sum of the trimmed deltas and "
         "average only the weighted entries whose sign agrees with it."),
        (ties_of(smallest), "You kept the *smallest* entries of each delta. TIES trims to the largest "
         "magnitudes: `torch.topk(delta.abs().flatten(), k, largest=True)`, with k = int(density * numel)."),
        (ties_of(by_value), "You kept the largest *values*, so large negative entries were thrown away. Trim "
         "by magnitude: rank the entries by `delta.abs()`."),
        (ties_of(inverse), "You kept a fraction 1 - density of each delta. density is the share that "
         "*stays*: k = int(density * numel) entries."),
        (ties_of(jointly), "You trimmed all the deltas together (the top entries of the whole stack). Trim "
         "each delta on its own: keep the top k = int(density * numel) entries of every delta."),
        (_disjoint(trimmed, w, elected, divide_by=n), "You divided by the number of deltas, a mean over *all* "
         "of them. TIES averages only over the deltas whose entry agrees with the elected sign: divide each "
         "entry by how many agree there (at least 1)."),
        (_disjoint(trimmed, w, elected, divide_by=1), "You add the agreeing entries but do not average them. "
         "Divide each entry by the number of deltas that agree with the elected sign there (at least 1)."),
        (_disjoint(trimmed, w, torch.where((trimmed * w).sum(0) >= 0, 1, -1)), "You elected the sign from the "
         "*weighted* trimmed deltas. Elect it from the trimmed deltas before weighting (PEFT's "
         "`majority_sign_method='total'`), then apply the weights to the entries that agree."),
        (_disjoint(trimmed, w, torch.where(trimmed.sign().sum(0) >= 0, 1, -1)), "You elected the sign by "
         "counting votes (how many deltas are positive). TIES elects by total mass: the sign of the *sum* "
         "of the trimmed deltas, so one large entry outweighs two small ones."),
        (_disjoint(trimmed, torch.ones_like(w), elected), "Your result ignores the weights. Multiply each "
         "trimmed delta by its weight before the disjoint mean (but elect the sign before weighting)."),
    ]


@check(
    "ties_merge",
    hint=[
        "Three steps: trim each delta to its top `density` fraction by magnitude; elect a sign per entry "
        "from the sum of the trimmed deltas; average the weighted entries that agree with that sign.",
        "Trim: `k = int(density * d.numel())`, `idx = torch.topk(d.abs().flatten(), k).indices`, keep those "
        "entries. Stack the trimmed deltas as `t` (n, ...). Elect: `sign = torch.where(t.sum(0) >= 0, 1, -1)`. "
        "`agree = t.sign() == sign`.",
        "With `w` the weights shaped (n, 1, ...): `(t * w * agree).sum(0) / agree.sum(0).clamp(min=1)`.",
    ],
    solution=None,
    reference="course.merging:ties_merge",
)
def ties_merge(answer):
    """``answer(deltas, weights, density) -> Tensor``: TIES-Merging, equal to PEFT's ``ties`` ("total")."""
    expect(callable(answer), f"Expected a function f(deltas, weights, density), got {type(answer).__name__}.")
    for seed, (shape, n, weights, density) in enumerate(TIES_CASES):
        deltas = _seeded(shape, n, 10 + seed)
        got = _call_merge(answer, deltas, weights, density)
        want = merging.ties_merge(deltas, weights, density)
        if _close(got, want):
            continue
        for output, message in _ties_mistakes(deltas, weights, density):
            expect(not _close(got, output), message)
        raise Failure(f"For {n} deltas of shape {shape}, weights {weights} and density {density} your result "
                      "is not TIES's. Check each step on a small example: trim (top-k by magnitude per delta), "
                      "elect (sign of the sum of the trimmed deltas), disjoint mean (weighted entries that "
                      "agree, divided by how many agree).")


# ---------------------------------------------------------------------------
# dare_prune
# ---------------------------------------------------------------------------

BIG = (300, 400)  # 120,000 entries: the share kept has a standard deviation of at most 0.0015
DRAWS, SMALL = 400, (8, 8)  # for each entry's keep rate and mean over many draws


def _call_prune(answer, delta: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    given = delta.clone()
    torch.manual_seed(seed)
    out = answer(given, density)
    expect(torch.equal(given, delta), "Your function changed the delta it was given (an in-place operation "
           "such as `mul_` or `delta[mask] = 0`). Return a new tensor: DARE must leave the adapter intact.")
    expect(isinstance(out, torch.Tensor), f"Your function returned a {type(out).__name__}; return the "
           "pruned delta, a tensor.")
    expect(tuple(out.shape) == tuple(delta.shape), f"The pruned delta should have the delta's shape "
           f"{tuple(delta.shape)}, yours is {tuple(out.shape)}.")
    return out.detach().float()


def _judge_one_draw(out: torch.Tensor, delta: torch.Tensor, density: float) -> None:
    kept = out != 0
    n = delta.numel()
    share = kept.float().mean().item()
    expect(share < 1, f"With density={density} nothing was dropped. DARE drops each entry with probability "
           "1 - density: `mask = torch.bernoulli(torch.full_like(delta, density))`.")
    expect(share > 0, f"With density={density} everything was dropped; each entry should survive with "
           "probability density.")
    # The share kept is Binomial(n, density) / n: standard deviation sqrt(p (1 - p) / n) <= 0.0015 for
    # n = 120,000. A tolerance of 0.01 is over six of them: a correct answer never fails it.
    tolerance = 0.01
    if abs(share - (1 - density)) < tolerance:
        raise Failure(f"With density={density} you kept {share:.1%} of the entries, about 1 - density. "
                      "density is the probability that an entry *survives*: keep where "
                      "`torch.rand_like(delta) < density` (or `torch.bernoulli(torch.full_like(delta, density))`).")
    expect(abs(share - density) < tolerance, f"With density={density} you kept {share:.1%} of the entries; "
           f"each should survive with probability {density}, so about {density:.0%} of {n:,} entries.")
    magnitude_kept, magnitude_dropped = delta.abs()[kept].mean(), delta.abs()[~kept].mean()
    # Random subsets of 36,000+ Gaussian entries have mean |delta| within ~1% of each other.
    expect(magnitude_kept < 1.1 * magnitude_dropped, "The entries you keep are much larger than those you "
           "drop: that is magnitude pruning (TIES's trim). DARE drops entries at random, whatever their size.")
    ratio = out[kept] / delta[kept]
    factor = ratio.median().item()
    if not close(ratio, torch.full_like(ratio, factor), rtol=1e-5, atol=1e-8):
        raise Failure("The entries you keep are not all rescaled by the same factor. Each survivor must be "
                      "exactly delta / density, every other entry 0.")
    if math.isclose(factor, 1.0, rel_tol=1e-5):
        raise Failure("The survivors are not rescaled: they equal delta. Divide them by density, so that the "
                      "expected value of the result is delta (a fraction density of entries survive).")
    if not math.isclose(factor, 1 / density, rel_tol=1e-5):
        named = {1 / (1 - density): "1 / (1 - density)", density: "density", 1 - density: "1 - density",
                 1 / density**2: "1 / density**2"}
        which = next((name for value, name in named.items() if math.isclose(factor, value, rel_tol=1e-5)), None)
        said = f" = {which}" if which else ""
        raise Failure(f"With density={density} you multiply the survivors by {factor:.4g}{said}; it should be "
                      f"1 / density = {1 / density:.4g}, so that E[result] = density * delta / density = delta.")


@check(
    "dare_prune",
    hint=[
        "Each entry survives with probability `density` (a random mask, new on every call); the survivors "
        "are divided by `density` so that the result equals `delta` on average.",
        "`mask = torch.rand_like(delta) < density` or `torch.bernoulli(torch.full_like(delta, density))`; "
        "then `delta * mask / density`. Do not seed inside the function.",
        "`return delta * torch.bernoulli(torch.full_like(delta, density)) / density`",
    ],
    solution=None,
    reference="course.merging:dare_prune",
)
def dare_prune(answer):
    """``answer(delta, density) -> Tensor``: drop with probability 1 - density, rescale survivors by 1 / density."""
    expect(callable(answer), f"Expected a function f(delta, density), got {type(answer).__name__}.")
    generator = torch.Generator().manual_seed(20)
    delta = torch.randn(*BIG, generator=generator)
    for density, seed in ((0.3, 0), (0.8, 1)):
        _judge_one_draw(_call_prune(answer, delta, density, seed), delta, density)

    first = _call_prune(answer, delta, 0.3, 2) != 0
    torch.manual_seed(3)
    again = answer(delta.clone(), 0.3).detach() != 0  # no reseeding: the generator has moved on
    if torch.equal(first, again):
        flat = first.flatten()
        prefix = bool(flat[: int(flat.sum())].all())
        raise Failure("Two calls kept exactly the same entries: " + (
            "the first ones, in order. DARE keeps a *random* subset, a new one on every call: draw a random "
            "number for every entry (`torch.rand_like(delta) < density`)." if prefix else
            "the mask must be random and new on every call: draw it from torch's generator and do not seed "
            "inside the function."))

    # Many draws on a small delta: each entry's keep rate and its mean value. With N = 400 draws at
    # density p = 0.3 the keep rate has standard deviation sqrt(p (1 - p) / N) = 0.023, and the mean of
    # the result sqrt((1 - p) / (p N)) |delta| = 0.076 |delta|. Tolerances 0.12 and 0.4 |delta| are over
    # five of them for each of the 64 entries (and the draws are seeded: the verdict never changes).
    density, small = 0.3, torch.randn(*SMALL, generator=generator).sign() * (1 + torch.rand(*SMALL, generator=generator))
    torch.manual_seed(4)
    draws = torch.stack([answer(small.clone(), density).detach().float() for _ in range(DRAWS)])
    rate = (draws != 0).float().mean(0)
    expect(bool(((rate - density).abs() < 0.12).all()), f"Over {DRAWS} calls some entries were kept far more "
           f"often than others (keep rates from {rate.min():.0%} to {rate.max():.0%}, all should be near "
           f"{density:.0%}): draw an independent random number for every entry.")
    mean = draws.mean(0)
    expect(bool(((mean - small).abs() < 0.4 * small.abs()).all()), f"Averaged over {DRAWS} calls your result "
           "is not delta: DARE keeps the expected value, E[result] = delta.")
    expect(torch.equal(_call_prune(answer, delta, 1.0, 5), delta), "With density=1 every entry should stay, "
           "unchanged (nothing dropped, divided by 1).")


from course.check.svd import svd_truncate  # noqa: E402, F401 (re-exported)
