"""course.evidence: the t quantile against tables and closed forms, the intervals by hand and by simulation,
and the decision and verdict against the interval they come from.

Pure Python and fast (the simulations run 4,000 seeded experiments each, about a second).
"""

from __future__ import annotations

import math
import random
import re
import statistics

import pytest
import torch

from course.evidence import Comparison, compare, interval, t_critical

# ---------------------------------------------------------------------------
# The t quantile
# ---------------------------------------------------------------------------

# Two-sided critical values from a printed t table (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2,
# upper-tail 0.05 / 0.025 / 0.005 columns), three decimals.
TABLE = [
    (0.90, 1, 6.314), (0.95, 1, 12.706), (0.99, 1, 63.657),
    (0.90, 2, 2.920), (0.95, 2, 4.303), (0.99, 2, 9.925),
    (0.90, 4, 2.132), (0.95, 4, 2.776), (0.99, 4, 4.604),
    (0.95, 9, 2.262), (0.99, 9, 3.250),
    (0.95, 30, 2.042), (0.95, 100, 1.984),
]


@pytest.mark.parametrize(("confidence", "df", "printed"), TABLE)
def test_t_critical_matches_the_printed_table(confidence, df, printed):
    assert abs(t_critical(confidence, df) - printed) <= 0.0006


@pytest.mark.parametrize("confidence", [0.5, 0.8, 0.95, 0.99, 0.999999])
def test_t_critical_matches_the_closed_forms_for_one_and_two_degrees_of_freedom(confidence):
    # df = 1 is the Cauchy distribution: P(|T| <= t) = 2 arctan(t) / pi.
    cauchy = math.tan(math.pi * confidence / 2)
    assert t_critical(confidence, 1) == pytest.approx(cauchy, rel=1e-9)
    # df = 2: P(|T| <= t) = t / sqrt(2 + t^2), so t^2 = 2 c^2 / (1 - c^2).
    two = math.sqrt(2 * confidence**2 / (1 - confidence**2))
    assert t_critical(confidence, 2) == pytest.approx(two, rel=1e-9)


def test_t_critical_tends_to_the_normal_quantile():
    z = statistics.NormalDist().inv_cdf(0.975)
    assert t_critical(0.95, 1e7) == pytest.approx(z, rel=1e-6)
    assert t_critical(0.95, 5) > t_critical(0.95, 10) > t_critical(0.95, 100) > z


@pytest.mark.parametrize("df", [1.5, 2.7, 4.3, 7.9, 17.25])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_t_critical_for_fractional_degrees_of_freedom_agrees_with_mpmath(df, confidence):
    """Welch's df is not an integer. mpmath (installed with torch, through sympy) gives the incomplete
    beta function to 30 digits: P(|T| > t) = I_{df/(df+t^2)}(df/2, 1/2) must equal 1 - confidence."""
    mpmath = pytest.importorskip("mpmath")
    t = t_critical(confidence, df)
    with mpmath.workdps(30):
        tail = mpmath.betainc(mpmath.mpf(df) / 2, mpmath.mpf(1) / 2, 0, df / (df + mpmath.mpf(t) ** 2),
                              regularized=True)
        assert abs(float(tail) - (1 - confidence)) < 1e-11


# ---------------------------------------------------------------------------
# Intervals and comparisons, by hand
# ---------------------------------------------------------------------------


def test_interval_by_hand():
    # 1..5: mean 3, s^2 = 2.5, s / sqrt(5) = sqrt(0.5); t(0.975; 4) = 2.776445 (table: 2.776).
    mean, low, high = interval([1, 2, 3, 4, 5])
    half = 2.7764451 * math.sqrt(0.5)
    assert mean == 3
    assert low == pytest.approx(3 - half, abs=1e-6) and high == pytest.approx(3 + half, abs=1e-6)
    # Tensors and NumPy arrays are accepted; the named fields are the tuple's.
    result = interval(torch.tensor([1.0, 2, 3, 4, 5]), confidence=0.99)
    assert result.mean == 3 and result.high - result.mean == pytest.approx(4.604095 * math.sqrt(0.5), abs=1e-5)


def test_welch_interval_by_hand():
    a, b = [0.71, 0.74, 0.69, 0.80, 0.77], [0.60, 0.75, 0.52, 0.70, 0.66, 0.58]
    va, vb = statistics.variance(a) / 5, statistics.variance(b) / 6
    df = (va + vb) ** 2 / (va**2 / 4 + vb**2 / 5)
    diff = statistics.mean(a) - statistics.mean(b)
    half = t_critical(0.95, df) * math.sqrt(va + vb)
    result = compare(a, b, names=("DoRA", "LoRA"))
    assert result.df == pytest.approx(df) and min(4, 5) <= result.df <= 4 + 5
    assert result.difference == pytest.approx(diff)
    assert (result.low, result.high) == (pytest.approx(diff - half), pytest.approx(diff + half))
    assert (result.n_a, result.n_b, result.n) == (5, 6, 5)


def test_welch_with_equal_variances_and_sizes_is_the_pooled_interval():
    # Textbook property: equal sample variances and sizes give Welch's df = 2(n - 1), the pooled t interval.
    a, b = [1.0, 2.0, 3.0, 4.0], [11.0, 12.0, 13.0, 14.0]
    result = compare(a, b)
    assert result.df == pytest.approx(6)
    pooled_se = math.sqrt(statistics.variance(a) * (1 / 4 + 1 / 4))
    assert result.high - result.difference == pytest.approx(2.446912 * pooled_se, abs=1e-5)  # t(0.975; 6)


def test_paired_is_the_interval_of_the_differences():
    a, b = [0.81, 0.77, 0.90, 0.68, 0.85], [0.79, 0.74, 0.86, 0.67, 0.80]
    mean, low, high = interval([x - y for x, y in zip(a, b, strict=True)])
    result = compare(a, b, paired=True)
    assert (result.difference, result.low, result.high) == (pytest.approx(mean), pytest.approx(low),
                                                            pytest.approx(high))
    assert result.df == 4 and result.paired
    # The shared seed effect is large here; pairing removes it, Welch cannot.
    unpaired = compare(a, b)
    assert unpaired.high - unpaired.low > 5 * (result.high - result.low)
    assert result.decided and not unpaired.decided


# ---------------------------------------------------------------------------
# Coverage by simulation: 95 % intervals cover 95 % at n = 5; a z interval does not
# ---------------------------------------------------------------------------

EXPERIMENTS, N, CONFIDENCE = 4000, 5, 0.95
# Binomial standard error of a coverage estimate near 0.95 from 4,000 experiments: 0.0034. Four of them.
TOLERANCE = 4 * math.sqrt(CONFIDENCE * (1 - CONFIDENCE) / EXPERIMENTS)
Z = statistics.NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)


def _coverage(make_arms, truth, paired):
    """Fraction of simulated experiments whose interval holds ``truth``: the t interval of ``compare``,
    and the same centre with the normal quantile instead (what a z or bootstrap-like interval does)."""
    rng = random.Random(1234)
    covered_t = covered_z = 0
    for _ in range(EXPERIMENTS):
        a, b = make_arms(rng)
        result = compare(a, b, paired=paired, confidence=CONFIDENCE)
        covered_t += result.low <= truth <= result.high
        se = (result.high - result.difference) / t_critical(CONFIDENCE, result.df)
        covered_z += abs(result.difference - truth) <= Z * se
    return covered_t / EXPERIMENTS, covered_z / EXPERIMENTS


def test_unpaired_95_intervals_cover_95_percent_at_five_seeds():
    def arms(rng):  # unequal spreads: what Welch is for
        return [rng.gauss(0.70, 0.02) for _ in range(N)], [rng.gauss(0.65, 0.05) for _ in range(N)]

    t_cover, z_cover = _coverage(arms, 0.70 - 0.65, paired=False)
    assert abs(t_cover - CONFIDENCE) <= TOLERANCE, t_cover
    # The test discriminates: the normal-quantile interval covers about 88 %, outside the tolerance.
    assert z_cover < CONFIDENCE - TOLERANCE, z_cover


def test_paired_95_intervals_cover_95_percent_at_five_seeds():
    def arms(rng):  # a large shared seed effect, small per-arm noise
        seeds = [rng.gauss(0.0, 0.10) for _ in range(N)]
        return ([0.72 + s + rng.gauss(0, 0.01) for s in seeds], [0.70 + s + rng.gauss(0, 0.01) for s in seeds])

    t_cover, z_cover = _coverage(arms, 0.02, paired=True)
    assert abs(t_cover - CONFIDENCE) <= TOLERANCE, t_cover
    assert z_cover < CONFIDENCE - TOLERANCE, z_cover


def test_interval_of_a_mean_covers_95_percent_at_five_seeds():
    rng = random.Random(99)
    hits = 0
    for _ in range(EXPERIMENTS):
        _, low, high = interval([rng.gauss(3.0, 2.0) for _ in range(N)])
        hits += low <= 3.0 <= high
    assert abs(hits / EXPERIMENTS - CONFIDENCE) <= TOLERANCE, hits / EXPERIMENTS


# ---------------------------------------------------------------------------
# The decision and the verdict follow the interval
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("higher_is_better", [True, False])
def test_decided_and_better_follow_the_interval(paired, higher_is_better):
    rng = random.Random(7)
    seen = set()
    for _ in range(300):
        shift = rng.choice([-0.2, -0.05, 0.0, 0.05, 0.2])
        a = [rng.gauss(shift, 0.1) for _ in range(5)]
        b = [rng.gauss(0.0, 0.1) for _ in range(5)]
        result = compare(a, b, names=("A", "B"), paired=paired, higher_is_better=higher_is_better)
        assert result.decided == (result.low > 0 or result.high < 0)
        if not result.decided:
            assert result.better is None and "cannot tell them apart" in result.verdict
        else:
            a_won = (result.low > 0) == higher_is_better
            assert result.better == ("A" if a_won else "B")
            assert result.verdict.endswith(f"{result.better} is better" + ("" if higher_is_better else
                                                                           " (lower is better)"))
        seen.add(result.better)
    assert seen == {"A", "B", None}, "the simulation should produce every outcome"


def test_a_clear_difference_is_decided_and_names_the_winner():
    lora, dora = [0.70, 0.72, 0.71, 0.69, 0.70], [0.80, 0.83, 0.81, 0.79, 0.82]
    result = compare(dora, lora, names=("DoRA", "LoRA"))
    assert isinstance(result, Comparison) and result.decided and result.better == "DoRA"
    loss = compare([1.2, 1.3, 1.25, 1.22, 1.28], [0.9, 0.95, 0.92, 0.91, 0.97], names=("full", "LoRA"),
                   higher_is_better=False)
    assert loss.decided and loss.better == "LoRA"
    with pytest.raises(AttributeError):  # frozen
        result.decided = False


_NUMBER = r"([+\u2212]\d+(?:\.\d+)?)"
_VERDICT = re.compile(rf"^(.+) \u2212 (.+) = {_NUMBER} \[{_NUMBER}, {_NUMBER}\](?: \((\d+) % interval\))? "
                      r"over (.+?) seeds: (.+)$")


def _value(text: str) -> float:
    return float(text.replace("\u2212", "-"))


@pytest.mark.parametrize("kwargs", [
    {},
    {"paired": True},
    {"confidence": 0.9},
    {"digits": 2},
    {"higher_is_better": False},
])
def test_the_verdict_says_the_numbers(kwargs):
    rng = random.Random(3)
    for _ in range(50):
        a = [rng.gauss(0.03, 0.05) for _ in range(5)]
        b = [rng.gauss(0.0, 0.05) for _ in range(5)]
        result = compare(a, b, names=("DoRA", "LoRA"), **kwargs)
        match = _VERDICT.match(result.verdict)
        assert match, result.verdict
        name_a, name_b, diff, low, high, level, seeds, conclusion = match.groups()
        assert (name_a, name_b) == ("DoRA", "LoRA")
        decimals = len(diff.partition(".")[2])
        if "digits" in kwargs:
            assert decimals == kwargs["digits"]
        for shown, exact in ((diff, result.difference), (low, result.low), (high, result.high)):
            assert abs(_value(shown) - exact) <= 0.5 * 10**-decimals + 1e-12, (shown, exact)
            assert (shown[0] == "+") == (exact >= 0)
        # Two significant digits of the half-width: the interval's width is readable.
        if "digits" not in kwargs:
            assert (result.high - result.low) / 2 >= 10 ** (1 - decimals) - 1e-12
        assert level == (None if "confidence" not in kwargs else "90")
        assert seeds == ("5 paired" if kwargs.get("paired") else "5")
        assert conclusion == str(result).split(": ")[-1]
        assert ("cannot tell them apart" in conclusion) == (not result.decided)


def test_the_verdict_of_the_issues_example():
    # Chosen so that the numbers are the issue's: DoRA − LoRA = +0.03 [−0.05, +0.11] over 5 seeds.
    a = [0.03 + d for d in (-0.08, -0.04, 0.0, 0.04, 0.08)]
    b = [0.0] * 5
    result = compare(a, b, names=("DoRA", "LoRA"), digits=2)
    assert result.verdict == ("DoRA \u2212 LoRA = +0.03 [\u22120.05, +0.11] over 5 seeds: "
                              "these runs cannot tell them apart")
    assert compare(a, b, names=("DoRA", "LoRA"), digits=2).difference == pytest.approx(0.03)


def test_unequal_arms_say_both_counts():
    result = compare([1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0])
    assert " over 3 and 5 seeds: " in result.verdict and result.n == 3


# ---------------------------------------------------------------------------
# Bad input: clear errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("call", "error", "phrase"), [
    (lambda: interval([0.7]), ValueError, "at least 2"),
    (lambda: interval([]), ValueError, "at least 2"),
    (lambda: interval([0.7, float("nan"), 0.8]), ValueError, "nan (value 2 of 3)"),
    (lambda: interval([0.7, float("inf")]), ValueError, "inf"),
    (lambda: interval([0.7, 0.8], confidence=95), ValueError, "between 0 and 1"),
    (lambda: interval([0.7, 0.8], confidence=0.0), ValueError, "between 0 and 1"),
    (lambda: interval([0.7, 0.8], confidence=1.0), ValueError, "between 0 and 1"),
    (lambda: interval([[0.7, 0.8], [0.7, 0.9]]), TypeError, "one number per seed"),
    (lambda: interval("0.7 0.8"), TypeError, "sequence of numbers"),
    (lambda: interval(0.7), TypeError, "sequence of numbers"),
    (lambda: compare([0.7, 0.8], [0.6], names=("DoRA", "LoRA")), ValueError, "LoRA (b) has 1 value"),
    (lambda: compare([0.7, 0.8, 0.9], [0.6, 0.7], paired=True, names=("DoRA", "LoRA")), ValueError,
     "DoRA has 3 values and LoRA 2"),
    (lambda: compare([0.7, 0.8], [0.6, 0.7], names="DoRA"), TypeError, "two strings"),
    (lambda: compare([0.7, 0.8], [0.6, 0.7], confidence=1.5), ValueError, "between 0 and 1"),
    (lambda: t_critical(0.95, 0), ValueError, "positive"),
])
def test_bad_input_gets_a_clear_error(call, error, phrase):
    with pytest.raises(error) as info:
        call()
    assert phrase in str(info.value), str(info.value)


def test_no_spread_gives_a_point_interval():
    assert interval([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    same = compare([0.5, 0.5], [0.5, 0.5])
    assert (same.difference, same.low, same.high, same.decided, same.better) == (0.0, 0.0, 0.0, False, None)
    apart = compare([0.6, 0.6], [0.5, 0.5])
    assert apart.decided and apart.better == "a"
