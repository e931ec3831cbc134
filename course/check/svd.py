"""``check.svd_truncate`` (notebook 06): a weight change truncated to rank r by its SVD, as two factors.

Judged on changes with a known spectrum: the factors' shapes, the product equal to the best
rank-r approximation (Eckart-Young), and the typical mistakes named. Re-exported by
``course.check.merging``.
"""

from __future__ import annotations

import torch

from course import merging
from course.check.core import Failure, check, expect

# ---------------------------------------------------------------------------
# svd_truncate
# ---------------------------------------------------------------------------

#: Shown by ``check.svd_truncate.solution()`` until notebook 06 has the exercise (the manifest's answer wins).
_SVD_SOLUTION = '''\
def svd_truncate(delta, rank):
    # The best rank-`rank` approximation of delta (Eckart-Young), as LoRA factors: B @ A, A (rank, in), B (out, rank).
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)  # SVD has no half-precision kernel
    A = Vh[:rank]  # the top `rank` right singular vectors, as rows
    B = U[:, :rank] * S[:rank]  # the top left singular vectors, each times its singular value
    return A, B'''


def _with_spectrum(out: int, inp: int, spectrum, seed: int) -> torch.Tensor:
    """U diag(spectrum) V^T with seeded orthonormal U, V: singular values known and well apart."""
    generator = torch.Generator().manual_seed(seed)
    k = len(spectrum)
    U, _ = torch.linalg.qr(torch.randn(out, k, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(inp, k, generator=generator, dtype=torch.float64))
    return ((U * torch.tensor(spectrum, dtype=torch.float64)) @ V.T).float()


def _svd_cases():
    """(label, delta, rank): tall, wide, full rank, and a merge of two rank-2 LoRA changes."""
    yield "a 12 x 8 delta at rank 3", _with_spectrum(12, 8, [5.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.25], 0), 3
    yield "a 6 x 10 delta at rank 2", _with_spectrum(6, 10, [3.0, 2.5, 1.2, 0.8, 0.4, 0.1], 1), 2
    yield "a 9 x 7 delta at rank 7 (its full rank)", _with_spectrum(9, 7, [4.0, 3.0, 2.5, 2.0, 1.0, 0.6, 0.3], 2), 7
    generator = torch.Generator().manual_seed(3)
    merged = sum(w * torch.randn(10, 2, generator=generator) @ torch.randn(2, 14, generator=generator)
                 for w in (1.0, 0.6))
    yield "the merge of two rank-2 changes (10 x 14) at rank 4", merged, 4
    yield "the merge of two rank-2 changes (10 x 14) at rank 2", merged, 2


def _svd_call(answer, delta: torch.Tensor, rank: int, where: str):
    given = delta.clone()
    out = answer(given, rank)
    expect(torch.equal(given, delta), f"{where}: your function changed the delta it was given (an in-place "
           "operation). Leave it intact: compute the SVD of it, or of a copy.")
    if isinstance(out, torch.Tensor):
        shape = tuple(delta.shape)
        raise Failure(f"{where}: you return one tensor of shape {tuple(out.shape)}"
                      + (", the product B @ A" if tuple(out.shape) == shape else "")
                      + ". Return the LoRA factors (A, B): A of shape (rank, in), B of shape (out, rank), so that "
                      "B @ A approximates delta.")
    expect(isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out),
           f"{where}: return two tensors (A, B), got {type(out).__name__}"
           + (f" of {len(out)}" if isinstance(out, (tuple, list)) else "") + ".")
    return out[0].detach(), out[1].detach()


def _svd_shapes(A: torch.Tensor, B: torch.Tensor, out: int, inp: int, rank: int, where: str) -> None:
    got, want = (tuple(A.shape), tuple(B.shape)), ((rank, inp), (out, rank))
    if got == want:
        return
    if got == (want[1], want[0]):
        raise Failure(f"{where}: you return (B, A); return (A, B), A first, as PEFT's lora_A: A of shape "
                      f"(rank, in) = {want[0]}, B of shape (out, rank) = {want[1]}.")
    if got == ((inp, rank), (rank, out)):
        raise Failure(f"{where}: your factors are transposed: A is {got[0]} and B {got[1]}. A is (rank, in): the "
                      "first rows of Vh (`Vh[:rank]`, torch.linalg.svd returns V already transposed); B is "
                      "(out, rank): the first columns of U times S.")
    for other in (rank - 1, rank + 1):
        if got == ((other, inp), (out, other)):
            raise Failure(f"{where}: your factors have rank {other} instead of {rank} (A is {got[0]}): an off-by-"
                          "one in the slices. `U[:, :rank]`, `S[:rank]` and `Vh[:rank]` keep exactly rank of them.")
    if got[0][0] == min(out, inp) or got[1][-1] == min(out, inp):
        raise Failure(f"{where}: your factors keep all {min(out, inp)} singular values (A is {got[0]}, B "
                      f"{got[1]}): truncate to the first rank = {rank}.")
    raise Failure(f"{where}: A should be (rank, in) = {want[0]} and B (out, rank) = {want[1]}; yours are "
                  f"{got[0]} and {got[1]}.")


def _svd_mistakes(delta: torch.Tensor, rank: int):
    """(the product B @ A a typical mistake gives, its message), in float64."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k, r = len(S), rank
    mistakes = [
        ((U[:, -r:] * S[-r:]) @ Vh[-r:], "You kept the *smallest* singular values. torch.linalg.svd sorts them "
         "from largest to smallest: the best approximation keeps the first rank of them, `[:rank]`."),
        (U[:, :r] @ Vh[:r], "B @ A has lost the singular values: U[:, :rank] @ Vh[:rank] alone treats every "
         "direction as equally strong. Multiply B (or A) by S[:rank]: `B = U[:, :rank] * S[:rank]`."),
        ((U[:, :r] * S[:r].sqrt()) @ Vh[:r], "You multiply by the square root of S on one side only. Put S "
         "whole into one factor (`B = U[:, :rank] * S[:rank]`), or its square root into both."),
        ((U[:, :r] * S[:r] ** 2) @ Vh[:r], "S is in your product twice (S squared). Put it into one factor "
         "only, or its square root into each."),
    ]
    if r < k:
        mistakes.append(((U[:, 1:r + 1] * S[1:r + 1]) @ Vh[1:r + 1], "You skipped the largest singular value "
                         "(the slices start at 1): Python counts from 0, keep `[:rank]`."))
    if Vh.shape[1] == k:  # Vh is square: its columns have the length of its rows
        mistakes.append(((U[:, :r] * S[:r]) @ Vh[:, :r].T, "You take the first *columns* of Vh as A's rows. "
                         "torch.linalg.svd returns Vh = V transposed: its rows are the right singular vectors, "
                         "so A = Vh[:rank] (no transpose)."))
    if U.shape[0] == k:  # U is square: its rows have the length of its columns
        mistakes.append(((U[:r].T * S[:r]) @ Vh[:r], "You take the first *rows* of U as B's columns. The left "
                         "singular vectors are U's columns: B = U[:, :rank] * S[:rank]."))
    return mistakes


def _svd_judge(A, B, delta: torch.Tensor, rank: int, where: str) -> None:
    out, inp = delta.shape
    _svd_shapes(A, B, out, inp, rank, where)
    got = B.double() @ A.double()
    want_A, want_B = merging.svd_truncate(delta.double(), rank)
    want = want_B @ want_A
    scale = delta.double().norm()
    # float32 SVDs of matrices this small agree to ~1e-6 of the norm; every mistake is off by over 1e-2.
    if (got - want).norm() <= 1e-4 * scale:
        return
    for wrong, message in _svd_mistakes(delta, rank):
        if (got - wrong).norm() <= 1e-4 * scale:
            raise Failure(f"{where}: {message}")
    dropped = torch.linalg.svdvals(delta.double())[rank:].norm().item()
    error = (delta.double() - got).norm().item()
    raise Failure(f"{where}: B @ A is not the best rank-{rank} approximation. Its error ||delta - B A|| is "
                  f"{error:.4g}; the best one's is {dropped:.4g}, the norm of the singular values you drop "
                  "(Eckart-Young). Take `U, S, Vh = torch.linalg.svd(delta, full_matrices=False)` and keep the "
                  "first rank of each.")


@check(
    "svd_truncate",
    hint=[
        "Eckart-Young: the best rank-r approximation of a matrix, in the Frobenius norm, keeps its r largest "
        "singular values and their singular vectors and drops the rest; its error is the norm of the dropped "
        "singular values. torch.linalg.svd gives U, S, Vh with S sorted from largest to smallest.",
        "`U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)`. LoRA's A is (rank, in): the first "
        "rank rows of Vh. B is (out, rank): the first rank columns of U, each times its singular value. "
        "`.float()` first: there is no SVD in half precision.",
        "`A = Vh[:rank]` and `B = U[:, :rank] * S[:rank]`, then `return A, B`.",
    ],
    solution=_SVD_SOLUTION,  # the solution notebook's answer replaces it once notebook 06 has the exercise
    reference="course.merging:svd_truncate",
)
def svd_truncate(answer):
    """``answer(delta, rank) -> (A, B)``: B @ A is the best rank-``rank`` approximation of ``delta``."""
    expect(callable(answer), f"Expected a function f(delta, rank), got {type(answer).__name__}. Pass the function "
           "itself: check.svd_truncate(svd_truncate).")
    for label, delta, rank in _svd_cases():
        where = f"For {label}"
        A, B = _svd_call(answer, delta, rank, where)
        _svd_judge(A, B, delta, rank, where)
    # A merged change of a half-precision model: torch.linalg.svd has no bfloat16 or float16 kernel.
    label, delta, rank = next(iter(_svd_cases()))
    half = delta.to(torch.bfloat16)
    where = f"For {label} in bfloat16"
    try:
        A, B = _svd_call(answer, half, rank, where)
    except (NotImplementedError, RuntimeError) as exc:
        if "BFloat16" in str(exc) or "Half" in str(exc):
            raise Failure(f"{where}: your function raised {type(exc).__name__}: {exc}. torch.linalg.svd has no "
                          "half-precision kernel: compute it on `delta.float()` (and keep the factors in float32, "
                          "as adapters are kept).") from None
        raise
    expect(A.dtype not in (torch.float16, torch.bfloat16) and B.dtype not in (torch.float16, torch.bfloat16),
           f"{where}: your factors are {A.dtype} and {B.dtype}. Keep them in float32: rounding A and B back to "
           "half precision loses about three significant digits of the change (the course keeps adapters in float32).")
    _svd_judge(A, B, half.float(), rank, where)
