"""The welcome notebook's warm-up exercise: counting trainable parameters (notebook 00)."""

from __future__ import annotations

import torch
from torch import nn

from course.check.core import Failure, check, expect
from course.models import count_parameters


def _frozen_first_layer() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    model[0].requires_grad_(False)
    return model


def _tied() -> nn.Module:
    embed = nn.Embedding(11, 4)
    head = nn.Linear(4, 11, bias=False)
    head.weight = embed.weight  # one tensor used twice, as in SmolLM2
    return nn.ModuleDict({"embed": embed, "head": head})


def _cases():
    yield "nn.Linear(3, 4)", nn.Linear(3, 4)
    yield "a Sequential whose first Linear is frozen", _frozen_first_layer()
    yield "an embedding tied to the output head", _tied()


def _solution(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@check(
    "count_trainable",
    hint=[
        "Every parameter tensor has a flag `requires_grad`; count the entries of those that have it set.",
        "`model.parameters()` yields each tensor once, even one that two modules share; "
        "`p.numel()` is the number of entries of a tensor.",
        "`return sum(p.numel() for p in model.parameters() if p.requires_grad)`",
    ],
    solution=_solution,
    reference="course.models:count_trainable",
)
def count_trainable(answer):
    """``answer(model) -> int``: the number of trainable entries, each shared tensor once."""
    if not callable(answer):
        raise Failure(f"Expected a function f(model) -> int, got {type(answer).__name__}.")
    for label, model in _cases():
        got = answer(model)
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        expect(isinstance(got, int) and not isinstance(got, bool), f"For {label} your function returned {got!r} ({type(got).__name__}); return a Python int.")
        want = count_parameters(model, trainable_only=True)
        if got == want:
            continue
        everything = count_parameters(model)
        tensors = sum(1 for p in model.parameters() if p.requires_grad)
        if got == everything:
            raise Failure(f"For {label} you counted frozen parameters too ({got}, want {want}). Keep only those with `p.requires_grad`.")
        if got == tensors:
            raise Failure(f"For {label} you counted tensors ({got}), not their entries ({want}). Use `p.numel()`.")
        raise Failure(f"For {label} you returned {got}, the right count is {want}. Does a tensor shared by two modules count once?")
