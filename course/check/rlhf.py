"""Checks for notebook 07, TRL and RLHF with LoRA: ``check.dpo_loss``.

The learner writes DPO's loss (eq. 7 of Rafailov et al. 2023) from four tensors of summed
log-probabilities. The check compares it with the explicit formula, which is TRL's
``loss_type="sigmoid"`` loss (tests/test_rlhf.py holds the two together), on seeded
inputs, and names the usual mistake when the answer matches one of them instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from course.check.core import Failure, check, expect

BETA = 0.3  # not the default 0.1: an answer that ignores its beta argument shows up
BATCH = 6


def _inputs(seed: int, batch: int = BATCH, spread: float = 4.0) -> tuple[torch.Tensor, ...]:
    """Summed log-probabilities (negative numbers, as for a completion of a few tokens), seeded."""
    g = torch.Generator().manual_seed(seed)
    return tuple(-spread * torch.rand(batch, generator=g) - 0.5 for _ in range(4))


def _reference(pc, pr, rc, rr, beta):
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    # float32 arithmetic on numbers of order 1: rounding is ~1e-7; 1e-5 leaves room for other orders.
    return tuple(got.shape) == tuple(want.shape) and torch.allclose(got.float(), want.float(), rtol=1e-5, atol=1e-5)


def _as_tensor(value, where: str) -> torch.Tensor:
    expect(isinstance(value, torch.Tensor), f"{where} returned a {type(value).__name__}, not a torch.Tensor. "
           "Return the losses as a tensor (one number per example), computed with torch operations.")
    return value


def _call(answer, args, beta=None):
    """The answer on copies of ``args`` (so that in-place edits do not spoil the comparison)."""
    copies = [a.clone() for a in args]
    out = answer(*copies) if beta is None else answer(*copies, beta)
    return _as_tensor(out, "Your function")


def _diagnose(got: torch.Tensor, args, beta: float) -> None:
    """Fail with the reason when ``got`` is one of the usual wrong answers."""
    pc, pr, rc, rr = args
    want = _reference(pc, pr, rc, rr, beta)
    if got.dim() == 0 or got.numel() == 1 and want.numel() > 1:
        if torch.allclose(got.float().reshape(()), want.mean(), rtol=1e-5, atol=1e-5):
            raise Failure("You return the mean over the batch, one number. Return one loss per example "
                          f"(shape {tuple(want.shape)}); whoever trains takes `.mean()` (TRL does).")
        raise Failure(f"You return a single number; return one loss per example, shape {tuple(want.shape)}.")
    expect(tuple(got.shape) == tuple(want.shape), f"For {len(pc)} examples your losses have shape "
           f"{tuple(got.shape)}; want {tuple(want.shape)}, one loss per example.")
    margin = (pc - rc) - (pr - rr)
    mistakes = [
        (-want, "Your losses are the negatives of DPO's: the sign is flipped. The loss is "
                "-log sigmoid(beta * margin), a positive number that falls as the margin grows."),
        (_reference(pr, pc, rr, rc, beta), "You have chosen and rejected the wrong way round (or the log-ratios "
                                           "as reference minus policy): the margin is (log pi(chosen) - log "
                                           "ref(chosen)) - (log pi(rejected) - log ref(rejected))."),
        (-F.logsigmoid(margin), "beta is missing: multiply the margin by beta inside the sigmoid, "
                                "-logsigmoid(beta * margin)."),
        (-F.logsigmoid(0.1 * margin), f"Your function ignores its beta argument (called with beta={beta} it "
                                      "uses 0.1). Use the `beta` it is given."),
        (-F.logsigmoid(margin / beta), "You divide by beta; multiply: -logsigmoid(beta * margin)."),
        (-F.logsigmoid(beta * (pc - pr)), "The reference log-probabilities are not subtracted: DPO's margin "
                                          "compares log-ratios policy - reference, (pc - rc) - (pr - rr), not "
                                          "the policy's log-probabilities alone."),
        (-F.logsigmoid(beta * (rc - rr)), "You use only the reference log-probabilities; the margin is "
                                          "(pc - rc) - (pr - rr)."),
        (-torch.sigmoid(beta * margin), "You take the sigmoid without its logarithm: the loss is "
                                        "-log sigmoid(beta * margin) (F.logsigmoid)."),
        (1 - torch.sigmoid(beta * margin), "1 - sigmoid is not DPO's loss: it is -log sigmoid(beta * margin) "
                                           "(F.logsigmoid)."),
        (want.mean().expand_as(want), "You return the batch mean repeated for every example; return each "
                                      "example's own loss."),
    ]
    for wrong, message in mistakes:
        if _close(got, wrong):
            raise Failure(message)
    raise Failure("Your losses are not -logsigmoid(beta * ((pc - rc) - (pr - rr))), one per example. Write the "
                  "margin of log-ratios first, then the loss.")


@check(
    "dpo_loss",
    hint=[
        "DPO's implicit reward of a completion is beta times its log-ratio, log pi(y|x) - log ref(y|x). The "
        "loss asks the chosen completion's reward to beat the rejected one's, through a logistic (Bradley-Terry) "
        "model: minus the log of the sigmoid of the difference.",
        "Compute `chosen = policy_chosen_logps - reference_chosen_logps` and the same for rejected, then "
        "`-F.logsigmoid(beta * (chosen - rejected))`. Do not average: return one loss per example.",
        "`return -torch.nn.functional.logsigmoid(beta * ((policy_chosen_logps - reference_chosen_logps) - "
        "(policy_rejected_logps - reference_rejected_logps)))`",
    ],
    solution=None,  # the solution notebook's answer, from the exercise manifest
    reference="course.rlhf:dpo_loss",
)
def dpo_loss(answer):
    """``answer`` is ``f(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
    reference_rejected_logps, beta=0.1) -> Tensor(batch)``, DPO's per-example sigmoid loss."""
    expect(callable(answer), f"Expected a function, got {type(answer).__name__}. Pass the function itself: "
           "check.dpo_loss(dpo_loss).")
    args = _inputs(0)
    got = _call(answer, args, BETA)
    if not _close(got, _reference(*args, BETA)):
        _diagnose(got, args, BETA)
    # The default beta is 0.1, as in TRL's DPOConfig.
    got = _call(answer, args)
    want = _reference(*args, 0.1)
    expect(_close(got, want), "Called without beta your function does not use beta=0.1. Give the argument "
           "that default: `beta=0.1`, as TRL's DPOConfig does.")
    # Other inputs, a batch of one, larger margins: still the formula.
    for seed, batch, spread in ((1, 1, 4.0), (2, 9, 40.0)):
        args = _inputs(seed, batch, spread)
        got = _call(answer, args, BETA)
        if not _close(got, _reference(*args, BETA)):
            _diagnose(got, args, BETA)
    # Gradients must reach the policy's log-probabilities (and be the formula's).
    leaves = [a.clone().requires_grad_(i < 2) for i, a in enumerate(_inputs(3))]
    loss = _as_tensor(answer(*[a.clone() for a in leaves], BETA), "Your function")
    expect(loss.requires_grad, "No gradient flows from your losses to the policy log-probabilities: do not "
           "detach them, turn them into Python numbers or compute under torch.no_grad().")
    loss.sum().backward()
    ref = [a.detach().clone().requires_grad_(i < 2) for i, a in enumerate(leaves)]
    _reference(*ref, BETA).sum().backward()
    for name, got_grad, want_grad in (("policy_chosen_logps", leaves[0].grad, ref[0].grad),
                                      ("policy_rejected_logps", leaves[1].grad, ref[1].grad)):
        expect(got_grad is not None and torch.allclose(got_grad, want_grad, rtol=1e-4, atol=1e-6),
               f"The gradient with respect to {name} is not the one of the DPO loss.")
