"""Checks for notebook 05, NOLA: ``check.generate_params`` and ``check.nola_linear``.

The answer is a function ``f(coefficients, rows, cols, seed) -> Tensor(rows, cols)``, such as
``GenerateParams.apply``. It must equal ``sum_k c_k * course.nola.random_basis(K, rows, cols,
seed)[k]`` and have the exact gradient, keep no basis for backward (what autograd keeps must
not grow with rows x cols) and leave torch's global random state alone. How it gets there
(chunks or not, einsum or matmul, what it saves besides) is the learner's choice.

``check.nola_linear`` takes the learner's layer class ``C(base, r, alpha, num_basis_A, num_basis_B,
seed)`` (``course.nola.NOLALoRALinear``'s signature) and compares it with that class given the same
coefficients: ``lora_A_coefficients`` and ``lora_B_coefficients`` trainable, the base frozen, B's
coefficients zero at the start, ``A = sum_k a_k A_k / sqrt(K_A)`` and ``B = sum_k b_k B_k / sqrt(K_B)``
from the bases of ``derive_seed(seed, "lora_A")`` and ``derive_seed(seed, "lora_B")``, generated in
forward from the current coefficients, and a state dict that holds the coefficients, not the basis.
"""

from __future__ import annotations

import torch

from course.check.core import Failure, check, close, expect
from course.nola import random_basis

K, ROWS, COLS, SEED = 6, 5, 7, 1234  # rows != cols, so that a transposed layout shows
BIG = 4  # the second size is (BIG * ROWS, BIG * COLS): 16 times the numbers


def _inputs(dtype=torch.float64, k=K):
    generator = torch.Generator().manual_seed(0)  # never the global generator
    c = torch.randn(k, generator=generator, dtype=dtype)
    upstream = torch.randn(ROWS, COLS, generator=generator, dtype=dtype)
    return c, upstream


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Sums of K = 6 products of numbers below 1 in magnitude: float64 rounding is ~1e-16, and an
    # answer that computes in float32 inside is within ~1e-7. Any mistake is far above 1e-6.
    return close(a, b, rtol=1e-6, atol=1e-6)


def _call(answer, c, rows, cols, seed):
    try:
        return answer(c, rows, cols, seed)
    except NotImplementedError:
        raise NotImplementedError("forward is still a stub") from None  # reported as "not attempted"


def _check_random_state(answer) -> None:
    c, upstream = _inputs()
    before = torch.random.get_rng_state()
    out = _call(answer, c.clone().requires_grad_(), ROWS, COLS, SEED)
    changed_in = "forward" if not torch.equal(before, torch.random.get_rng_state()) else None
    if changed_in is None and isinstance(out, torch.Tensor) and out.requires_grad:
        try:
            (out * upstream).sum().backward()
        except NotImplementedError:
            raise  # a stub: reported as such
        except Exception:
            pass  # gradients are judged later, with their own messages
        if not torch.equal(before, torch.random.get_rng_state()):
            changed_in = "backward"
    expect(changed_in is None,
           f"Calling your function changed torch's global random state (in {changed_in}): "
           "`torch.manual_seed`, `torch.randint` or `uniform_` on the global generator, even if you set the "
           "seed back afterwards. The learner's own random numbers would change with every forward, and "
           "torch's generators give other numbers on other devices. `course.nola.basis_chunks` / "
           "`random_basis` compute the basis from the seed alone and never touch the global state.")


def _check_value(answer) -> None:
    c, _ = _inputs()
    out = _call(answer, c, ROWS, COLS, SEED)
    expect(isinstance(out, torch.Tensor), f"Your function returned a {type(out).__name__}, not a tensor.")
    basis = random_basis(K, ROWS, COLS, SEED, dtype=torch.float64)
    want = torch.einsum("k,kij->ij", c, basis)
    if _close(out, want):
        expect(out.dtype == c.dtype, f"Your output is {out.dtype} for {c.dtype} coefficients: keep the "
               "coefficients' dtype (generate the basis with dtype=coefficients.dtype).")
        return
    expect(tuple(out.shape) != (COLS, ROWS), f"Your output has shape {tuple(out.shape)} = (cols, rows); "
           f"it should be (rows, cols) = {(ROWS, COLS)}.")
    expect(tuple(out.shape) == (ROWS, COLS), f"Your output has shape {tuple(out.shape)}, want "
           f"(rows, cols) = {(ROWS, COLS)}: one matrix, the weighted sum of the K basis matrices.")
    swapped = torch.einsum("k,kij->ij", c, random_basis(K, COLS, ROWS, SEED, dtype=torch.float64).transpose(1, 2))
    expect(not _close(out, swapped), "Your basis matrices are generated as (cols, rows) and transposed: "
           "generate them with (num_basis, rows, cols, seed) in that order, the basis is a different one.")
    raise Failure("Your output is not sum_k c_k * basis_k with the course's basis "
                  f"course.nola.random_basis(K, rows, cols, seed) (here K={K}, rows={ROWS}, cols={COLS}). "
                  "Generate the basis with course.nola.basis_chunks (or random_basis) from the seed, not with "
                  "torch's random generators, and add each matrix times its own coefficient.")


def _gradient(answer, c, upstream, rows=ROWS, cols=COLS):
    c = c.clone().requires_grad_()
    out = _call(answer, c, rows, cols, SEED)
    expect(out.requires_grad, "The output does not depend on the coefficients for autograd: no gradient "
           "can reach them. Did the forward run under torch.no_grad() or use .detach() / .item()?")
    try:
        (out * upstream).sum().backward()
    except RuntimeError as exc:
        if "invalid gradient" in str(exc):
            raise Failure(f"Your backward returns a gradient of the wrong shape for the coefficients: {exc}. "
                          f"It must have their shape, ({len(c)},): one number per basis matrix.") from None
        raise
    expect(c.grad is not None, "No gradient reached the coefficients: backward must return it as its first "
           "value (then None for rows, cols and seed).")
    return c.grad


def _check_gradient(answer) -> None:
    c, upstream = _inputs()
    got = _gradient(answer, c, upstream)
    basis = random_basis(K, ROWS, COLS, SEED, dtype=torch.float64)
    want = basis.flatten(1) @ upstream.flatten()
    if _close(got, want):
        return
    expect(got.shape == want.shape, f"The gradient has shape {tuple(got.shape)}, want ({K},).")
    # The reference code's gradient reads the basis as (rows * cols, K): that needs the permute;
    # a bare reshape pairs each number of grad_output with numbers of other basis matrices.
    unpermuted = upstream.flatten() @ basis.reshape(-1, K)
    expect(not _close(got, unpermuted), "Wrong gradient layout: you reshaped the basis (K, rows, cols) "
           "straight to (rows * cols, K), which mixes numbers of different basis matrices. The gradient "
           "for c_k is sum_ij grad_output[i, j] * basis[k, i, j]: einsum('kij,ij->k', basis, grad_output), or "
           "basis.reshape(K, -1) @ grad_output.reshape(-1).")
    expect(not _close(got, basis.flatten(1).sum(1)), "Your backward ignores grad_output: the gradient for c_k "
           "is sum_ij grad_output[i, j] * basis[k, i, j], weighted by the gradient that arrives.")
    raise Failure("The gradient does not match your forward: backward must regenerate exactly the basis "
                  "forward used (the same seed, num_basis, rows and cols, in the same order) and give c_k the "
                  "sum of grad_output times basis matrix k. A different seed or shape in backward gives a "
                  "different basis, and the coefficients then learn from the wrong directions.")


def _saved(answer, rows, cols):
    """Numbers autograd keeps for backward: saved tensors (hooks) and tensors put on ctx."""
    c, _ = _inputs()
    c.requires_grad_()
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = _call(answer, c, rows, cols, SEED)
    grad_fn = getattr(out, "grad_fn", None)
    on_ctx = 0  # tensors stored as attributes of ctx (a custom Function's grad_fn is its ctx)
    for value in (vars(grad_fn) if hasattr(grad_fn, "__dict__") else {}).values():
        for item in value if isinstance(value, (list, tuple, dict)) else (value,):
            item = value[item] if isinstance(value, dict) else item
            if isinstance(item, torch.Tensor):
                on_ctx += item.numel()
    return sum(saved), on_ctx, isinstance(grad_fn, torch.autograd.function.BackwardCFunction)


def _check_nothing_kept(answer) -> None:
    small_saved, small_ctx, custom = _saved(answer, ROWS, COLS)
    big_saved, big_ctx, _ = _saved(answer, BIG * ROWS, BIG * COLS)
    whole = K * BIG * ROWS * BIG * COLS
    if big_saved > small_saved:
        where = ("your Function saves it with ctx.save_for_backward" if custom else
                 "plain autograd keeps every tensor an operation needs for its backward, here the basis; "
                 "write a torch.autograd.Function whose backward regenerates it")
        what = "the basis" if big_saved >= whole else "something that grows with rows x cols"
        raise Failure(f"Autograd keeps {what} for backward ({small_saved:,} numbers for a {ROWS}x{COLS} "
                      f"layer, {big_saved:,} for {BIG * ROWS}x{BIG * COLS}): {where}. Keep only the "
                      "coefficients (save_for_backward) and rows, cols, seed (plain attributes of ctx).")
    expect(big_ctx <= small_ctx, f"Your Function keeps tensors as attributes of ctx that grow with rows x cols "
           f"({small_ctx:,} numbers for {ROWS}x{COLS}, {big_ctx:,} for {BIG * ROWS}x{BIG * COLS}): the basis "
           "would stay in memory until backward. Keep only rows, cols and seed there, and regenerate the basis "
           "in backward.")


@check(
    "generate_params",
    hint=[
        "Forward: keep only what is small. `ctx.save_for_backward(coefficients)` and plain attributes "
        "`ctx.rows, ctx.cols, ctx.seed = rows, cols, seed`. Then add up the basis a chunk at a time with "
        "`course.nola.basis_chunks(len(coefficients), rows, cols, seed, device=..., dtype=...)`, which yields "
        "`(where, block)` with `block` = basis matrices `where`, shape (chunk, rows, cols).",
        "Each chunk adds `torch.einsum('k,kij->ij', coefficients[where], block)` to the output. Backward: "
        "the gradient for c_k is `sum_ij grad_output[i, j] * basis[k, i, j]`. Regenerate the same chunks "
        "(same seed, same shape) and fill `grad[where] = torch.einsum('kij,ij->k', block, grad_output)`. "
        "Return one value per input of forward: `grad, None, None, None`.",
        "```python\n"
        "out = coefficients.new_zeros(rows, cols)\n"
        "for where, block in basis_chunks(len(coefficients), rows, cols, seed,\n"
        "                                 device=coefficients.device, dtype=coefficients.dtype):\n"
        "    out += torch.einsum('k,kij->ij', coefficients[where], block)\n"
        "```\n"
        "and in backward the same loop with `grad[where] = torch.einsum('kij,ij->k', block, grad_output)`, "
        "then `return grad, None, None, None`.",
    ],
    solution=None,  # the solution notebook's answer, from the exercise manifest
    reference="course.nola:GenerateParams.apply",
)
def generate_params(answer):
    """``answer(coefficients, rows, cols, seed)`` is ``sum_k c_k basis_k`` without keeping the basis."""
    expect(callable(answer), f"Expected a function f(coefficients, rows, cols, seed), got {type(answer).__name__}. "
           "Pass GenerateParams.apply.")
    with torch.random.fork_rng():
        _check_random_state(answer)
        _check_value(answer)
        _check_gradient(answer)
        _check_nothing_kept(answer)


from course.check.nola_linear import nola_linear  # noqa: E402, F401 (re-exported)
