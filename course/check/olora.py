"""Checks for notebook 04, OLoRA: ``check.olora_init`` and ``check.olora_to_lora``.

Both judge numbers, never spelling, against explicit formulas on seeded matrices
(``tests/test_olora.py`` shows that the formulas are what PEFT computes). A QR
decomposition is unique only up to the signs of Q's columns (and R's rows), so
``olora_init`` may return B with some columns negated together with the matching
rows of A: B A, and so the residual, are the same. ``olora_to_lora`` may order the
2r columns as it likes: only ``B @ A`` and the shapes are judged.
"""

from __future__ import annotations

import torch

from course.check.core import Failure, check, close, expect

R, SCALING = 3, 2.0  # a scaling that is not 1, so that forgetting it shows


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    # float32 QR and products of numbers of order 1 on 6 to 10 dimensions: rounding ~1e-6.
    return close(a, b, rtol=tol, atol=tol)


def _reference(W: torch.Tensor, r: int, scaling: float):
    Q, Rm = torch.linalg.qr(W.float())
    B, A = Q[:, :r], Rm[:r]
    return A, B, W.float() - scaling * B @ A


def _same_up_to_signs(A, B, A_ref, B_ref, tol: float) -> bool:
    """B = B_ref D and A = D A_ref for a diagonal D of +-1 (the freedom in a QR decomposition)."""
    if A.shape != A_ref.shape or B.shape != B_ref.shape:
        return False
    signs = torch.sign((B.float() * B_ref).sum(0))
    signs[signs == 0] = 1
    return _close(B, B_ref * signs, tol) and _close(A, signs[:, None] * A_ref, tol)


def _similar(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal up to the signs of entries: how a known mistake is recognised, whatever the QR's signs."""
    return _close(x.abs(), y.abs(), 1e-4)


def _weight(shape, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(dtype)


def _call_init(answer, W: torch.Tensor, r: int, scaling: float):
    given = W.clone()
    out = answer(given, r, scaling)
    expect(isinstance(out, (tuple, list)) and len(out) == 3,
           f"Your function returned {type(out).__name__}; return the three tensors `A, B, residual`.")
    for name, value in zip(("A", "B", "residual"), out, strict=True):
        expect(isinstance(value, torch.Tensor), f"{name} is a {type(value).__name__}, not a tensor.")
    return tuple(v.detach() for v in out)


def _check_square(answer) -> None:
    # Square, so that the typical mistakes (rows for columns, W for W^T) keep their shapes and can be named.
    W = _weight((8, 8))
    A, B, residual = _call_init(answer, W, R, SCALING)
    A_ref, B_ref, res_ref = _reference(W, R, SCALING)
    Q, Rm = torch.linalg.qr(W)
    Qt, Rt = torch.linalg.qr(W.T)
    if _similar(B, Q[:R]) or _similar(B, Q[:R].T):
        raise Failure("B holds the first r rows of Q, not its first r columns. The columns of Q are the "
                      "orthonormal directions that span W's columns: B = Q[:, :r], of shape (out_features, r).")
    if _similar(A, Rm[:, :R]) or _similar(A, Rm[:, :R].T):
        raise Failure("A holds the first r columns of R, not its first r rows. Row i of R gives the coordinates "
                      "of every column of W along Q's column i: A = R[:r], of shape (r, in_features).")
    if (_similar(A, Rt[:R]) and _similar(B, Qt[:, :R])) or (_similar(A, Qt[:, :R].T) and _similar(B, Rt[:R].T)):
        raise Failure("Your A and B come from the QR decomposition of the transposed weight, W.T. The weight of "
                      "nn.Linear is already (out_features, in_features), the shape B @ A must have: take "
                      "Q, R = torch.linalg.qr(weight) without transposing.")
    expect(tuple(A.shape) == (R, 8), f"A should be (r, in_features) = {(R, 8)}, got {tuple(A.shape)}: "
           "the first r rows of R, R[:r].")
    expect(tuple(B.shape) == (8, R), f"B should be (out_features, r) = {(8, R)}, got {tuple(B.shape)}: "
           "the first r columns of Q, Q[:, :r].")
    expect(tuple(residual.shape) == (8, 8), f"The residual should have the weight's shape (8, 8), got "
           f"{tuple(residual.shape)}.")
    expect(_close(B.T @ B, torch.eye(R), 1e-4), "The columns of B are not orthonormal (B.T @ B is not the "
           "identity): B should be the first r columns of Q from torch.linalg.qr(weight).")
    expect(_same_up_to_signs(A, B, A_ref, B_ref, 1e-4), "A and B are not the first r rows of R and the first "
           "r columns of Q of Q, R = torch.linalg.qr(weight): A = R[:r], B = Q[:, :r].")
    if _close(residual, W):
        raise Failure("The residual is the weight itself: OLoRA must change the base weight to "
                      "W - scaling * B @ A, or the layer's output at step 0 is W x + scaling * B A x, not W x.")
    if _close(residual, W - B.float() @ A.float()):
        raise Failure("The residual is W - B @ A, without the scaling. The layer adds scaling * B A x, so "
                      "subtract the same: residual = W - scaling * B @ A.")
    if _close(residual, W + SCALING * B.float() @ A.float()):
        raise Failure("The residual is W + scaling * B @ A: subtract the product, do not add it.")
    expect(_close(residual, res_ref), "The residual is not W - scaling * B @ A. With it, residual + scaling * "
           "B @ A must give the weight back, so that the model starts where it was.")


def _check_shapes(answer) -> None:
    for shape in ((10, 6), (6, 10)):  # more outputs than inputs, and fewer
        W = _weight(shape, seed=1)
        try:
            A, B, residual = _call_init(answer, W, R, SCALING)
        except Failure:
            raise
        except Exception as exc:
            raise Failure(f"Your function fails for a non-square weight of shape {shape} (out, in): "
                          f"{type(exc).__name__}: {exc}. Layers are often not square (SmolLM2's k_proj is "
                          "192 x 576).") from None
        A_ref, B_ref, res_ref = _reference(W, R, SCALING)
        expect(tuple(A.shape) == (R, shape[1]) and tuple(B.shape) == (shape[0], R),
               f"For a weight of shape {shape} (out, in) A should be {(R, shape[1])} and B {(shape[0], R)}, "
               f"got {tuple(A.shape)} and {tuple(B.shape)}.")
        expect(_same_up_to_signs(A, B, A_ref, B_ref, 1e-4) and _close(residual, res_ref),
               f"Right for a square weight but not for one of shape {shape}: use the thin QR "
               "(torch.linalg.qr's default mode), A = R[:r], B = Q[:, :r].")


def _check_half_precision(answer) -> None:
    W = _weight((8, 8), torch.bfloat16, seed=2)
    try:
        A, B, residual = _call_init(answer, W, R, SCALING)
    except Failure:
        raise
    except Exception as exc:
        raise Failure(f"Your function fails for a bfloat16 weight, as a GPU model has: {type(exc).__name__}: "
                      f"{exc}. Compute the QR in float32 (weight.float()) and cast the results back to "
                      "weight.dtype.") from None
    expect(residual.dtype == W.dtype, f"For a bfloat16 weight your residual is {residual.dtype}: it replaces "
           "the base weight, so cast it back to weight.dtype.")
    A_ref, B_ref, res_ref = _reference(W, R, SCALING)
    # bfloat16 keeps 8 significant bits: one rounding is a relative error up to 2^-8.
    expect(_same_up_to_signs(A, B, A_ref, B_ref, 1e-2) and _close(residual, res_ref, 2e-2),
           "For a bfloat16 weight your A, B or residual differ from the float32 computation by more than "
           "bfloat16's rounding: compute the QR in float32, then cast back.")


@check(
    "olora_init",
    hint=[
        "`Q, R = torch.linalg.qr(weight.float())`. Which part of Q has the shape (out_features, r), and which "
        "part of R has the shape (r, in_features)?",
        "B is the first r columns of Q, A the first r rows of R. OLoRA then changes the base weight so that "
        "the layer starts as it was: the residual plus scaling * B @ A must be the weight.",
        "`Q, R = torch.linalg.qr(weight.float())`; `B, A = Q[:, :r], R[:r]`; "
        "`residual = weight.float() - scaling * B @ A`; return all three `.to(weight.dtype)`.",
    ],
    solution=None,
    reference="course.olora:olora_init",
)
def olora_init(answer):
    """``answer(weight, r, scaling) -> (A, B, residual)`` as PEFT's ``init_lora_weights="olora"``."""
    _check_square(answer)
    _check_shapes(answer)
    _check_half_precision(answer)


def _adapters(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    r, n_in, n_out = R, 7, 5
    A0, B0 = torch.randn(r, n_in, generator=generator), torch.randn(n_out, r, generator=generator)
    A1 = A0 + 0.5 * torch.randn(r, n_in, generator=generator)
    B1 = B0 + 0.5 * torch.randn(n_out, r, generator=generator)
    return A0, B0, A1, B1


@check(
    "olora_to_lora",
    hint=[
        "The trained layer computes (W_res + s B1 A1) x and W_res = W - s B0 A0. Write it as W plus something: "
        "that something is the plain LoRA adapter's s B A.",
        "B @ A must be B1 @ A1 - B0 @ A0, a sum of two rank-r products. A block product does that: "
        "[B1 | -B0] @ [A1 ; A0] = B1 A1 - B0 A0.",
        "`A = torch.cat([A1, A0], dim=0)` (2r, in), `B = torch.cat([B1, -B0], dim=1)` (out, 2r).",
    ],
    solution=None,
    reference="course.olora:olora_to_lora",
)
def olora_to_lora(answer):
    """``answer(A0, B0, A1, B1) -> (A, B)`` with ``B @ A == B1 @ A1 - B0 @ A0`` and rank 2r."""
    A0, B0, A1, B1 = _adapters()
    given = [t.clone() for t in (A0, B0, A1, B1)]
    out = answer(*given)
    for name, before, after in zip(("A0", "B0", "A1", "B1"), (A0, B0, A1, B1), given, strict=True):
        expect(torch.equal(before, after), f"Your function changed its argument {name} in place (e.g. "
               "`.neg_()`, `-=`): the initial and trained adapters are still needed elsewhere. Build new "
               "tensors, e.g. with torch.cat.")
    expect(isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out),
           f"Your function returned {type(out).__name__}; return the two tensors `A, B`.")
    A, B = (t.detach() for t in out)
    r, n_in, n_out = A0.shape[0], A0.shape[1], B0.shape[0]
    if (A.dim() == 2 and A.shape[0] == r) or (B.dim() == 2 and B.shape[1] == r):
        raise Failure(f"Your adapter has rank r = {r}; it needs 2r = {2 * r}. B1 A1 - B0 A0 is the difference of "
                      "two rank-r matrices, of rank up to 2r, so no rank-r pair can hold it (and "
                      "(B1 - B0)(A1 - A0) is not B1 A1 - B0 A0). Stack the two adapters instead.")
    expect(tuple(A.shape) == (2 * r, n_in) and tuple(B.shape) == (n_out, 2 * r),
           f"A should be (2r, in) = {(2 * r, n_in)} and B (out, 2r) = {(n_out, 2 * r)}; got {tuple(A.shape)} and "
           f"{tuple(B.shape)}. Stack A1 and A0 along rows (dim=0), B1 and -B0 along columns (dim=1).")
    product = B.float() @ A.float()
    trained, initial = B1 @ A1, B0 @ A0
    if _close(product, trained - initial, 1e-4):
        return
    if _close(product, trained + initial, 1e-4):
        raise Failure("B @ A is B1 A1 + B0 A0: the initial adapter is added, not taken away. OLoRA subtracted "
                      "s B0 A0 from the base weight, so the plain adapter must subtract it too: negate B0 "
                      "(or A0), not both.")
    if _close(product, initial - trained, 1e-4):
        raise Failure("B @ A is B0 A0 - B1 A1, the opposite of the change training made: the initial and trained "
                      "adapters are swapped. The change is trained minus initial: B1 A1 - B0 A0.")
    if _close(product, trained, 1e-4):
        raise Failure("B @ A is B1 A1 alone: the initial adapter B0 A0 is missing, but on the "
                      "original weights it must be taken away (W_res = W - s B0 A0).")
    raise Failure("B @ A should equal B1 @ A1 - B0 @ A0 (the change training made on top of the original weight).")
