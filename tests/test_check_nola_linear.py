"""check.nola_linear both ways: correct layers written differently pass, each typical mistake fails with its reason."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from answers import checks_own_solution
from torch import nn

from course import check
from course.lora import LoRALinear
from course.nola import GenerateParams, NOLALoRALinear, derive_seed, random_basis

# ---------------------------------------------------------------------------
# Correct answers, written differently
# ---------------------------------------------------------------------------


class OnLoRALinear(LoRALinear):
    """A subclass of chapter 02's layer overriding its two hooks; plain autograd through random_basis."""

    def __init__(self, base, r, alpha, num_basis_A, num_basis_B, seed, dropout=0.0):
        self.num_basis_A, self.num_basis_B = num_basis_A, num_basis_B
        self.seed_A, self.seed_B = derive_seed(seed, "lora_A"), derive_seed(seed, "lora_B")
        super().__init__(base, r, alpha, dropout=dropout)

    def init_factors(self):
        self.lora_A_coefficients = nn.Parameter(torch.randn(self.num_basis_A) / 10)
        self.lora_B_coefficients = nn.Parameter(torch.zeros(self.num_basis_B))

    def compute_dtype(self):
        return self.lora_A_coefficients.dtype

    def lora_factors(self):
        base = self.base_layer
        A = torch.einsum("k,kij->ij", self.lora_A_coefficients,
                         random_basis(self.num_basis_A, self.r, base.in_features, self.seed_A))
        B = torch.einsum("k,kij->ij", self.lora_B_coefficients,
                         random_basis(self.num_basis_B, base.out_features, self.r, self.seed_B))
        return A / self.num_basis_A**0.5, B / self.num_basis_B**0.5


class WithSeedBuffer(nn.Module):
    """Keyword-friendly names, the two seeds kept as a small buffer, F.linear, the scaling folded into B."""

    def __init__(self, base_layer, rank, lora_alpha, k_a, k_b, seed):
        super().__init__()
        base_layer.weight.requires_grad = False
        base_layer.bias.requires_grad = False
        self.base = base_layer
        self.rank, self.factor = rank, lora_alpha / rank
        self.register_buffer("seeds", torch.tensor([derive_seed(seed, "lora_A"), derive_seed(seed, "lora_B")]))
        self.lora_A_coefficients = nn.Parameter(torch.rand(k_a) * 2 - 1)
        self.lora_B_coefficients = nn.Parameter(torch.zeros(k_b))

    def forward(self, x):
        a, b = self.lora_A_coefficients, self.lora_B_coefficients
        A = GenerateParams.apply(a, self.rank, self.base.in_features, int(self.seeds[0])) * len(a) ** -0.5
        B = GenerateParams.apply(b, self.base.out_features, self.rank, int(self.seeds[1])) / math.sqrt(len(b))
        return self.base(x) + F.linear(F.linear(x, A), B * self.factor)


def _fallback_solution():
    return checks_own_solution(check.nola_linear, "NOLALoRALinear", torch=torch, nn=nn, math=math, GenerateParams=GenerateParams, derive_seed=derive_seed)


@pytest.mark.parametrize("answer", [NOLALoRALinear, OnLoRALinear, WithSeedBuffer, _fallback_solution()],
                         ids=["reference", "on_lora_linear", "with_seed_buffer", "fallback_solution"])
def test_correct_answers_pass(answer):
    result = check.nola_linear.run(answer)
    assert result.status == "passed", result.message


# ---------------------------------------------------------------------------
# Typical mistakes: each a small change to a correct layer
# ---------------------------------------------------------------------------


def _variant(*, divide_A=True, divide_B=True, by_k=False, swap_use=False, swap_seeds=False, same_seed=False,
             transposed=False, scaling="alpha/r", bias=True, freeze_base=True, coefficients="parameter",
             swap_init=False, swap_sizes=False, basis="generated", detach=False, once=False, zero_A=False):
    changes = {key: value for key, value in locals().items() if value != _DEFAULTS[key]}

    class Variant(nn.Module):
        def __init__(self, base, r, alpha, num_basis_A, num_basis_B, seed):
            super().__init__()
            self.base_layer = base.requires_grad_(False) if freeze_base else base
            self.r, self.kA, self.kB = r, num_basis_A, num_basis_B
            self.scaling = {"alpha/r": alpha / r, "alpha": alpha, "none": 1.0}[scaling]
            self.seed_A, self.seed_B = derive_seed(seed, "lora_A"), derive_seed(seed, "lora_B")
            if swap_seeds:
                self.seed_A, self.seed_B = self.seed_B, self.seed_A
            if same_seed:
                self.seed_A = self.seed_B = seed
            kA, kB = (num_basis_B, num_basis_A) if swap_sizes else (num_basis_A, num_basis_B)
            a = torch.zeros(kA) if zero_A or swap_init else torch.randn(kA) / 5
            b = torch.randn(kB) / 5 if swap_init else torch.zeros(kB)
            if coefficients == "parameter":
                self.lora_A_coefficients, self.lora_B_coefficients = nn.Parameter(a), nn.Parameter(b)
            elif coefficients == "frozen":
                self.lora_A_coefficients = nn.Parameter(a, requires_grad=False)
                self.lora_B_coefficients = nn.Parameter(b, requires_grad=False)
            else:
                self.register_buffer("lora_A_coefficients", a)
                self.register_buffer("lora_B_coefficients", b)
            if basis == "buffer":
                self.register_buffer("basis_A", random_basis(num_basis_A, r, base.in_features, self.seed_A))
                self.register_buffer("basis_B", random_basis(num_basis_B, base.out_features, r, self.seed_B))
            elif basis == "parameter":
                self.basis_A = nn.Parameter(random_basis(num_basis_A, r, base.in_features, self.seed_A))
                self.basis_B = nn.Parameter(random_basis(num_basis_B, base.out_features, r, self.seed_B))
            elif basis == "frozen parameter":
                self.basis_A = nn.Parameter(random_basis(num_basis_A, r, base.in_features, self.seed_A), False)
                self.basis_B = nn.Parameter(random_basis(num_basis_B, base.out_features, r, self.seed_B), False)
            self.cached = self.factors() if once else None

        def factors(self):
            base = self.base_layer
            a, b = self.lora_A_coefficients, self.lora_B_coefficients
            if swap_use:
                a, b = b, a
            if transposed:
                A = GenerateParams.apply(a, base.in_features, self.r, self.seed_A).T
                B = GenerateParams.apply(b, self.r, base.out_features, self.seed_B).T
            else:
                A = GenerateParams.apply(a, self.r, base.in_features, self.seed_A)
                B = GenerateParams.apply(b, base.out_features, self.r, self.seed_B)
            power = 1.0 if by_k else 0.5
            if divide_A:
                A = A / len(a) ** power
            if divide_B:
                B = B / len(b) ** power
            return (A.detach(), B.detach()) if detach or once else (A, B)

        def forward(self, x):
            A, B = self.cached if once else self.factors()
            W = self.base_layer.weight
            base = self.base_layer(x) if bias else x @ W.T
            return base + self.scaling * (x @ A.T @ B.T)

    Variant.__name__ = Variant.__qualname__ = "_".join(f"{k}={v}" for k, v in changes.items()) or "right"
    return Variant


_DEFAULTS = {"divide_A": True, "divide_B": True, "by_k": False, "swap_use": False, "swap_seeds": False,
             "same_seed": False, "transposed": False, "scaling": "alpha/r", "bias": True, "freeze_base": True,
             "coefficients": "parameter", "swap_init": False, "swap_sizes": False, "basis": "generated",
             "detach": False, "once": False, "zero_A": False}


@pytest.mark.parametrize(
    ("answer", "phrases"),
    [
        (_variant(basis="buffer"), ["state dict holds", "basis_A (5, 2, 6)", "plain ints"]),
        (_variant(basis="frozen parameter"), ["state dict holds", "stored as a parameter or buffer"]),
        (_variant(basis="parameter"), ["`basis_A` (shape (5, 2, 6)) is trainable", "stored as a parameter"]),
        (_variant(divide_A=False, divide_B=False), ["not divided by sqrt(K)", "1/sqrt(num_basis_A)"]),
        (_variant(divide_A=False), ["A is not divided by sqrt(num_basis_A)"]),
        (_variant(divide_B=False), ["B is not divided by sqrt(num_basis_B)"]),
        (_variant(by_k=True), ["divide A and B by K; divide by sqrt(K)"]),
        (_variant(coefficients="frozen"), ["The coefficients of A and B are frozen", "nn.Parameter"]),
        (_variant(coefficients="buffer"), ["not an nn.Parameter", "coefficients stay frozen"]),
        (_variant(swap_use=True), ["A and B are swapped", "mixed from `lora_B_coefficients`"]),
        (_variant(swap_sizes=True), ["has 7 numbers", "A and B are swapped"]),
        (_variant(swap_init=True), ["the other way round", "B's coefficients start at zero"]),
        (_variant(zero_A=True), ["A's coefficients are all zero", "never learns"]),
        (_variant(swap_seeds=True), ["seeds of A and B are swapped", "derive_seed(seed, 'lora_A')"]),
        (_variant(same_seed=True), ["from `seed` itself", "derive_seed(seed, 'lora_B')"]),
        (_variant(transposed=True), ["generated transposed", "(r, in_features)"]),
        (_variant(scaling="alpha"), ["scaled by alpha; the scaling is alpha / r"]),
        (_variant(scaling="none"), ["not scaled"]),
        (_variant(bias=False), ["bias is missing"]),
        (_variant(freeze_base=False), ["base layer is still trainable", "requires_grad_(False)"]),
        (_variant(once=True), ["did not", "Generate them in forward, on every call"]),
        (_variant(detach=True), ["does not depend on the coefficients for autograd"]),
    ],
)
def test_each_mistake_fails_with_its_own_message(answer, phrases):
    result = check.nola_linear.run(answer)
    assert result.status == "failed", "the mistake passed"
    for phrase in phrases:
        assert phrase in result.message, result.message


def test_the_basis_from_torchs_generator_fails_with_the_general_message():
    class TorchRandom(_variant()):
        def factors(self):
            base = self.base_layer
            g = torch.Generator().manual_seed(self.seed_A)
            A = torch.einsum("k,kij->ij", self.lora_A_coefficients,
                             torch.rand(self.kA, self.r, base.in_features, generator=g) * 2 - 1) / self.kA**0.5
            g = torch.Generator().manual_seed(self.seed_B)
            B = torch.einsum("k,kij->ij", self.lora_B_coefficients,
                             torch.rand(self.kB, base.out_features, self.r, generator=g) * 2 - 1) / self.kB**0.5
            return A, B

    result = check.nola_linear.run(TorchRandom)
    assert result.status == "failed" and "never with torch's random generators" in result.message, result.message


def test_a_stub_is_not_attempted():
    class Stub(nn.Module):
        def __init__(self, base, r, alpha, num_basis_A, num_basis_B, seed):
            raise NotImplementedError()

    assert check.nola_linear.run(Stub).status == "not_attempted"


def test_a_stub_forward_is_named():
    class StubForward(_variant()):
        def forward(self, x):
            raise NotImplementedError()

    result = check.nola_linear.run(StubForward)
    assert result.status == "failed" and "forward` still raises NotImplementedError" in result.message, result.message


def test_the_solution_falls_back_to_the_checks_own_until_the_notebook_has_the_exercise(monkeypatch):
    from course.check import core

    monkeypatch.setattr(core, "_solutions_in_manifest", lambda: {})
    assert check.nola_linear.solution_source().startswith("class NOLALoRALinear(nn.Module):")
    monkeypatch.setattr(core, "_solutions_in_manifest", lambda: {"nola_linear": "# the notebook's answer"})
    assert check.nola_linear.solution_source() == "# the notebook's answer"
