"""check.task_arithmetic, check.ties_merge and check.dare_prune both ways: correct answers written
differently pass, each typical mistake fails with its own reason, stubs are "not attempted"."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from course import check, merging

# ---------------------------------------------------------------------------
# task_arithmetic
# ---------------------------------------------------------------------------


def ta_loop(deltas, weights):
    total = torch.zeros_like(deltas[0])
    for w, d in zip(weights, deltas, strict=True):
        total = total + w * d
    return total


def ta_einsum(deltas, weights):
    return torch.einsum("n,n...->...", torch.tensor(weights, dtype=deltas[0].dtype), torch.stack(deltas))


def ta_mean(deltas, weights):
    return torch.stack([w * d for w, d in zip(weights, deltas, strict=True)]).mean(0)


def ta_unweighted(deltas, weights):
    return torch.stack(deltas).sum(0)


def ta_unweighted_mean(deltas, weights):
    return torch.stack(deltas).mean(0)


def ta_normalised(deltas, weights):
    return ta_loop(deltas, weights) / sum(weights)


def ta_in_place(deltas, weights):
    for w, d in zip(weights, deltas, strict=True):
        d.mul_(w)
    return torch.stack(deltas).sum(0)


@pytest.mark.parametrize("answer", [merging.task_arithmetic, ta_loop, ta_einsum])
def test_task_arithmetic_correct_answers_pass(answer):
    result = check.task_arithmetic.run(answer)
    assert result.status == "passed", result.message


TA_MISTAKES = [
    (ta_mean, ["weighted *mean*", "full strength"]),
    (ta_unweighted, ["plain sum", "weights are ignored"]),
    (ta_unweighted_mean, ["unweighted mean"]),
    (ta_normalised, ["sum of the weights"]),
    (ta_in_place, ["changed the deltas", "in-place"]),
]


@pytest.mark.parametrize(("answer", "phrases"), TA_MISTAKES, ids=[m[0].__name__ for m in TA_MISTAKES])
def test_task_arithmetic_mistakes_fail_with_their_reason(answer, phrases):
    result = check.task_arithmetic.run(answer)
    assert result.status == "failed"
    for phrase in phrases:
        assert phrase in result.message, result.message


# ---------------------------------------------------------------------------
# ties_merge
# ---------------------------------------------------------------------------


def ties_threshold(deltas, weights, density):
    """Written differently: a kthvalue threshold instead of topk, loops instead of a stack."""
    trimmed = []
    for d in deltas:
        k = int(density * d.numel())
        if k >= d.numel():
            trimmed.append(d.clone())
            continue
        threshold = d.abs().flatten().kthvalue(d.numel() - k).values  # the largest dropped magnitude
        trimmed.append(torch.where(d.abs() > threshold, d, torch.zeros_like(d)))
    total = sum(trimmed)
    elected = torch.where(total >= 0, torch.ones_like(total), -torch.ones_like(total))
    numerator = torch.zeros_like(total)
    count = torch.zeros_like(total)
    for t, w in zip(trimmed, weights, strict=True):
        agree = (torch.sign(t) == elected).to(t.dtype)
        numerator += w * t * agree
        count += agree
    return numerator / count.clamp(min=1)


def _ties(deltas, weights, density, *, trim=None, elect=None, divide=None, weigh_first=False, use_weights=True):
    """A TIES with one step replaced, to make the typical mistakes."""
    stacked = torch.stack(deltas)
    w = torch.tensor(weights if use_weights else [1.0] * len(weights)).view(-1, *([1] * (stacked.dim() - 1)))
    k = int(density * stacked[0].numel())
    trim = trim or (lambda d, k: merging.magnitude_prune(d, k / d.numel()))
    t = torch.stack([trim(d, k) for d in stacked])
    vote = t * w if weigh_first else t
    sign = (elect or (lambda v: torch.where(v.sum(0) >= 0, 1, -1)))(vote)
    agree = t.sign() == sign
    summed = (t * w * agree).sum(0)
    return summed / (divide(agree, t) if divide else agree.sum(0).clamp(min=1))


def _keep(d, k, largest=True, key=torch.abs):
    mask = torch.zeros(d.numel())
    mask[torch.topk(key(d).flatten(), k, largest=largest).indices] = 1
    return d * mask.view(d.shape)


def ties_no_election(deltas, weights, density):
    return merging.task_arithmetic([merging.magnitude_prune(d, density) for d in deltas], weights)


def ties_no_election_mean(deltas, weights, density):
    t = torch.stack([merging.magnitude_prune(d, density) for d in deltas])
    w = torch.tensor(weights).view(-1, *([1] * (t.dim() - 1)))
    return (t * w).sum(0) / (t != 0).sum(0).clamp(min=1)


def ties_smallest(deltas, weights, density):
    return _ties(deltas, weights, density, trim=lambda d, k: _keep(d, k, largest=False))


def ties_by_value(deltas, weights, density):
    return _ties(deltas, weights, density, trim=lambda d, k: _keep(d, k, key=lambda x: x))


def ties_keeps_one_minus_density(deltas, weights, density):
    return _ties(deltas, weights, density, trim=lambda d, k: _keep(d, d.numel() - k) if k < d.numel() else d)


def ties_joint_trim(deltas, weights, density):
    stacked = torch.stack(deltas)
    k = int(density * stacked[0].numel()) * len(deltas)
    joint = list(_keep(stacked, k))
    return _ties(joint, weights, 1.0)


def ties_mean_over_all(deltas, weights, density):
    return _ties(deltas, weights, density, divide=lambda agree, t: len(deltas))


def ties_sum_not_mean(deltas, weights, density):
    return _ties(deltas, weights, density, divide=lambda agree, t: 1)


def ties_elect_weighted(deltas, weights, density):
    return _ties(deltas, weights, density, weigh_first=True)


def ties_elect_by_count(deltas, weights, density):
    return _ties(deltas, weights, density, elect=lambda v: torch.where(v.sign().sum(0) >= 0, 1, -1))


def ties_unweighted(deltas, weights, density):
    return _ties(deltas, weights, density, use_weights=False)


@pytest.mark.parametrize("answer", [merging.ties_merge, ties_threshold])
def test_ties_correct_answers_pass(answer):
    result = check.ties_merge.run(answer)
    assert result.status == "passed", result.message


TIES_MISTAKES = [
    (ties_no_election, ["without the sign election"]),
    (ties_no_election_mean, ["without electing a sign"]),
    (ties_smallest, ["*smallest*", "largest magnitudes"]),
    (ties_by_value, ["largest *values*", "magnitude"]),
    (ties_keeps_one_minus_density, ["1 - density", "*stays*"]),
    (ties_joint_trim, ["all the deltas together"]),
    (ties_mean_over_all, ["number of deltas", "*all*"]),
    (ties_sum_not_mean, ["do not average"]),
    (ties_elect_weighted, ["*weighted*", "before weighting"]),
    (ties_elect_by_count, ["counting votes", "*sum*"]),
    (ties_unweighted, ["ignores the weights"]),
]


@pytest.mark.parametrize(("answer", "phrases"), TIES_MISTAKES, ids=[m[0].__name__ for m in TIES_MISTAKES])
def test_ties_mistakes_fail_with_their_reason(answer, phrases):
    result = check.ties_merge.run(answer)
    assert result.status == "failed"
    for phrase in phrases:
        assert phrase in result.message, result.message


# ---------------------------------------------------------------------------
# dare_prune
# ---------------------------------------------------------------------------


def dare_rand(delta, density):
    return torch.where(torch.rand_like(delta) < density, delta / density, torch.zeros_like(delta))


def dare_fixed_count(delta, density):
    """Keeps exactly round(density * n) entries chosen at random: each is kept with probability density."""
    n = delta.numel()
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.randperm(n)[: round(density * n)]] = True
    return (delta.flatten() * keep / density).view(delta.shape)


def dare_numpy(delta, density):
    mask = np.random.default_rng(int(torch.randint(0, 2**31, ()))).random(tuple(delta.shape)) < density
    return delta * torch.from_numpy(mask) / density


def dare_no_rescale(delta, density):
    return delta * torch.bernoulli(torch.full_like(delta, density))


def dare_keep_one_minus(delta, density):
    return delta * torch.bernoulli(torch.full_like(delta, 1 - density)) / density


def dare_wrong_factor(delta, density):
    return delta * torch.bernoulli(torch.full_like(delta, density)) / (1 - density)


def dare_times_density(delta, density):
    return delta * torch.bernoulli(torch.full_like(delta, density)) * density


def dare_magnitude(delta, density):
    return merging.magnitude_prune(delta, density) / density


def dare_seeded_inside(delta, density):
    generator = torch.Generator().manual_seed(0)
    return delta * (torch.rand(delta.shape, generator=generator) < density) / density


def dare_first_entries(delta, density):
    keep = torch.arange(delta.numel()) < density * delta.numel()
    return (delta.flatten() * keep / density).view(delta.shape)


def dare_returns_mask(delta, density):
    return torch.bernoulli(torch.full_like(delta, density))


def dare_in_place(delta, density):
    return delta.mul_(torch.bernoulli(torch.full_like(delta, density))).div_(density)


def dare_nothing_dropped(delta, density):
    return delta / density


@pytest.mark.parametrize("answer", [merging.dare_prune, dare_rand, dare_fixed_count, dare_numpy])
def test_dare_correct_answers_pass(answer):
    result = check.dare_prune.run(answer)
    assert result.status == "passed", result.message


DARE_MISTAKES = [
    (dare_no_rescale, ["not rescaled", "Divide them by density"]),
    (dare_keep_one_minus, ["about 1 - density", "*survives*"]),
    (dare_wrong_factor, ["= 1 / (1 - density)", "1 / density = 3.333"]),
    (dare_times_density, ["= density;", "1 / density"]),
    (dare_magnitude, ["magnitude pruning", "at random"]),
    (dare_seeded_inside, ["exactly the same entries", "do not seed"]),
    (dare_first_entries, ["exactly the same entries", "the first ones"]),
    (dare_returns_mask, ["not all rescaled by the same factor"]),
    (dare_in_place, ["changed the delta"]),
    (dare_nothing_dropped, ["nothing was dropped"]),
]


@pytest.mark.parametrize(("answer", "phrases"), DARE_MISTAKES, ids=[m[0].__name__ for m in DARE_MISTAKES])
def test_dare_mistakes_fail_with_their_reason(answer, phrases):
    result = check.dare_prune.run(answer)
    assert result.status == "failed"
    for phrase in phrases:
        assert phrase in result.message, result.message


def test_dare_keep_rate_per_entry_is_judged():
    """Right share on average, but entry i is kept with a probability that depends on i."""

    def biased(delta, density):
        n = delta.numel()
        p = torch.linspace(density - 0.25, density + 0.25, n).clamp(0.01, 1).view(delta.shape)
        return delta * torch.bernoulli(p) / density

    result = check.dare_prune.run(biased)
    assert result.status == "failed"
    assert "kept far more often than others" in result.message or "not delta" in result.message, result.message


# ---------------------------------------------------------------------------
# All three
# ---------------------------------------------------------------------------

ALL_MISTAKES = {
    "task_arithmetic": TA_MISTAKES,
    "ties_merge": TIES_MISTAKES,
    "dare_prune": DARE_MISTAKES,
}


@pytest.mark.parametrize("name", list(ALL_MISTAKES))
def test_each_mistake_has_its_own_message(name):
    messages = [getattr(check, name).run(answer).message for answer, _ in ALL_MISTAKES[name]]
    assert len(set(messages)) == len(messages), messages


@pytest.mark.parametrize("name", list(ALL_MISTAKES))
def test_stubs_are_not_attempted(name):
    def answer(*args):
        raise NotImplementedError()

    assert getattr(check, name).run(answer).status == "not_attempted"


@pytest.mark.parametrize("name", list(ALL_MISTAKES))
def test_not_a_function(name):
    result = getattr(check, name).run(42)
    assert result.status == "failed"
    assert "Expected a function" in result.message


@pytest.mark.parametrize(("name", "reference"), [
    ("task_arithmetic", merging.task_arithmetic),
    ("ties_merge", merging.ties_merge),
    ("dare_prune", merging.dare_prune),
])
def test_checks_leave_the_global_random_state_alone(name, reference):
    torch.manual_seed(123)
    np.random.seed(7)
    expected = torch.rand(3), np.random.rand(2)
    torch.manual_seed(123)
    np.random.seed(7)
    getattr(check, name).run(reference)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(2), expected[1])


@pytest.mark.parametrize("name", list(ALL_MISTAKES))
def test_hints_are_tiered(name, capsys):
    for level in (1, 2, 3):
        getattr(check, name).hint(level)
    out = capsys.readouterr().out
    assert "Hint 1 of 3" in out and "Hint 3 of 3" in out
