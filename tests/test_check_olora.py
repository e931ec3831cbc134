"""check.olora_init and check.olora_to_lora both ways: correct answers written differently pass,
each typical mistake fails with its own reason, a stub is "not attempted"."""

from __future__ import annotations

import pytest
import torch

from course import check
from course.olora import olora_init, olora_to_lora

# ---------------------------------------------------------------------------
# olora_init: correct answers
# ---------------------------------------------------------------------------


def gram_schmidt_init(weight, r, scaling):
    """Another correct answer: its own QR by Gram-Schmidt (R's diagonal positive, so some of B's
    columns and A's rows have the opposite sign to torch.linalg.qr's), in float64."""
    W = weight.double()
    columns = []
    for j in range(r):
        v = W[:, j].clone()
        for q in columns:
            v -= (q @ W[:, j]) * q
        columns.append(v / v.norm())
    B = torch.stack(columns, dim=1)
    A = B.T @ W  # = R[:r]: Q^T W
    residual = W - scaling * torch.einsum("or,ri->oi", B, A)
    return A.float(), B.float(), residual.to(weight.dtype)


def float32_factors_init(weight, r, scaling):
    """Correct too: A and B left in float32 (only the residual must have the weight's dtype)."""
    Q, R = torch.linalg.qr(weight.float(), mode="reduced")
    A, B = R[:r], Q[:, :r]
    return A, B, (weight.float() - scaling * (B @ A)).to(weight.dtype)


@pytest.mark.parametrize("answer", [olora_init, gram_schmidt_init, float32_factors_init])
def test_correct_olora_init_passes(answer):
    result = check.olora_init.run(answer)
    assert result.status == "passed", result.message


def test_gram_schmidt_really_differs_in_signs():
    # Otherwise the test above would not show that the check allows the sign freedom of QR.
    W = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    A, B, _ = olora_init(W, 3, 2.0)
    A2, B2, _ = gram_schmidt_init(W, 3, 2.0)
    assert not torch.allclose(B, B2, atol=1e-4)
    torch.testing.assert_close(B @ A, B2 @ A2, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# olora_init: typical mistakes
# ---------------------------------------------------------------------------


def _qr(weight):
    return torch.linalg.qr(weight.float())


def rows_of_q(weight, r, scaling):
    Q, R = _qr(weight)
    B, A = Q[:r].T, R[:r]
    return A, B, (weight.float() - scaling * B @ A).to(weight.dtype)


def rows_of_q_untransposed(weight, r, scaling):
    Q, R = _qr(weight)
    B, A = Q[:r], R[:r]
    return A, B, weight.clone()


def columns_of_r(weight, r, scaling):
    Q, R = _qr(weight)
    B, A = Q[:, :r], R[:, :r].T
    return A, B, (weight.float() - scaling * B @ A).to(weight.dtype)


def not_mutated(weight, r, scaling):
    Q, R = _qr(weight)
    return R[:r], Q[:, :r], weight.clone()


def no_scaling(weight, r, scaling):
    Q, R = _qr(weight)
    B, A = Q[:, :r], R[:r]
    return A, B, (weight.float() - B @ A).to(weight.dtype)


def transposed_weight(weight, r, scaling):
    Q, R = _qr(weight.T)
    B, A = Q[:, :r], R[:r]
    return A, B, (weight.float() - scaling * B @ A).to(weight.dtype)


def qr_in_weight_dtype(weight, r, scaling):
    Q, R = torch.linalg.qr(weight)  # fails for bfloat16 and float16 weights
    B, A = Q[:, :r], R[:r]
    return A, B, weight - scaling * B @ A


def residual_left_in_float32(weight, r, scaling):
    Q, R = _qr(weight)
    B, A = Q[:, :r], R[:r]
    return A, B, weight.float() - scaling * B @ A


MISTAKES = {
    rows_of_q: "first r rows of Q",
    rows_of_q_untransposed: "first r rows of Q",
    columns_of_r: "first r columns of R",
    not_mutated: "residual is the weight itself",
    no_scaling: "without the scaling",
    transposed_weight: "transposed weight",
    qr_in_weight_dtype: "Compute the QR in float32",
    residual_left_in_float32: "cast it back to weight.dtype",
}


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.__name__ for m in MISTAKES])
def test_olora_init_mistake_fails_with_its_reason(mistake):
    result = check.olora_init.run(mistake)
    assert result.status == "failed"
    assert MISTAKES[mistake] in result.message, result.message


def test_olora_init_messages_are_distinct():
    messages = {check.olora_init.run(m).message for m in MISTAKES if m is not rows_of_q_untransposed}
    assert len(messages) == len(MISTAKES) - 1


def test_olora_init_stub_is_not_attempted():
    def stub(weight, r, scaling):
        raise NotImplementedError

    assert check.olora_init.run(stub).status == "not_attempted"


# ---------------------------------------------------------------------------
# olora_to_lora
# ---------------------------------------------------------------------------


def negated_a_first(A0, B0, A1, B1):
    """Correct too: the initial adapter first, with A0 negated instead of B0."""
    return torch.cat([-A0, A1]), torch.cat([B0, B1], dim=1)


def by_hand(A0, B0, A1, B1):
    r = A0.shape[0]
    A = A0.new_empty(2 * r, A0.shape[1])
    B = B0.new_empty(B0.shape[0], 2 * r)
    A[:r], A[r:] = A1, A0
    B[:, :r], B[:, r:] = B1, B0 * -1
    return A, B


@pytest.mark.parametrize("answer", [olora_to_lora, negated_a_first, by_hand])
def test_correct_olora_to_lora_passes(answer):
    result = check.olora_to_lora.run(answer)
    assert result.status == "passed", result.message


def not_negated(A0, B0, A1, B1):
    return torch.cat([A1, A0]), torch.cat([B1, B0], dim=1)


def swapped(A0, B0, A1, B1):
    return torch.cat([A0, A1]), torch.cat([B0, -B1], dim=1)


def rank_not_doubled(A0, B0, A1, B1):
    return A1 - A0, B1 - B0


def trained_only(A0, B0, A1, B1):
    return torch.cat([A1, torch.zeros_like(A0)]), torch.cat([B1, B0], dim=1)


def negates_in_place(A0, B0, A1, B1):
    return torch.cat([A1, A0]), torch.cat([B1, B0.neg_()], dim=1)


TO_LORA_MISTAKES = {
    not_negated: "not taken away",
    swapped: "swapped",
    rank_not_doubled: "needs 2r",
    trained_only: "B0 A0 is missing",
    negates_in_place: "in place",
}


@pytest.mark.parametrize("mistake", TO_LORA_MISTAKES, ids=[m.__name__ for m in TO_LORA_MISTAKES])
def test_olora_to_lora_mistake_fails_with_its_reason(mistake):
    result = check.olora_to_lora.run(mistake)
    assert result.status == "failed"
    assert TO_LORA_MISTAKES[mistake] in result.message, result.message


def test_olora_to_lora_stub_is_not_attempted():
    def stub(A0, B0, A1, B1):
        raise NotImplementedError

    assert check.olora_to_lora.run(stub).status == "not_attempted"
