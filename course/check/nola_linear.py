"""``check.nola_linear`` (notebook 05): the learner's NOLA layer against ``course.nola.NOLALoRALinear``.

The answer ``C(base, r, alpha, num_basis_A, num_basis_B, seed)`` gets the same coefficients as
the course's layer; the check compares construction (trainable coefficients, frozen base, B zero
at the start), the state dict (no basis), the forward (A and B generated from the
``derive_seed`` bases, each divided by sqrt(K)) and the exact gradient, naming each typical
mistake. Re-exported by ``course.check.nola``.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from course.check.core import Failure, check, close, expect
from course.nola import derive_seed, random_basis

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
    return close(got, want, rtol=1e-4, atol=1e-5)


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
        expect(close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-6),
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
