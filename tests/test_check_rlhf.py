"""check.dpo_loss both ways: correct answers written differently pass, each typical mistake fails with its reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from course import check
from course.rlhf import dpo_loss

# ---------------------------------------------------------------------------
# Correct answers, written differently
# ---------------------------------------------------------------------------


def softplus_form(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.1):
    """-log sigmoid(x) = softplus(-x), with the log-ratios grouped the other way."""
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    return F.softplus(-beta * logits)


def log_of_sigmoid(pc, pr, rc, rr, beta=0.1):
    """The textbook form, -log(sigmoid(.)): fine at these magnitudes."""
    chosen_reward = beta * (pc - rc)
    rejected_reward = beta * (pr - rr)
    return -torch.log(torch.sigmoid(chosen_reward - rejected_reward))


@pytest.mark.parametrize("answer", [dpo_loss, softplus_form, log_of_sigmoid])
def test_correct_answers_pass(answer):
    result = check.dpo_loss.run(answer)
    assert result.status == "passed", result.message


# ---------------------------------------------------------------------------
# Typical mistakes: each a small change to a correct answer
# ---------------------------------------------------------------------------


def sign_flipped(pc, pr, rc, rr, beta=0.1):
    return F.logsigmoid(beta * ((pc - rc) - (pr - rr)))


def beta_missing(pc, pr, rc, rr, beta=0.1):
    return -F.logsigmoid((pc - rc) - (pr - rr))


def reference_not_subtracted(pc, pr, rc, rr, beta=0.1):
    return -F.logsigmoid(beta * (pc - pr))


def chosen_and_rejected_swapped(pc, pr, rc, rr, beta=0.1):
    return -F.logsigmoid(beta * ((pr - rr) - (pc - rc)))


def mean_returned(pc, pr, rc, rr, beta=0.1):
    return (-F.logsigmoid(beta * ((pc - rc) - (pr - rr)))).mean()


def beta_ignored(pc, pr, rc, rr, beta=0.1):
    return -F.logsigmoid(0.1 * ((pc - rc) - (pr - rr)))


def sigmoid_without_log(pc, pr, rc, rr, beta=0.1):
    return -torch.sigmoid(beta * ((pc - rc) - (pr - rr)))


def wrong_default_beta(pc, pr, rc, rr, beta=1.0):
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))


def detached(pc, pr, rc, rr, beta=0.1):
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).detach()


def python_list(pc, pr, rc, rr, beta=0.1):
    return (-F.logsigmoid(beta * ((pc - rc) - (pr - rr)))).tolist()


@pytest.mark.parametrize(
    ("answer", "phrases"),
    [
        (sign_flipped, ["sign is flipped"]),
        (beta_missing, ["beta is missing"]),
        (reference_not_subtracted, ["reference log-probabilities are not subtracted"]),
        (chosen_and_rejected_swapped, ["chosen and rejected the wrong way round"]),
        (mean_returned, ["mean over the batch", "one loss per example"]),
        (beta_ignored, ["ignores its beta argument"]),
        (sigmoid_without_log, ["without its logarithm"]),
        (wrong_default_beta, ["beta=0.1"]),
        (detached, ["No gradient flows"]),
        (python_list, ["not a torch.Tensor"]),
    ],
)
def test_each_mistake_fails_with_its_own_message(answer, phrases):
    result = check.dpo_loss.run(answer)
    assert result.status == "failed", f"{answer.__name__} passed"
    for phrase in phrases:
        assert phrase in result.message, f"{answer.__name__}: {result.message!r}"


def test_the_messages_are_all_different():
    mistakes = [sign_flipped, beta_missing, reference_not_subtracted, chosen_and_rejected_swapped, mean_returned]
    messages = {check.dpo_loss.run(m).message for m in mistakes}
    assert len(messages) == len(mistakes)


def test_a_stub_is_not_attempted():
    def stub(pc, pr, rc, rr, beta=0.1):
        raise NotImplementedError()

    assert check.dpo_loss.run(stub).status == "not_attempted"


def test_an_answer_that_edits_its_inputs_is_still_judged_on_the_formula():
    def in_place(pc, pr, rc, rr, beta=0.1):
        pc = pc.sub_(rc)  # changes the caller's tensor: the check passes copies
        return -F.logsigmoid(beta * (pc - (pr - rr)))

    assert check.dpo_loss.run(in_place).status == "passed"


def test_the_learners_random_state_is_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check.dpo_loss.run(dpo_loss)
    assert torch.equal(torch.rand(3), expected)
