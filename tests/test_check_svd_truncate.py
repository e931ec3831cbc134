"""check.svd_truncate both ways: correct answers written differently pass, each typical mistake fails with its reason."""

from __future__ import annotations

import pytest
import torch
from answers import checks_own_solution

from course import check
from course.merging import svd_truncate

# ---------------------------------------------------------------------------
# Correct answers, written differently
# ---------------------------------------------------------------------------


def square_root_split(delta, rank):
    """The singular values split evenly between the two factors, in float64."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    root = S[:rank].sqrt()
    return (root[:, None] * Vh[:rank]).float(), (U[:, :rank] * root).float()


def from_the_gram_matrix(delta, rank):
    """The top right singular vectors as eigenvectors of delta^T delta; B = delta V (no SVD at all)."""
    d = delta.double()
    _, vectors = torch.linalg.eigh(d.T @ d)  # ascending eigenvalues
    V = vectors[:, -rank:].flip(1)  # the largest `rank`, largest first
    return [V.T, d @ V]  # a list is as good as a tuple


def with_diag(delta, rank):
    """S as a diagonal matrix multiplied into A."""
    U, S, Vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
    return torch.diag(S[:rank]) @ Vh[:rank, :], U[:, :rank].clone()


def _fallback_solution():
    return checks_own_solution(check.svd_truncate, "svd_truncate", torch=torch)


@pytest.mark.parametrize("answer", [svd_truncate, square_root_split, from_the_gram_matrix, with_diag,
                                    _fallback_solution()],
                         ids=["reference", "square_root_split", "gram_matrix", "with_diag", "fallback_solution"])
def test_correct_answers_pass(answer):
    result = check.svd_truncate.run(answer)
    assert result.status == "passed", result.message


def test_the_reference_meets_eckart_young_on_the_checks_cases():
    """The reference the check compares with: error = norm of the dropped singular values, against torch's SVD."""
    from course.check.svd import _svd_cases

    for _, delta, rank in _svd_cases():
        A, B = svd_truncate(delta, rank)
        s = torch.linalg.svdvals(delta.double())
        error = (delta.double() - B.double() @ A.double()).norm()
        torch.testing.assert_close(error, s[rank:].norm(), rtol=1e-4, atol=1e-5)
        U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
        torch.testing.assert_close(B.double() @ A.double(), (U[:, :rank] * S[:rank]) @ Vh[:rank], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------
# Typical mistakes: each a small change to a correct answer
# ---------------------------------------------------------------------------


def _factors(delta):
    return torch.linalg.svd(delta.float(), full_matrices=False)


def smallest(delta, rank):
    U, S, Vh = _factors(delta)
    return Vh[-rank:], U[:, -rank:] * S[-rank:]


def no_singular_values(delta, rank):
    U, S, Vh = _factors(delta)
    return Vh[:rank], U[:, :rank]


def root_on_one_side(delta, rank):
    U, S, Vh = _factors(delta)
    return Vh[:rank], U[:, :rank] * S[:rank].sqrt()


def squared(delta, rank):
    U, S, Vh = _factors(delta)
    return S[:rank, None] * Vh[:rank], U[:, :rank] * S[:rank]


def b_first(delta, rank):
    U, S, Vh = _factors(delta)
    return U[:, :rank] * S[:rank], Vh[:rank]


def transposed(delta, rank):
    U, S, Vh = _factors(delta)
    return Vh[:rank].T, (U[:, :rank] * S[:rank]).T


def one_more(delta, rank):
    U, S, Vh = _factors(delta)
    return Vh[: rank + 1], U[:, : rank + 1] * S[: rank + 1]


def one_less(delta, rank):
    U, S, Vh = _factors(delta)
    return Vh[: rank - 1], U[:, : rank - 1] * S[: rank - 1]


def skips_the_largest(delta, rank):
    U, S, Vh = _factors(delta)
    return Vh[1 : rank + 1], U[:, 1 : rank + 1] * S[1 : rank + 1]


def columns_of_vh(delta, rank):
    U, S, Vh = _factors(delta)
    A = Vh[:, :rank].T
    if A.shape[1] != delta.shape[1]:  # only possible where Vh is square; elsewhere right
        A = Vh[:rank]
    return A, U[:, :rank] * S[:rank]


def no_cast(delta, rank):
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return Vh[:rank], U[:, :rank] * S[:rank]


def back_to_half(delta, rank):
    A, B = svd_truncate(delta, rank)
    return A.to(delta.dtype), B.to(delta.dtype)


def the_product(delta, rank):
    A, B = svd_truncate(delta, rank)
    return B @ A


def all_of_them(delta, rank):
    U, S, Vh = _factors(delta)
    return Vh, U * S


def in_place(delta, rank):
    A, B = svd_truncate(delta, rank)
    delta.zero_()
    return A, B


def low_rank_randomised(delta, rank):
    U, S, V = torch.svd_lowrank(delta.float(), q=rank, niter=0)
    return (V * S).T, U


@pytest.mark.parametrize(
    ("answer", "phrases"),
    [
        (smallest, ["*smallest* singular values", "[:rank]"]),
        (no_singular_values, ["lost the singular values", "S[:rank]"]),
        (root_on_one_side, ["square root of S on one side only"]),
        (squared, ["S squared"]),
        (b_first, ["you return (B, A)", "A first"]),
        (transposed, ["factors are transposed", "Vh[:rank]"]),
        (one_more, ["rank 4 instead of 3", "off-by-one"]),
        (one_less, ["rank 2 instead of 3", "off-by-one"]),
        (skips_the_largest, ["skipped the largest singular value"]),
        (columns_of_vh, ["first *columns* of Vh", "A = Vh[:rank]"]),
        (no_cast, ["in bfloat16: your function raised NotImplementedError", "no half-precision kernel", "delta.float()"]),
        (back_to_half, ["torch.bfloat16", "Keep them in float32"]),
        (the_product, ["one tensor of shape (12, 8), the product B @ A", "Return the LoRA factors (A, B)"]),
        (all_of_them, ["keep all 8 singular values", "truncate"]),
        (in_place, ["changed the delta it was given"]),
        (low_rank_randomised, ["not the best rank-3 approximation", "Eckart-Young"]),
    ],
)
def test_each_mistake_fails_with_its_own_message(answer, phrases):
    result = check.svd_truncate.run(answer)
    assert result.status == "failed", f"{answer.__name__} passed"
    for phrase in phrases:
        assert phrase in result.message, result.message


def test_a_stub_is_not_attempted():
    def stub(delta, rank):
        raise NotImplementedError()

    assert check.svd_truncate.run(stub).status == "not_attempted"


def test_the_solution_falls_back_to_the_checks_own_until_the_notebook_has_the_exercise(monkeypatch):
    from course.check import core

    monkeypatch.setattr(core, "_solutions_in_manifest", lambda: {})
    assert check.svd_truncate.solution_source().startswith("def svd_truncate(delta, rank)")
    monkeypatch.setattr(core, "_solutions_in_manifest", lambda: {"svd_truncate": "# the notebook's answer"})
    assert check.svd_truncate.solution_source() == "# the notebook's answer"
