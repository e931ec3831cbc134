"""check.grpo_advantages both ways: correct answers written differently pass, each typical mistake fails with its reason."""

from __future__ import annotations

import pytest
import torch
from answers import checks_own_solution

from course import check
from course.rlhf import grpo_advantages

# ---------------------------------------------------------------------------
# Correct answers, written differently
# ---------------------------------------------------------------------------


def reshaped(rewards, group_size, scale_rewards="group"):
    """Broadcasting over a (prompts, group_size) view, flattened at the end."""
    groups = rewards.reshape(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        centred = centred / (groups.std(dim=1, keepdim=True) + 1e-4)
    elif scale_rewards == "batch":
        centred = centred / (rewards.std() + 1e-4)
    return centred.reshape(-1)


def loop(rewards, group_size, scale_rewards="group"):
    """One prompt at a time, the sample std written out."""
    values = rewards.tolist()
    n = len(values)
    batch_mean = sum(values) / n
    batch_std = (sum((v - batch_mean) ** 2 for v in values) / (n - 1)) ** 0.5
    out = []
    for start in range(0, n, group_size):
        group = values[start : start + group_size]
        mean = sum(group) / group_size
        std = (sum((v - mean) ** 2 for v in group) / (group_size - 1)) ** 0.5
        for v in group:
            if scale_rewards == "none":
                out.append(v - mean)
            else:
                out.append((v - mean) / ((std if scale_rewards == "group" else batch_std) + 1e-4))
    return torch.tensor(out)


def with_var(rewards, group_size, scale_rewards="group"):
    """torch.var with correction=1 and an explicit square root; the scaling chosen from a table."""
    groups = rewards.view(-1, group_size)
    means = groups.mean(1).repeat_interleave(group_size)
    divisor = {
        "group": groups.var(1, correction=1).sqrt().repeat_interleave(group_size) + 1e-4,
        "batch": rewards.var(correction=1).sqrt() + 1e-4,
        "none": torch.ones(()),
    }[scale_rewards]
    return (rewards - means) / divisor


def _fallback_solution():
    return checks_own_solution(check.grpo_advantages, "grpo_advantages", torch=torch)


@pytest.mark.parametrize("answer", [grpo_advantages, reshaped, loop, with_var, _fallback_solution()],
                         ids=["reference", "reshaped", "loop", "with_var", "fallback_solution"])
def test_correct_answers_pass(answer):
    result = check.grpo_advantages.run(answer)
    assert result.status == "passed", result.message


# ---------------------------------------------------------------------------
# Typical mistakes: each a small change to a correct answer
# ---------------------------------------------------------------------------


def _variant(*, unbiased=True, eps=1e-4, baseline="group", strided=False, honour_none=True, flat=True,
             eps_in_sqrt=False, honour_batch=True):
    def answer(rewards, group_size, scale_rewards="group"):
        groups = rewards.view(group_size, -1).t() if strided else rewards.view(-1, group_size)
        mean = rewards.mean() if baseline == "batch" else groups.mean(dim=1, keepdim=True)
        centred = groups - mean
        if scale_rewards == "none" and honour_none:
            out = centred
        else:
            if scale_rewards == "batch" and honour_batch:
                var = rewards.var(unbiased=unbiased)
            else:
                var = groups.var(dim=1, unbiased=unbiased, keepdim=True)
            std = (var + eps).sqrt() if eps_in_sqrt else var.sqrt() + eps
            out = centred / std
        if strided:
            out = out.t()
        return out.reshape(-1) if flat else out

    return answer


population_std = _variant(unbiased=False)
no_epsilon = _variant(eps=0.0)
small_epsilon = _variant(eps=1e-8)
other_epsilon = _variant(eps=1e-3)
epsilon_in_sqrt = _variant(eps_in_sqrt=True)
batch_mean_baseline = _variant(baseline="batch")
strided_groups = _variant(strided=True)
always_divides = _variant(honour_none=False)
batch_ignored = _variant(honour_batch=False)
not_flat = _variant(flat=False)


def no_epsilon_but_guarded(rewards, group_size, scale_rewards="group"):
    """Dodges the 0/0 of a constant group, but still divides by the bare std elsewhere."""
    advantages = reshaped(rewards, group_size, "none")
    if scale_rewards == "none":
        return advantages
    std = rewards.view(-1, group_size).std(1).repeat_interleave(group_size) if scale_rewards == "group" \
        else rewards.std().expand_as(rewards)
    return torch.where(std > 0, advantages / std, torch.zeros_like(advantages))


def batch_normalised(rewards, group_size, scale_rewards="group"):
    """Plain batch normalisation: batch mean and batch std, whatever the groups."""
    return (rewards - rewards.mean()) / (rewards.std() + 1e-4)


def one_per_prompt(rewards, group_size, scale_rewards="group"):
    return rewards.view(-1, group_size).mean(dim=1)


def groups_of_the_wrong_size(rewards, group_size, scale_rewards="group"):
    return reshaped(rewards, rewards.numel() // group_size, scale_rewards)


def python_list(rewards, group_size, scale_rewards="group"):
    return reshaped(rewards, group_size, scale_rewards).tolist()


def no_default(rewards, group_size, scale_rewards="batch"):
    return reshaped(rewards, group_size, scale_rewards)


@pytest.mark.parametrize(
    ("answer", "phrases"),
    [
        (population_std, ["population standard deviation", "n - 1"]),
        (no_epsilon, ["NaN or infinite", "without the epsilon", "std + 1e-4"]),
        (no_epsilon_but_guarded, ["without the epsilon", "std + 1e-4"]),
        (small_epsilon, ["without the epsilon (or with one far below 1e-4)"]),
        (other_epsilon, ["You add 0.001", "TRL adds 1e-4"]),
        (epsilon_in_sqrt, ["outside the square root"]),
        (batch_mean_baseline, ["baseline is the mean of the whole batch", "own group"]),
        (batch_normalised, ["baseline is the mean of the whole batch"]),
        (strided_groups, ["strided", "view(-1, group_size)"]),
        (groups_of_the_wrong_size, ["instead of group_size=4"]),
        (always_divides, ["scale_rewards=\"none\" do not divide", "always divide"]),
        (batch_ignored, ["scale_rewards=\"batch\"", "all the rewards"]),
        (not_flat, ["flat", "shape (3, 4)", ".flatten()"]),
        (one_per_prompt, ["one per prompt", "one advantage per completion"]),
        (python_list, ["returned a list, not a torch.Tensor", "one per completion"]),
        (no_default, ["Called without scale_rewards", "scale_rewards=\"group\""]),
    ],
)
def test_each_mistake_fails_with_its_own_message(answer, phrases):
    result = check.grpo_advantages.run(answer)
    assert result.status == "failed", f"{getattr(answer, '__name__', answer)} passed"
    for phrase in phrases:
        assert phrase in result.message, result.message


def test_the_messages_are_all_different():
    mistakes = [population_std, no_epsilon, batch_mean_baseline, strided_groups, always_divides, not_flat,
                epsilon_in_sqrt, batch_ignored]
    messages = {check.grpo_advantages.run(m).message for m in mistakes}
    assert len(messages) == len(mistakes)


def test_a_stub_is_not_attempted():
    def stub(rewards, group_size, scale_rewards="group"):
        raise NotImplementedError()

    assert check.grpo_advantages.run(stub).status == "not_attempted"


def test_an_answer_that_edits_its_rewards_in_place_is_still_judged_on_the_formula():
    def in_place(rewards, group_size, scale_rewards="group"):
        batch_std = rewards.std()
        groups = rewards.view(-1, group_size)  # a view: editing it edits the caller's tensor
        std = groups.std(dim=1, keepdim=True) if scale_rewards == "group" else batch_std
        groups.sub_(groups.mean(dim=1, keepdim=True))
        if scale_rewards != "none":
            groups.div_(std + 1e-4)
        return rewards

    assert check.grpo_advantages.run(in_place).status == "passed"


def test_the_solution_falls_back_to_the_checks_own_until_the_notebook_has_the_exercise(monkeypatch):
    from course.check import core

    monkeypatch.setattr(core, "_solutions_in_manifest", lambda: {})
    assert check.grpo_advantages.solution_source().startswith("def grpo_advantages(rewards, group_size")
    monkeypatch.setattr(core, "_solutions_in_manifest", lambda: {"grpo_advantages": "# the notebook's answer"})
    assert check.grpo_advantages.solution_source() == "# the notebook's answer"


def test_the_learners_random_state_is_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check.grpo_advantages.run(grpo_advantages)
    assert torch.equal(torch.rand(3), expected)
