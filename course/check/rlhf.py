"""Checks for notebook 07, TRL and RLHF with LoRA: ``check.dpo_loss`` and ``check.grpo_advantages``.

The learner writes DPO's loss (eq. 7 of Rafailov et al. 2023) from four tensors of summed
log-probabilities. The check compares it with the explicit formula, which is TRL's
``loss_type="sigmoid"`` loss (tests/test_rlhf.py holds the two together), on seeded
inputs, and names the usual mistake when the answer matches one of them instead.

``check.grpo_advantages`` takes the learner's GRPO advantages (``f(rewards, group_size,
scale_rewards="group")``) and compares them with ``course.rlhf.grpo_advantages``, which equals what
TRL's ``GRPOTrainer`` computes (tests/test_rlhf.py runs the trainer), for "group", "batch" and
"none" on three seeded batches; a wrong answer is matched against the usual mistakes (population
std, no epsilon, batch mean as baseline, groups taken strided, dividing when told "none", not flat).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from course.check.core import Failure, check, close, expect

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
    return close(got, want, rtol=1e-5, atol=1e-5)


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
        if close(got.reshape(()), want.mean(), rtol=1e-5, atol=1e-5):
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
        expect(got_grad is not None and close(got_grad, want_grad, rtol=1e-4, atol=1e-6),
               f"The gradient with respect to {name} is not the one of the DPO loss.")


# ---------------------------------------------------------------------------
# check.grpo_advantages
# ---------------------------------------------------------------------------

#: Shown by ``check.grpo_advantages.solution()`` until notebook 07 has the exercise (the manifest's answer wins).
_GRPO_SOLUTION = '''\
def grpo_advantages(rewards, group_size, scale_rewards="group"):
    # GRPO's advantages as TRL's GRPOTrainer computes them: each prompt's group_size completions are consecutive.
    groups = rewards.view(-1, group_size)  # one row per prompt
    advantages = rewards - groups.mean(dim=1).repeat_interleave(group_size)  # baseline: the group's mean
    if scale_rewards == "none":  # Dr. GRPO: no division
        return advantages
    if scale_rewards == "group":
        std = groups.std(dim=1).repeat_interleave(group_size)  # sample std (n - 1) of each group
    else:  # "batch"
        std = rewards.std()  # sample std of the whole batch
    return advantages / (std + 1e-4)'''

_EPS = 1e-4
_SCALES = ("group", "batch", "none")


def _grpo_cases():
    """(label, rewards, group_size): seeded, float32, groups with different means and spreads.

    The first has a group whose completions all got the same reward (its std is 0: only the 1e-4
    keeps the division finite) and 3 groups of 4 (so groups taken strided, or of the wrong size,
    give other numbers); the others have an odd group size and more groups than completions per group.
    """
    g = torch.Generator().manual_seed(0)
    first = torch.cat([torch.tensor([0.0, 1.0, 0.5, 1.5]), torch.ones(4), torch.rand(4, generator=g) * 2 - 0.5])
    yield "3 prompts x 4 completions, the second prompt's 4 rewards all 1.0", first, 4
    yield "4 prompts x 3 completions", torch.randn(12, generator=g) + torch.arange(4.0).repeat_interleave(3), 3
    yield "5 prompts x 2 completions", torch.rand(10, generator=g).round() + torch.rand(10, generator=g) / 4, 2


def _stats(rewards: torch.Tensor, group_size: int, unbiased: bool = True):
    groups = rewards.double().view(-1, group_size)
    centred = (groups - groups.mean(dim=1, keepdim=True)).flatten()
    group_std = groups.std(dim=1, unbiased=unbiased).repeat_interleave(group_size)
    batch_std = rewards.double().std(unbiased=unbiased)
    return centred, group_std, batch_std


def _grpo_reference(rewards: torch.Tensor, group_size: int, scale: str) -> torch.Tensor:
    from course.rlhf import grpo_advantages

    return grpo_advantages(rewards.double(), group_size, scale)


def _grpo_close(got: torch.Tensor, want: torch.Tensor) -> bool:
    # Advantages of order 1, float32 rounding ~1e-7; leaving out the 1e-4 changes them by ~1e-4.
    return close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)


def _strided(rewards: torch.Tensor, group_size: int, scale: str) -> torch.Tensor:
    """What ``rewards.view(group_size, -1)`` with statistics over dim 0 computes: groups r[j::n_groups]."""
    order = torch.arange(rewards.numel()).view(group_size, -1).t().flatten()
    out = torch.empty(rewards.numel(), dtype=torch.float64)
    out[order] = _grpo_reference(rewards[order], group_size, scale)
    return out


def _grpo_mistakes(rewards: torch.Tensor, group_size: int, scale: str):
    """(wrong advantages, message) for the usual mistakes with this ``scale``."""
    r = rewards.double()
    centred, group_std, batch_std = _stats(rewards, group_size)
    _, pop_group, pop_batch = _stats(rewards, group_size, unbiased=False)
    std, pop = (group_std, pop_group) if scale == "group" else (batch_std, pop_batch)
    n_groups = rewards.numel() // group_size
    strided = (_strided(rewards, group_size, scale),
               f"Your groups are taken strided: completions 0, {n_groups}, {2 * n_groups}, ... are treated as one "
               f"prompt's. TRL puts each prompt's completions next to each other (0..{group_size - 1} are the first "
               "prompt's), so the groups are `rewards.view(-1, group_size)`, one row per prompt, not "
               "`view(group_size, -1)`.")
    wrong_size = (_grpo_reference(rewards, n_groups, scale) if n_groups != group_size else None,
                  f"Your groups have {n_groups} completions instead of group_size={group_size}: "
                  "`rewards.view(-1, group_size)` makes one row per prompt.")
    batch_mean = r - r.mean()
    batch_mean_message = ("Your baseline is the mean of the whole batch; GRPO's baseline is the mean of the "
                          "completion's own group (the same prompt's completions): `rewards.view(-1, group_size)"
                          ".mean(dim=1)`, repeated for each completion of the group.")
    if scale == "none":
        return [
            (centred / (group_std + _EPS), "With scale_rewards=\"none\" do not divide: return the rewards minus "
                                           "their group's mean (Dr. GRPO's advantages). You always divide by the "
                                           "group's std."),
            (centred / (batch_std + _EPS), "With scale_rewards=\"none\" do not divide at all: you divide by the "
                                           "batch's std."),
            (batch_mean, batch_mean_message),
            strided, wrong_size,
        ]
    other = "batch" if scale == "group" else "group"
    mistakes = [
        (centred / (pop + _EPS), "You take the population standard deviation (dividing by n, `unbiased=False` or "
                                 "`correction=0`). TRL, like `torch.std`'s default, divides by n - 1 (Bessel's "
                                 "correction)."),
        (torch.nan_to_num(centred / std, nan=0.0, posinf=0.0, neginf=0.0),
         "You divide by the standard deviation without the epsilon (or with one far below 1e-4): TRL divides by "
         "std + 1e-4, which also keeps a group whose completions all got the same reward (std 0) at advantage 0 "
         "instead of NaN."),
        (centred / torch.sqrt(std**2 + _EPS), "The 1e-4 goes outside the square root: (r - mean) / (std + 1e-4), "
                                              "not / sqrt(variance + 1e-4)."),
        (centred, f"With scale_rewards=\"{scale}\" divide by the {scale}'s standard deviation + 1e-4: you do not "
                  "divide at all (that is \"none\")."),
        (_grpo_reference(rewards, group_size, other),
         "With scale_rewards=\"batch\" divide by the standard deviation of all the rewards (`rewards.std()`), "
         "not by each group's." if scale == "batch" else
         "With scale_rewards=\"group\" divide by each group's own standard deviation, not the whole batch's."),
        (batch_mean / (std + _EPS), batch_mean_message),
        (batch_mean / (batch_std + _EPS), batch_mean_message + (" With \"batch\" only the divisor is the batch's."
                                                                if scale == "batch" else "")),
        strided, wrong_size,
    ]
    for eps in (1e-5, 1e-3, 1e-2):  # smaller ones look like no epsilon at all
        mistakes.append((centred / (std + eps), f"You add {eps:g} to the standard deviation; TRL adds 1e-4."))
    return mistakes


def _grpo_diagnose(got: torch.Tensor, rewards: torch.Tensor, group_size: int, scale: str, label: str) -> None:
    want = _grpo_reference(rewards, group_size, scale)
    where = f"For {label}, scale_rewards=\"{scale}\""
    n, n_groups = rewards.numel(), rewards.numel() // group_size
    if tuple(got.shape) != (n,):
        if got.numel() == n and _grpo_close(got.reshape(-1), want):
            raise Failure(f"{where}: your advantages have shape {tuple(got.shape)}; return them flat like the "
                          f"rewards, shape ({n},): `.flatten()` (or `.view(-1)`) before returning.")
        if got.numel() == n_groups:
            raise Failure(f"{where}: you return {n_groups} numbers, one per prompt; return one advantage per "
                          f"completion, shape ({n},).")
        raise Failure(f"{where}: your advantages have shape {tuple(got.shape)}; want ({n},), one per completion, "
                      "flat like the rewards.")
    if not torch.isfinite(got).all() and torch.isfinite(want).all():
        raise Failure(f"{where}: some of your advantages are NaN or infinite. A group whose completions all got "
                      "the same reward has std 0: without the epsilon you divide by zero. TRL divides by "
                      "std + 1e-4, which gives that group advantage 0.")
    for wrong, message in _grpo_mistakes(rewards, group_size, scale):
        if wrong is not None and _grpo_close(got, wrong):
            raise Failure(f"{where}: {message}")
    largest = (got.double() - want).abs().max().item()
    raise Failure(f"{where}: your advantages are not TRL's (largest difference {largest:.3g}). Each completion's "
                  "advantage is its reward minus its group's mean, divided by the group's sample std + 1e-4 "
                  "(\"group\"), the whole batch's (\"batch\"), or not divided (\"none\").")


def _grpo_call(answer, rewards, group_size, *scale) -> torch.Tensor:
    out = answer(rewards.clone(), group_size, *scale)  # a copy: an answer that edits its input spoils nothing
    expect(isinstance(out, torch.Tensor), f"Your function returned a {type(out).__name__}, not a torch.Tensor. "
           "Return the advantages as a tensor, one per completion, computed with torch operations.")
    return out


@check(
    "grpo_advantages",
    hint=[
        "GRPO samples group_size completions of each prompt and judges each against its siblings: its "
        "advantage is how much better its reward is than the group's average, in units of the group's spread. "
        "In TRL's batch, the completions of one prompt are consecutive.",
        "`groups = rewards.view(-1, group_size)` has one row per prompt. Its `.mean(dim=1)` and `.std(dim=1)` "
        "(sample std, n - 1) are the group's statistics; `.repeat_interleave(group_size)` gives them back one "
        "per completion. Divide by std + 1e-4 for \"group\", by `rewards.std() + 1e-4` for \"batch\", not at "
        "all for \"none\".",
        "`advantages = rewards - groups.mean(dim=1).repeat_interleave(group_size)`; return it as is for "
        "\"none\", else `advantages / (std + 1e-4)` with `std = groups.std(dim=1).repeat_interleave(group_size)` "
        "(\"group\") or `std = rewards.std()` (\"batch\").",
    ],
    solution=_GRPO_SOLUTION,  # the solution notebook's answer replaces it once notebook 07 has the exercise
    reference="course.rlhf:grpo_advantages",
)
def grpo_advantages(answer):
    """``answer`` is ``f(rewards, group_size, scale_rewards="group") -> Tensor(n)``, TRL's GRPO advantages."""
    expect(callable(answer), f"Expected a function, got {type(answer).__name__}. Pass the function itself: "
           "check.grpo_advantages(grpo_advantages).")
    cases = list(_grpo_cases())
    label, rewards, group_size = cases[0]
    got = _grpo_call(answer, rewards, group_size, "group")
    if not _grpo_close(got, _grpo_reference(rewards, group_size, "group")):
        _grpo_diagnose(got, rewards, group_size, "group", label)
    # TRL's default is "group".
    got = _grpo_call(answer, rewards, group_size)
    expect(_grpo_close(got, _grpo_reference(rewards, group_size, "group")),
           "Called without scale_rewards your function does not scale by group: give the argument TRL's default, "
           "`scale_rewards=\"group\"`.")
    for label, rewards, group_size in cases:
        for scale in _SCALES:
            got = _grpo_call(answer, rewards, group_size, scale)
            if not _grpo_close(got, _grpo_reference(rewards, group_size, scale)):
                _grpo_diagnose(got, rewards, group_size, scale, label)
