"""check.lora_linear both ways: correct layers written differently pass, each mistake fails with its reason."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from course import check
from course.lora import LoRALinear

# ---------------------------------------------------------------------------
# Correct answers, written differently
# ---------------------------------------------------------------------------


class ParamEinsumGaussian(nn.Module):
    """A and B as nn.Parameter, einsum, Gaussian A, the base kept under another name."""

    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__()
        self.inner = base
        for p in base.parameters():
            p.requires_grad = False
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) / r)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        self.scaling = alpha / r
        self.drop = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x):
        h = self.inner(x)
        if self.merged:
            return h
        z = torch.einsum("...i,ri->...r", self.drop(x), self.lora_A)
        return h + self.scaling * torch.einsum("...r,or->...o", z, self.lora_B)

    def merge(self):
        if not self.merged:
            self.inner.weight.data += self.scaling * torch.einsum("or,ri->oi", self.lora_B, self.lora_A).detach()
            self.merged = True

    def unmerge(self):
        if self.merged:
            self.inner.weight.data -= self.scaling * torch.einsum("or,ri->oi", self.lora_B, self.lora_A).detach()
            self.merged = False


class LinearMatmulKaiming(nn.Module):
    """A and B as bias-free nn.Linear, explicit matmul in the forward, Kaiming A."""

    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / r
        self.dropout = nn.Dropout(p=dropout)
        self.merged = False

    def forward(self, x):
        if self.merged:
            return self.base_layer(x)
        return self.base_layer(x) + (self.dropout(x) @ self.lora_A.weight.T @ self.lora_B.weight.T) * self.scaling

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base_layer.weight.add_(self.scaling * self.lora_B.weight @ self.lora_A.weight)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base_layer.weight.sub_(self.scaling * self.lora_B.weight @ self.lora_A.weight)
        self.merged = False


@pytest.mark.parametrize("answer", [LoRALinear, ParamEinsumGaussian, LinearMatmulKaiming])
def test_correct_layers_pass(answer):
    result = check.lora_linear.run(answer)
    assert result.status == "passed", result.message


# ---------------------------------------------------------------------------
# Typical mistakes: each a small change to a correct layer
# ---------------------------------------------------------------------------


class NoDivideByR(LinearMatmulKaiming):
    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__(base, r, alpha, dropout)
        self.scaling = alpha


class BNotZero(LinearMatmulKaiming):
    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__(base, r, alpha, dropout)
        nn.init.normal_(self.lora_B.weight)


class AZero(LinearMatmulKaiming):
    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__(base, r, alpha, dropout)
        nn.init.zeros_(self.lora_A.weight)


class BaseTrainable(LinearMatmulKaiming):
    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__(base, r, alpha, dropout)
        base.requires_grad_(True)


class DropoutOnBase(LinearMatmulKaiming):
    def forward(self, x):
        x = self.dropout(x)
        return self.base_layer(x) + (x @ self.lora_A.weight.T @ self.lora_B.weight.T) * self.scaling


class MergeWithoutScaling(LinearMatmulKaiming):
    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base_layer.weight.add_(self.lora_B.weight @ self.lora_A.weight)
        self.merged = True


class MergeTwiceAddsTwice(LinearMatmulKaiming):
    @torch.no_grad()
    def merge(self):
        self.base_layer.weight.add_(self.scaling * self.lora_B.weight @ self.lora_A.weight)
        self.merged = True


class SquareOnly(ParamEinsumGaussian):
    """Sizes A from out_features: right only when in_features == out_features."""

    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__(base, r, alpha, dropout)
        self.lora_A = nn.Parameter(torch.randn(r, base.out_features))


class DropsBias(LinearMatmulKaiming):
    def forward(self, x):
        return x @ self.base_layer.weight.T + (self.dropout(x) @ self.lora_A.weight.T @ self.lora_B.weight.T) * self.scaling


class MergedStillAddsBranch(LinearMatmulKaiming):
    def forward(self, x):
        return self.base_layer(x) + (self.dropout(x) @ self.lora_A.weight.T @ self.lora_B.weight.T) * self.scaling


class UnmergeForgetsFlag(LinearMatmulKaiming):
    @torch.no_grad()
    def unmerge(self):
        self.base_layer.weight.sub_(self.scaling * self.lora_B.weight @ self.lora_A.weight)


class DetachedBranch(LinearMatmulKaiming):
    def forward(self, x):
        return self.base_layer(x) + (self.dropout(x) @ self.lora_A.weight.T.detach() @ self.lora_B.weight.T) * self.scaling


class DropoutAfterA(LinearMatmulKaiming):
    def forward(self, x):
        if self.merged:
            return self.base_layer(x)
        return self.base_layer(x) + (self.dropout(x @ self.lora_A.weight.T) @ self.lora_B.weight.T) * self.scaling


class HardCodedDropout(LinearMatmulKaiming):
    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__(base, r, alpha, dropout)
        self.dropout = nn.Dropout(0.5 if dropout else 0.0)


class DropoutWithoutRescaling(LinearMatmulKaiming):
    def forward(self, x):
        if self.merged:
            return self.base_layer(x)
        keep = (torch.rand_like(x) >= self.dropout.p).to(x.dtype) if self.training else 1.0
        return self.base_layer(x) + ((x * keep) @ self.lora_A.weight.T @ self.lora_B.weight.T) * self.scaling


class Only2d(ParamEinsumGaussian):
    def forward(self, x):
        h = self.inner(x)
        z = torch.einsum("bi,ri->br", self.drop(x), self.lora_A)
        return h + self.scaling * torch.einsum("br,or->bo", z, self.lora_B)


MISTAKES = [
    (Only2d, ["(batch, tokens, features)"]),
    (NoDivideByR, ["alpha / r", "divide by r"]),
    (BNotZero, ["B is not zero", "zeros"]),
    (AZero, ["A is all zeros", "never learns"]),
    (BaseTrainable, ["still trainable", "requires_grad_(False)"]),
    (DropoutOnBase, ["dropout=0.5", "LoRA branch only"]),
    (MergeWithoutScaling, ["without the scaling", "merge"]),
    (MergeTwiceAddsTwice, ["Merging twice"]),
    (SquareOnly, ["square", "in_features != out_features", "(r, in_features)"]),
    (DropsBias, ["bias is missing"]),
    (MergedStillAddsBranch, ["still adds the LoRA branch"]),
    (UnmergeForgetsFlag, ["`.merged` should be False"]),
    (DetachedBranch, ["No gradient reached A"]),
    (DropoutAfterA, ["after A (on A x)", "B(A(dropout(x)))"]),
    (HardCodedDropout, ["written into the class", "nn.Dropout(dropout)"]),
    (DropoutWithoutRescaling, ["1 / (1 - p)"]),
]


@pytest.mark.parametrize(("answer", "phrases"), MISTAKES, ids=[m[0].__name__ for m in MISTAKES])
def test_mistakes_fail_with_their_reason(answer, phrases):
    result = check.lora_linear.run(answer)
    assert result.status == "failed"
    for phrase in phrases:
        assert phrase in result.message, result.message


def test_each_mistake_has_its_own_message():
    messages = [check.lora_linear.run(answer).message for answer, _ in MISTAKES]
    assert len(set(messages)) == len(messages)


def test_not_a_class():
    result = check.lora_linear.run(42)
    assert result.status == "failed"
    assert "Expected a class" in result.message


def test_stub_is_not_attempted():
    class Stub(nn.Module):
        def __init__(self, base, r, alpha, dropout=0.0):
            super().__init__()
            raise NotImplementedError

    assert check.lora_linear.run(Stub).status == "not_attempted"


def test_check_leaves_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check.lora_linear.run(LoRALinear)
    assert torch.equal(torch.rand(3), expected)


def test_the_solution_shown_is_complete_and_passes(capsys):
    check.lora_linear.hint()
    check.lora_linear.solution()
    out = capsys.readouterr().out
    assert "alpha / r" in out and "def merge" in out
    namespace = {"math": math, "torch": torch, "nn": nn}
    exec(check.lora_linear.solution_source(), namespace)
    assert check.lora_linear.run(namespace["LoRALinear"]).status == "passed"


@pytest.mark.parametrize("name", ["count_trainable", "lora_parameter_count", "delta_weight", "lora_linear",
                                  "inject_lora"])
def test_hints_of_chapters_00_to_02_come_in_tiers(name, capsys):
    chk = getattr(check, name)
    levels = len(chk._hint)
    assert levels >= 3, f"check.{name} has {levels} hint(s); give a nudge, more, then nearly the answer"
    shown = []
    for level in range(1, levels + 1):
        chk.hint(level)
        shown.append(capsys.readouterr().out)
    assert f"Hint 1 of {levels}" in shown[0] and "hint(2)" in shown[0]
    assert len(set(shown)) == levels and "`return" not in shown[0]  # the nudge gives no code away


class ChapterTwoSpelling(nn.Module):
    """The base kept as `self.base`, the name chapter 02 used before it taught PEFT's: still correct."""

    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) / 3)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        self.scaling, self.dropout, self.merged = alpha / r, nn.Dropout(dropout), False

    def forward(self, x):
        out = self.base(x)
        return out if self.merged else out + self.scaling * self.dropout(x) @ self.lora_A.T @ self.lora_B.T

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base.weight += self.scaling * self.lora_B @ self.lora_A
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.scaling * self.lora_B @ self.lora_A
            self.merged = False


def test_the_check_finds_the_frozen_base_whatever_it_is_called():
    layer = ChapterTwoSpelling(nn.Linear(4, 3), 2, 4.0)
    assert "base" in dict(layer.named_children()) and "base_layer" not in dict(layer.named_children())
    assert check.lora_linear.run(ChapterTwoSpelling).status == "passed"


def test_the_hints_and_the_solution_use_peft_names(capsys):
    check.lora_linear.hint(2)
    check.lora_linear.hint(3)
    check.lora_linear.solution()
    out = capsys.readouterr().out
    assert "self.base_layer" in out and "get_delta_weight" in out
    assert "self.base(" not in out and "self.base." not in out and " delta_weight(" not in out
