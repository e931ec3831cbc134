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

import copy
import math

import torch
from torch import nn

from course.check.core import Failure, check, expect
from course.nola import derive_seed, random_basis

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
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-6)


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


# ---------------------------------------------------------------------------
# check.nola_linear
# ---------------------------------------------------------------------------

#: Shown by ``check.nola_linear.solution()`` until notebook 05 has the exercise (the manifest's answer wins).
_NOLA_LINEAR_SOLUTION = """\
class NOLALoRALinear(nn.Module):
    # LoRA whose A and B are mixed from a seeded random basis; only the mixing coefficients train.

    def __init__(self, base, r, alpha, num_basis_A, num_basis_B, seed, dropout=0.0):
        super().__init__()
        self.base_layer = base.requires_grad_(False)  # W0 stays frozen
        self.r, self.scaling = r, alpha / r
        self.num_basis_A, self.num_basis_B = num_basis_A, num_basis_B
        # Plain ints, not tensors: the state dict holds only the coefficients (and the base layer).
        self.seed_A, self.seed_B = derive_seed(seed, "lora_A"), derive_seed(seed, "lora_B")
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        # A's coefficients random (A's entries then have the variance of LoRA's Kaiming-uniform A), B's zero:
        # the layer starts as the base layer and can learn.
        bound = math.sqrt(3 / base.in_features)
        self.lora_A_coefficients = nn.Parameter(torch.empty(num_basis_A, **like).uniform_(-bound, bound))
        self.lora_B_coefficients = nn.Parameter(torch.zeros(num_basis_B, **like))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        base = self.base_layer
        # Generated on every call from the current coefficients; the basis is never kept.
        A = GenerateParams.apply(self.lora_A_coefficients, self.r, base.in_features, self.seed_A)
        B = GenerateParams.apply(self.lora_B_coefficients, base.out_features, self.r, self.seed_B)
        A, B = A / math.sqrt(self.num_basis_A), B / math.sqrt(self.num_basis_B)  # 1/sqrt(K), as the authors' code
        return base(x) + self.scaling * (self.dropout(x) @ A.T @ B.T)"""

NL_IN, NL_OUT, NL_R, NL_ALPHA = 6, 9, 2, 6.0  # scaling alpha / r = 3
NL_KA, NL_KB, NL_SEED = 5, 7, 1234  # K_A != K_B: coefficients of A and B cannot be mistaken for each other


def _nl_base(seed: int = 0) -> nn.Linear:
    generator = torch.Generator().manual_seed(seed)
    base = nn.Linear(NL_IN, NL_OUT)
    with torch.no_grad():
        base.weight.copy_(torch.randn(NL_OUT, NL_IN, generator=generator) / 3)
        base.bias.copy_(torch.randn(NL_OUT, generator=generator))
    return base


def _nl_coefficient(layer, name: str, size: int, other: str, other_size: int) -> nn.Parameter:
    expect(hasattr(layer, name), f"Your layer has no `.{name}`. Name the trained vectors `lora_A_coefficients` "
           f"({NL_KA} numbers here, one per basis matrix of A) and `lora_B_coefficients` ({NL_KB}): the course's "
           "names, which `mark_only_lora_as_trainable` and `save_nola` rely on.")
    value = getattr(layer, name)
    expect(isinstance(value, torch.Tensor), f"`{name}` is a {type(value).__name__}; make it an nn.Parameter "
           "vector, one number per basis matrix.")
    if not isinstance(value, nn.Parameter):
        raise Failure(f"`{name}` is a plain tensor (or a buffer), not an nn.Parameter: the optimiser would never "
                      "see it, so the coefficients stay frozen. Wrap it: `nn.Parameter(...)`.")
    if tuple(value.shape) == (other_size,) and other_size != size:
        raise Failure(f"`{name}` has {other_size} numbers, the number of basis matrices of "
                      f"{other.split('_')[1]} (num_basis_{other.split('_')[1]}): A and B are swapped. A has "
                      f"num_basis_A = {NL_KA} coefficients, B has num_basis_B = {NL_KB}.")
    expect(tuple(value.shape) == (size,), f"`{name}` has shape {tuple(value.shape)}; it should be ({size},), one "
           "number per basis matrix.")
    return value


def _nl_parts(layer):
    a = _nl_coefficient(layer, "lora_A_coefficients", NL_KA, "lora_B_coefficients", NL_KB)
    b = _nl_coefficient(layer, "lora_B_coefficients", NL_KB, "lora_A_coefficients", NL_KA)
    return a, b


def _nl_reference(base: nn.Linear, a: torch.Tensor, b: torch.Tensor):
    from course.nola import NOLALoRALinear

    reference = NOLALoRALinear(copy.deepcopy(base), NL_R, NL_ALPHA, num_basis_A=NL_KA, num_basis_B=NL_KB, seed=NL_SEED)
    with torch.no_grad():
        reference.lora_A_coefficients.copy_(a)
        reference.lora_B_coefficients.copy_(b)
    return reference


def _nl_input() -> torch.Tensor:
    return torch.randn(2, 3, NL_IN, generator=torch.Generator().manual_seed(5))  # (batch, tokens, features)


def _nl_mix(c, rows, cols, seed) -> torch.Tensor:
    return torch.einsum("k,kij->ij", c.double(), random_basis(len(c), rows, cols, seed, dtype=torch.float64))


def _nl_mistakes(base: nn.Linear, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor):
    """(output of a typical mistake, message) in float64."""
    seed_A, seed_B = derive_seed(NL_SEED, "lora_A"), derive_seed(NL_SEED, "lora_B")
    rA, rB = math.sqrt(NL_KA), math.sqrt(NL_KB)
    x, W0, b0 = x.double(), base.weight.detach().double(), base.bias.detach().double()
    scaling = NL_ALPHA / NL_R

    def out(A, B, s=scaling, bias=True):
        return x @ W0.T + (b0 if bias else 0) + s * (x @ A.T @ B.T)

    A, B = _nl_mix(a, NL_R, NL_IN, seed_A) / rA, _nl_mix(b, NL_OUT, NL_R, seed_B) / rB
    generate = ("Generate A from `lora_A_coefficients` with the seed derive_seed(seed, 'lora_A') and B from "
                "`lora_B_coefficients` with derive_seed(seed, 'lora_B')")
    return [
        (out(A * rA, B * rB), "A and B are not divided by sqrt(K): NOLA's layer (course.nola.NOLALoRALinear, like the "
         "GenerateParams of the authors' training code) scales A by 1/sqrt(num_basis_A) and B by 1/sqrt(num_basis_B), so that "
         "the size of A and B, and of one optimiser step's change to them, does not grow with K."),
        (out(A * rA, B), "B is divided by sqrt(num_basis_B) but A is not divided by sqrt(num_basis_A)."),
        (out(A, B * rB), "A is divided by sqrt(num_basis_A) but B is not divided by sqrt(num_basis_B)."),
        (out(A / rA, B / rB), "You divide A and B by K; divide by sqrt(K): A by sqrt(num_basis_A), B by "
         "sqrt(num_basis_B)."),
        (out(_nl_mix(b, NL_R, NL_IN, seed_A) / rB, _nl_mix(a, NL_OUT, NL_R, seed_B) / rA),
         "A and B are swapped: your A is mixed from `lora_B_coefficients` and B from `lora_A_coefficients`. "
         + generate + "."),
        (out(_nl_mix(a, NL_R, NL_IN, seed_B) / rA, _nl_mix(b, NL_OUT, NL_R, seed_A) / rB),
         "The seeds of A and B are swapped. " + generate + "."),
        (out(_nl_mix(a, NL_R, NL_IN, NL_SEED) / rA, _nl_mix(b, NL_OUT, NL_R, NL_SEED) / rB),
         "You generate both bases from `seed` itself. " + generate + " (different seeds: A's and B's bases must "
         "be unrelated)."),
        (out(_nl_mix(a, NL_IN, NL_R, seed_A).T / rA, _nl_mix(b, NL_R, NL_OUT, seed_B).T / rB),
         "Your basis matrices are generated transposed and then turned round: generate A's as (r, in_features) "
         "and B's as (out_features, r), (rows, cols) in that order; a transposed generation is another basis."),
        (out(A, B, NL_ALPHA), "The LoRA branch is scaled by alpha; the scaling is alpha / r."),
        (out(A, B, 1.0), "The LoRA branch is not scaled: multiply B A x by alpha / r."),
        (out(A, B, bias=False), "The base layer's bias is missing: call the base layer (`self.base_layer(x)`) "
         "rather than x @ W.T alone."),
        (scaling * (x @ A.T @ B.T), "Your output lacks the base layer's output: h = base(x) + scaling * B A x."),
    ]


def _nl_close(got: torch.Tensor, want: torch.Tensor) -> bool:
    # float32 layers of six inputs: rounding ~1e-6; each mistake changes the output by over 1e-2.
    return tuple(got.shape) == tuple(want.shape) and torch.allclose(got.double(), want.double(), rtol=1e-4, atol=1e-5)


def _nl_build(answer):
    base = _nl_base()
    pristine = copy.deepcopy(base)
    options = {"num_basis_A": NL_KA, "num_basis_B": NL_KB, "seed": NL_SEED}
    try:
        layer = answer(base, NL_R, NL_ALPHA, *options.values())
    except TypeError as exc:  # the course's layer classes take their options by keyword only
        if "takes 4 positional arguments" not in str(exc):
            raise
        layer = answer(base, NL_R, NL_ALPHA, **options)
    expect(isinstance(layer, nn.Module), f"Calling your class gave a {type(layer).__name__}, not an nn.Module. "
           "Subclass nn.Module and call super().__init__() first.")
    return base, pristine, layer


def _nl_check_construction(base: nn.Linear, layer) -> tuple[nn.Parameter, nn.Parameter]:
    a, b = _nl_parts(layer)
    frozen = [name for name, value in (("A", a), ("B", b)) if not value.requires_grad]
    expect(not frozen, f"The coefficients of {' and '.join(frozen)} are frozen (requires_grad=False): they are all that "
           "NOLA trains. Create them as `nn.Parameter(...)` and do not freeze them with the base layer.")
    expect(not base.weight.requires_grad and not base.bias.requires_grad, "The base layer is still trainable: "
           "freeze it (`base.requires_grad_(False)`); NOLA trains only the coefficients.")
    ids = {id(a), id(b)}
    others = [(name, p) for name, p in layer.named_parameters() if p.requires_grad and id(p) not in ids]
    if others:
        name, p = others[0]
        big = tuple(p.shape) in ((NL_KA, NL_R, NL_IN), (NL_KB, NL_OUT, NL_R), (NL_R, NL_IN), (NL_OUT, NL_R))
        raise Failure(f"`{name}` (shape {tuple(p.shape)}) is trainable besides the coefficients"
                      + (": a basis, or A or B, stored as a parameter. Generate A and B from the seed in forward "
                         "instead; " if big else "; ")
                      + "NOLA trains only `lora_A_coefficients` and `lora_B_coefficients`, the base layer is frozen.")
    if torch.count_nonzero(b) > 0 and torch.count_nonzero(a) == 0:
        raise Failure("At the start A's coefficients are zero and B's are not: the other way round. B's "
                      "coefficients start at zero (B = 0, so the layer starts as the base layer) and A's at random "
                      "(else both gradients are zero forever).")
    expect(torch.count_nonzero(b) == 0, "B's coefficients are not zero at the start. Start them at zero: then B = 0 "
           "and the layer starts exactly as the base layer.")
    expect(torch.count_nonzero(a) > 0, "A's coefficients are all zero at the start. With A = 0 and B = 0 both "
           "gradients are zero and the layer never learns: start A's coefficients at random.")
    return a, b


def _nl_check_state_dict(layer) -> None:
    base_numbers = NL_OUT * NL_IN + NL_OUT
    state = layer.state_dict()
    extra = sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor)) - base_numbers
    allowed = NL_KA + NL_KB + 2  # the coefficients, and a seed or two stored as tensors
    if extra <= allowed:
        return
    kept = [f"{name} {tuple(t.shape)}" for name, t in state.items()
            if isinstance(t, torch.Tensor) and t.numel() > max(NL_KA, NL_KB)
            and tuple(t.shape) not in ((NL_OUT, NL_IN), (NL_OUT,))]  # not the base layer's weight and bias
    raise Failure(f"Your layer's state dict holds {extra:,} numbers besides the base layer's; NOLA's adapter is "
                  f"its {NL_KA + NL_KB} coefficients (and the seed). It also holds {', '.join(kept) or 'more'}: "
                  "a basis, or A and B, stored as a parameter or buffer, so it would be saved with every adapter. "
                  "Keep the seeds as plain ints and generate the basis in forward (GenerateParams); do not "
                  "register it.")


def _nl_check_forward(base, pristine, layer, a, b) -> None:
    x = _nl_input()
    got = layer(x.clone())
    expect(isinstance(got, torch.Tensor) and tuple(got.shape) == (2, 3, NL_OUT), "Your forward should return a "
           f"tensor of shape {(2, 3, NL_OUT)} for x of shape {tuple(x.shape)}.")
    if not _nl_close(got, pristine(x)):
        expect(not _nl_close(got, x @ pristine.weight.T), "The base layer's bias is missing: call the base layer "
               "(`self.base_layer(x)`) rather than x @ W.T alone.")
        raise Failure("At the start (B's coefficients zero) your layer's output differs from the base layer's: "
                      "with B = 0 the forward must be exactly base(x).")
    previous = got
    generator = torch.Generator().manual_seed(7)
    for _ in range(2):  # new coefficients each time, changed in place as an optimiser step changes them
        with torch.no_grad():
            a.copy_(torch.randn(NL_KA, generator=generator))
            b.copy_(torch.randn(NL_KB, generator=generator))
        got = layer(x.clone())
        want = _nl_reference(pristine, a.detach(), b.detach())(x)
        if _nl_close(got, want):
            previous = got
            continue
        if _nl_close(got, previous):
            raise Failure("After the coefficients changed (in place, as an optimiser step changes them) your "
                          "output did not: A and B were made once (in __init__ or at the first call) and reused. "
                          "Generate them in forward, on every call, from the current coefficients.")
        for wrong, message in _nl_mistakes(pristine, a.detach(), b.detach(), x):
            if _nl_close(got, wrong):
                raise Failure(message)
        raise Failure("With the same coefficients your layer's output differs from course.nola.NOLALoRALinear's. "
                      "h = base(x) + (alpha / r) B A x with A = sum_k a_k A_k / sqrt(num_basis_A), A_k from "
                      "random_basis(num_basis_A, r, in_features, derive_seed(seed, 'lora_A')), and B = sum_k b_k "
                      "B_k / sqrt(num_basis_B), B_k from random_basis(num_basis_B, out_features, r, "
                      "derive_seed(seed, 'lora_B')). Generate them with the course's basis (GenerateParams), never "
                      "with torch's random generators.")


def _nl_check_gradient(pristine, layer, a, b) -> None:
    x = _nl_input()
    upstream = torch.randn(2, 3, NL_OUT, generator=torch.Generator().manual_seed(9))
    layer.zero_grad(set_to_none=True)
    got = layer(x.clone())
    expect(got.requires_grad, "Your output does not depend on the coefficients for autograd: no gradient can reach "
           "them. Was A or B made under torch.no_grad(), with .detach() or from .data?")
    (got * upstream).sum().backward()
    reference = _nl_reference(pristine, a.detach(), b.detach())
    (reference(x) * upstream).sum().backward()
    for name, mine, theirs in (("lora_A_coefficients", a, reference.lora_A_coefficients),
                               ("lora_B_coefficients", b, reference.lora_B_coefficients)):
        expect(mine.grad is not None, f"No gradient reached `{name}`: generate A and B from the coefficients with "
               "differentiable operations (GenerateParams.apply), not from a detached copy.")
        expect(torch.allclose(mine.grad.double(), theirs.grad.double(), rtol=1e-4, atol=1e-6),
               f"The gradient of `{name}` is not the one of NOLA's forward, although the outputs agree.")


@check(
    "nola_linear",
    hint=[
        "Keep the base layer and freeze it; keep two trainable vectors, `lora_A_coefficients` (num_basis_A "
        "numbers, random) and `lora_B_coefficients` (num_basis_B, zero), and the seeds of A's and B's bases as "
        "plain ints: `derive_seed(seed, 'lora_A')` and `derive_seed(seed, 'lora_B')`. Nothing else: the basis is "
        "never stored.",
        "In forward, `A = GenerateParams.apply(lora_A_coefficients, r, in_features, seed_A) / sqrt(num_basis_A)` "
        "(shape (r, in)) and `B = GenerateParams.apply(lora_B_coefficients, out_features, r, seed_B) / "
        "sqrt(num_basis_B)` (shape (out, r)); then LoRA's `base(x) + (alpha / r) * x @ A.T @ B.T`.",
        "```python\n"
        "A = GenerateParams.apply(self.lora_A_coefficients, self.r, base.in_features, self.seed_A)\n"
        "B = GenerateParams.apply(self.lora_B_coefficients, base.out_features, self.r, self.seed_B)\n"
        "A, B = A / math.sqrt(self.num_basis_A), B / math.sqrt(self.num_basis_B)\n"
        "return base(x) + self.scaling * (x @ A.T @ B.T)\n"
        "```",
    ],
    solution=_NOLA_LINEAR_SOLUTION,  # the solution notebook's answer replaces it once notebook 05 has the exercise
    reference="course.nola:NOLALoRALinear",
)
def nola_linear(answer):
    """``answer(base, r, alpha, num_basis_A, num_basis_B, seed)`` is NOLA's layer, equal to NOLALoRALinear."""
    expect(callable(answer), f"Expected a class C(base, r, alpha, num_basis_A, num_basis_B, seed), got "
           f"{type(answer).__name__}. Pass the class itself: check.nola_linear(NOLALoRALinear).")
    base, pristine, layer = _nl_build(answer)
    a, b = _nl_check_construction(base, layer)
    _nl_check_state_dict(layer)
    _nl_check_forward(base, pristine, layer, a, b)
    _nl_check_gradient(pristine, layer, a, b)
