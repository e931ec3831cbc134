"""check.dora_linear both ways: correct layers written differently pass, each mistake fails with its reason."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import course.lora
from course import check
from course.dora import DoRALinear
from course.lora import LoRALinear

# ---------------------------------------------------------------------------
# Correct answers, written differently
# ---------------------------------------------------------------------------


class Scratch(nn.Module):
    """From scratch: nn.Parameters, einsum, `.magnitude` as a plain attribute, the norm cached
    at merge time (as PEFT does), dropout on the LoRA branch only."""

    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        self.scaling = alpha / r
        self.magnitude = nn.Parameter(self.initial_magnitude(base.weight.detach()))
        self.drop = nn.Dropout(dropout)
        self.merged = False

    def initial_magnitude(self, weight):
        return torch.sqrt((weight**2).sum(dim=1))

    def delta(self):
        return self.scaling * torch.einsum("or,ri->oi", self.lora_B, self.lora_A)

    def weight_norm(self):
        return torch.sqrt(((self.base.weight + self.delta()) ** 2).sum(dim=1)).detach()

    def forward(self, x):
        if self.merged:
            return self.base(x)
        f = self.magnitude / self.weight_norm()
        lora = torch.einsum("...r,or->...o", torch.einsum("...i,ri->...r", self.drop(x), self.lora_A), self.lora_B)
        out = f * (F.linear(x, self.base.weight) + self.scaling * lora)
        return self.add_bias(out, f)

    def add_bias(self, out, f):
        return out if self.base.bias is None else out + self.base.bias

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.cached_norm = self.weight_norm()
            V = self.base.weight + self.delta()
            self.base.weight.copy_((self.magnitude / self.cached_norm)[:, None] * V)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight.copy_(self.base.weight * (self.cached_norm / self.magnitude)[:, None] - self.delta())
            self.merged = False


class WholeWeight(LoRALinear):
    """On the course's LoRALinear, but building the whole DoRA weight in every forward."""

    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__(base, r, alpha, dropout=dropout)
        self.lora_magnitude_vector = nn.Parameter(torch.linalg.norm(base.weight.detach(), dim=-1))

    @property
    def magnitude(self):
        return self.lora_magnitude_vector

    def forward(self, x):
        if self.merged:
            return self.base_layer(x)
        V = self.base_layer.weight + self.get_delta_weight()
        W = V * (self.magnitude / torch.linalg.norm(V, dim=-1).detach()).unsqueeze(-1)
        if self.training and self.dropout.__class__ is nn.Dropout:  # dropout on the branch, as PEFT does
            extra = F.linear(self.dropout(x), W - self.base_layer.weight)
            return self.base_layer(x) + extra
        return F.linear(x, W, self.base_layer.bias)

    def merged_weight(self, weight):
        V = weight + self.get_delta_weight()
        self.kept = self.magnitude / torch.linalg.norm(V, dim=-1)
        return V * self.kept[:, None]

    def unmerged_weight(self, weight):
        return weight / self.kept[:, None] - self.get_delta_weight()


@pytest.mark.parametrize("answer", [DoRALinear, Scratch, WholeWeight])
def test_correct_layers_pass(answer):
    result = check.dora_linear.run(answer)
    assert result.status == "passed", result.message


# ---------------------------------------------------------------------------
# Typical mistakes: each a small change to a correct layer
# ---------------------------------------------------------------------------


class NormWrongDim(Scratch):
    def initial_magnitude(self, weight):
        return weight.norm(dim=0)

    def weight_norm(self):
        return (self.base.weight + self.delta()).norm(dim=0).detach()


class NormWrongDimInForward(Scratch):
    def weight_norm(self):
        return (self.base.weight + self.delta()).norm(dim=0).detach()


class MagnitudeOnes(Scratch):
    def initial_magnitude(self, weight):
        return torch.ones(weight.shape[0])


class NormNotDetached(Scratch):
    def weight_norm(self):
        return (self.base.weight + self.delta()).norm(dim=1)


class NoScalingInNorm(Scratch):
    def weight_norm(self):
        return (self.base.weight + self.delta() / self.scaling).norm(dim=1).detach()


class BiasScaled(Scratch):
    def add_bias(self, out, f):
        return out + f * self.base.bias


class UnmergeForgetsLoRA(Scratch):
    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight.copy_(self.base.weight * (self.cached_norm / self.magnitude)[:, None])
            self.merged = False


class UnmergeRecomputesNorm(Scratch):
    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            norm = self.base.weight.norm(dim=1)  # the merged weight's: all rows have norm m
            self.base.weight.copy_(self.base.weight * (norm / self.magnitude)[:, None] - self.delta())
            self.merged = False


class MergeLikeLoRA(Scratch):
    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base.weight += self.delta()
            self.merged = True


class MagnitudeFrozen(Scratch):
    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__(base, r, alpha, dropout=dropout)
        self.magnitude.requires_grad_(False)


class PlainLoRAForward(Scratch):
    def forward(self, x):
        if self.merged:
            return self.base(x)
        return self.base(x) + self.scaling * F.linear(F.linear(self.drop(x), self.lora_A), self.lora_B)


class NotNormalised(Scratch):
    def weight_norm(self):
        return torch.ones_like(self.magnitude)


class SquareOnly(Scratch):
    """B made (in_features, r): right whenever the layer is square, wrong otherwise."""

    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__(base, r, alpha, dropout=dropout)
        self.lora_B = nn.Parameter(torch.zeros(base.in_features, r))


MISTAKES = [
    (NormWrongDim, ["wrong dimension", "dim=1"]),
    (NormWrongDimInForward, ["wrong dimension", "dim=1"]),
    (MagnitudeOnes, ["starts at ones", "norm(dim=1)"]),
    (NormNotDetached, ["flow through the norm", "4.3", "detach"]),
    (NoScalingInNorm, ["misses the scaling", "||W0 + s B A||_row"]),
    (BiasScaled, ["scales the bias", "after the rescaling"]),
    (UnmergeForgetsLoRA, ["forgot the LoRA part", "Subtract s B A"]),
    (UnmergeRecomputesNorm, ["computed from the merged weight", "keep the factor"]),
    (MergeLikeLoRA, ["as LoRA does"]),
    (MagnitudeFrozen, ["not trained", "nn.Parameter"]),
    (PlainLoRAForward, ["plain LoRA", "magnitude m"]),
    (NotNormalised, ["without dividing"]),
    (LoRALinear, ["no `.magnitude`"]),
    (SquareOnly, ["square", "in_features != out_features", "dimension each shape and norm uses"]),
]


@pytest.mark.parametrize(("answer", "phrases"), MISTAKES, ids=[m[0].__name__ for m in MISTAKES])
def test_mistakes_fail_with_their_reason(answer, phrases):
    result = check.dora_linear.run(answer)
    assert result.status == "failed"
    for phrase in phrases:
        assert phrase in result.message, result.message


def test_each_mistake_has_its_own_message():
    messages = [check.dora_linear.run(answer).message for answer, _ in MISTAKES if answer is not NormWrongDimInForward]
    assert len(set(messages)) == len(messages)


def test_not_a_class():
    result = check.dora_linear.run(42)
    assert result.status == "failed" and "Expected a class" in result.message


def test_stubs_are_not_attempted_or_named():
    class Stub(LoRALinear):
        def __init__(self, base, r, alpha, dropout=0.0):
            super().__init__(base, r, alpha, dropout=dropout)
            raise NotImplementedError

    assert check.dora_linear.run(Stub).status == "not_attempted"

    class HalfDone(DoRALinear):
        def unmerged_weight(self, weight):
            raise NotImplementedError

    result = check.dora_linear.run(HalfDone)
    assert result.status == "failed" and "unmerged_weight" in result.message


def test_an_option_passed_to_the_library_class_by_position_is_named():
    class Positional(DoRALinear):
        def __init__(self, base, r, alpha, dropout=0.0):
            super().__init__(base, r, alpha, dropout)  # the library's options are keyword-only

    result = check.dora_linear.run(Positional)
    assert result.status == "failed"
    assert "super().__init__(base, r, alpha, dropout=dropout)" in result.message, result.message


def test_check_leaves_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check.dora_linear.run(DoRALinear)
    assert torch.equal(torch.rand(3), expected)


def test_the_solution_shown_is_the_notebooks_and_passes(capsys):
    for level in (1, 2, 3):
        check.dora_linear.hint(level)
    check.dora_linear.solution()
    out = capsys.readouterr().out
    assert "Hint 3 of 3" in out and "class DoRALinear(LoRALinear)" in out
    namespace = {"math": math, "torch": torch, "nn": nn, "F": F, "LoRALinear": course.lora.LoRALinear}
    exec(check.dora_linear.solution_source(), namespace)
    assert check.dora_linear.run(namespace["DoRALinear"]).status == "passed"
