"""Statistics for experiments with few seeds: a mean's interval and two arms compared (chapters 02-09).

Every comparison the notebooks report (LoRA's rank in 02, DoRA against LoRA in 03, OLoRA's
learning rates in 04, NOLA against LoRA and VeRA in 05, the merges in 06, SFT, DPO and GRPO in
07, the learning-rate rule in 07, the practical choices of 09) is a handful of seeds per arm.
With so few, the spread between seeds is itself uncertain, and the interval has to say so:
a normal (z) interval or a percentile bootstrap covers the true value only about 85-89 % of
the time at 5 seeds where it claims 95 %. Student's t interval covers 95 % (tests/test_evidence.py
shows it by simulation), so that is what this module computes.

- ``interval(values)``: the mean of n values and its Student-t interval::

      mean ± t(1 - (1 - confidence) / 2; n - 1) * s / sqrt(n)

  with s the sample standard deviation (Bessel's n - 1).
- ``compare(a, b)``: the difference of the means, ``mean(a) - mean(b)``, with its interval.

  * unpaired (the arms ran on different seeds): Welch's interval, which does not assume equal
    variances::

        se^2 = s_a^2 / n_a + s_b^2 / n_b
        df   = se^4 / ( (s_a^2 / n_a)^2 / (n_a - 1) + (s_b^2 / n_b)^2 / (n_b - 1) )   (Welch-Satterthwaite)
        difference ± t(1 - (1 - confidence) / 2; df) * se

  * paired (both arms ran on the same seeds, same data order and same initial state, which is
    what a fair comparison here usually is): the t interval of the per-seed differences
    ``a_i - b_i``, with n - 1 degrees of freedom. Pairing removes what the seeds share, so
    its interval is usually narrower.

  The result says whether the interval excludes 0 (``decided``), which arm is better when it
  does (``better``), and a ``verdict`` in words, e.g. "DoRA − LoRA = +0.03 [−0.05, +0.11] over
  5 seeds: these runs cannot tell them apart".

The t quantile is computed here (``t_critical``) from the regularised incomplete beta function,
``P(|T| > t) = I_{df / (df + t^2)}(df / 2, 1 / 2)`` (Abramowitz and Stegun 26.7.1 and 26.5.27),
evaluated by its continued fraction (Numerical Recipes, 6.4) and inverted by safeguarded
Newton steps, so that the course needs no SciPy; tests/test_evidence.py holds it against
published t tables and against mpmath's incomplete beta function.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import NormalDist
from typing import NamedTuple

__all__ = ["Interval", "Comparison", "interval", "compare", "t_critical"]


# ---------------------------------------------------------------------------
# Student's t distribution
# ---------------------------------------------------------------------------


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                          -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"the incomplete beta function did not converge (a={a}, b={b}, x={x})")


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def _two_sided_tail(t: float, df: float) -> float:
    """P(|T| > t) for Student's t with ``df`` degrees of freedom (A&S 26.7.1)."""
    return _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def _density(t: float, df: float) -> float:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))


def t_critical(confidence: float, df: float) -> float:
    """The t such that a Student-t variable with ``df`` degrees of freedom lies in [-t, t] with
    probability ``confidence``: the quantile ``1 - (1 - confidence) / 2`` (df need not be an integer)."""
    _check_confidence(confidence)
    if not (df > 0 and math.isfinite(df)):
        raise ValueError(f"degrees of freedom must be a positive number, got {df}")
    alpha = 1.0 - confidence
    # Start from the Cornish-Fisher expansion around the normal quantile (A&S 26.7.5) ...
    z = NormalDist().inv_cdf(1.0 - alpha / 2.0)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    t = z + g1 / df + g2 / df**2 + g3 / df**3
    # ... bracket the root of P(|T| > t) = alpha (the tail falls as t grows) ...
    low, high = 0.0, max(t, 1.0)
    while _two_sided_tail(high, df) > alpha:
        low, high = high, 2.0 * high
    t = min(max(t, low), high)
    # ... and refine by Newton steps (d/dt P(|T| > t) = -2 f(t)), bisecting when a step leaves the bracket.
    for _ in range(200):
        excess = _two_sided_tail(t, df) - alpha
        if excess > 0:
            low = t
        else:
            high = t
        slope = -2.0 * _density(t, df)
        step = excess / slope if slope else 0.0
        candidate = t - step
        if not low < candidate < high:
            candidate = (low + high) / 2.0
        if abs(candidate - t) <= 1e-13 * max(1.0, t):
            return candidate
        t = candidate
    return t


# ---------------------------------------------------------------------------
# Intervals
# ---------------------------------------------------------------------------


class Interval(NamedTuple):
    """A mean and its interval; unpacks as ``mean, low, high``."""

    mean: float
    low: float
    high: float


def _check_confidence(confidence: float) -> None:
    if not (isinstance(confidence, (int, float)) and 0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be a number between 0 and 1 (e.g. 0.95 for a 95 % interval), "
                         f"got {confidence!r}")


def _numbers(values, what: str) -> list[float]:
    """``values`` as a list of finite floats, at least two of them, or a clear error."""
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu()
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):  # tensors and NumPy arrays
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{what} must be a sequence of numbers, one per seed; got {type(values).__name__}")
    out = []
    for v in values:
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise TypeError(f"{what} must hold one number per seed; found {v!r}") from None
    if len(out) < 2:
        raise ValueError(f"{what} has {len(out)} value(s): an interval needs at least 2 (one per seed). "
                         "Run more seeds; 5 or more give an interval worth reading.")
    bad = [(i, v) for i, v in enumerate(out) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{what} holds {bad[0][1]} (value {bad[0][0] + 1} of {len(out)}): a run that "
                         "diverged or was not measured. Find out why, and rerun or leave that seed out of "
                         "every arm.")
    return out


def _mean_and_variance(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = math.fsum(values) / n
    return mean, math.fsum((v - mean) ** 2 for v in values) / (n - 1)


def interval(values, confidence: float = 0.95) -> Interval:
    """The mean of ``values`` (one per seed) and its Student-t interval: ``(mean, low, high)``.

    ``mean ± t(1 - (1 - confidence) / 2; n - 1) * s / sqrt(n)``, s the sample standard deviation.
    """
    _check_confidence(confidence)
    values = _numbers(values, "values")
    n = len(values)
    mean, variance = _mean_and_variance(values)
    half = t_critical(confidence, n - 1) * math.sqrt(variance / n)
    return Interval(mean, mean - half, mean + half)


# ---------------------------------------------------------------------------
# Two arms compared
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """``mean(a) - mean(b)`` with its interval, and what it lets one say (``compare``).

    Two arms of an experiment, one metric value per seed; two *models'* next-token logits are
    compared by ``course.merging.compare_models`` (a ``ModelComparison``).
    """

    names: tuple[str, str]
    difference: float
    low: float
    high: float
    decided: bool  # the interval excludes 0
    better: str | None  # the better arm's name when decided, else None
    verdict: str  # the finding in words
    n: int  # pairs when paired; otherwise the smaller arm's number of seeds
    n_a: int
    n_b: int
    df: float  # degrees of freedom of the t quantile
    paired: bool
    confidence: float
    higher_is_better: bool

    def __str__(self) -> str:
        return self.verdict


def _signed(x: float, decimals: int) -> str:
    text = f"{x:+.{decimals}f}"
    return text.replace("-", "\u2212")  # the minus sign, not a hyphen


def _decimals(difference: float, half: float) -> int:
    """Enough decimals for two significant digits of the interval's half-width (of the difference when
    the interval has no width)."""
    scale = half if half > 0 else abs(difference)
    if scale == 0 or not math.isfinite(scale):
        return 2
    return min(max(1 - math.floor(math.log10(scale)), 0), 8)


def compare(a, b, *, names: tuple[str, str] = ("a", "b"), paired: bool = False, confidence: float = 0.95,
            higher_is_better: bool = True, digits: int | None = None) -> Comparison:
    """Arm ``a`` against arm ``b`` (one metric value per seed each): ``mean(a) - mean(b)`` and its interval.

    ``paired=True`` when both arms ran on the same seeds (``a[i]`` and ``b[i]`` share seed i): the
    t interval of the differences ``a[i] - b[i]``. Otherwise Welch's interval (Welch-Satterthwaite
    degrees of freedom). ``higher_is_better=False`` for losses and errors. ``digits`` fixes the
    decimals of the verdict's numbers (by default two significant digits of the half-width).
    """
    _check_confidence(confidence)
    if len(names) != 2 or not all(isinstance(x, str) for x in names):
        raise TypeError(f"names must be two strings, the arms' names, e.g. names=('DoRA', 'LoRA'); got {names!r}")
    name_a, name_b = names
    xs, ys = _numbers(a, f"{name_a} (a)"), _numbers(b, f"{name_b} (b)")
    if paired:
        if len(xs) != len(ys):
            raise ValueError(f"paired=True needs one value per seed in each arm, the same seeds in the same order; "
                             f"{name_a} has {len(xs)} values and {name_b} {len(ys)}. Pair them seed by seed, or "
                             "compare unpaired (paired=False).")
        n = len(xs)
        difference, variance = _mean_and_variance([x - y for x, y in zip(xs, ys, strict=True)])
        se2, df = variance / n, float(n - 1)
    else:
        n = min(len(xs), len(ys))
        mean_a, var_a = _mean_and_variance(xs)
        mean_b, var_b = _mean_and_variance(ys)
        difference = mean_a - mean_b
        wa, wb = var_a / len(xs), var_b / len(ys)
        se2 = wa + wb
        # Welch-Satterthwaite; with no spread at all in either arm, any df gives the same (zero) width.
        df = se2**2 / (wa**2 / (len(xs) - 1) + wb**2 / (len(ys) - 1)) if se2 > 0 else float(len(xs) + len(ys) - 2)
    half = t_critical(confidence, df) * math.sqrt(se2)
    low, high = difference - half, difference + half
    decided = low > 0 or high < 0
    better = None
    if decided:
        a_higher = difference > 0
        better = name_a if a_higher == higher_is_better else name_b

    decimals = _decimals(difference, half) if digits is None else int(digits)
    seeds = f"{len(xs)} seeds" if len(xs) == len(ys) else f"{len(xs)} and {len(ys)} seeds"
    if paired:
        seeds = f"{len(xs)} paired seeds"
    level = "" if abs(confidence - 0.95) < 1e-12 else f" ({100 * confidence:g} % interval)"
    if decided:
        conclusion = f"{better} is better" + ("" if higher_is_better else " (lower is better)")
    else:
        conclusion = "these runs cannot tell them apart"
    verdict = (f"{name_a} \u2212 {name_b} = {_signed(difference, decimals)} [{_signed(low, decimals)}, "
               f"{_signed(high, decimals)}]{level} over {seeds}: {conclusion}")
    return Comparison(names=(name_a, name_b), difference=difference, low=low, high=high, decided=decided,
                      better=better, verdict=verdict, n=n, n_a=len(xs), n_b=len(ys), df=df, paired=paired,
                      confidence=float(confidence), higher_is_better=higher_is_better)
