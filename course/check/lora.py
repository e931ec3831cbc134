"""Checks for notebook 02, LoRA from scratch: ``check.lora_linear`` here, ``check.inject_lora`` in
``course.check.inject`` (re-exported here).

The check judges what the learner's layer does, never how it is spelled: A and B
may be ``nn.Parameter``s or bias-free ``nn.Linear``s, the maths einsum or matmul,
A Gaussian or Kaiming. Everything is compared with an explicit formula computed
from the layer's own A and B, on seeded random layers, without touching the
learner's global random state.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from course.check.core import Failure, check, close, expect

R, ALPHA = 3, 6.0  # scaling alpha / r = 2, unlike alpha (6) or alpha / sqrt(r) (3.46)
SCALING = ALPHA / R
SQUARE, NON_SQUARE = (6, 6), (7, 5)  # (in_features, out_features)


def _matrix(layer, attribute: str) -> torch.Tensor:
    """``layer.lora_A`` / ``lora_B`` as the tensor that holds the matrix (shared, not a copy)."""
    expect(hasattr(layer, attribute), f"Your layer has no `.{attribute}`. Name the two factors "
           "`self.lora_A` and `self.lora_B` (an nn.Parameter or a bias-free nn.Linear each).")
    value = getattr(layer, attribute)
    if isinstance(value, nn.Linear):
        expect(value.bias is None, f"`{attribute}` is an nn.Linear with a bias; make it `bias=False`: "
               "LoRA learns only the product B A.")
        return value.weight
    expect(isinstance(value, nn.Parameter), f"`{attribute}` is a {type(value).__name__}; make it an "
           "nn.Parameter or an nn.Linear(..., bias=False), so that it is trained.")
    return value


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> bool:
    # float32 sums of a few products of numbers of order 1: rounding is ~1e-6.
    return close(a, b, rtol=1e-5, atol=atol)


def _base_weight(layer, base: nn.Linear) -> torch.Tensor:
    """The weight the layer really uses as W0: the base we gave it, or its own copy."""
    ids = {id(_matrix(layer, "lora_A")), id(_matrix(layer, "lora_B"))}
    own = [p for p in layer.parameters() if id(p) not in ids and p.shape == base.weight.shape]
    if any(p is base.weight for p in own) or not own:
        return base.weight
    return own[0]


# The course's layer classes: (base, r, alpha) by position, options by keyword only (course.lora).
_KEYWORD_ONLY = {"LoRALinear", "DoRALinear", "OLoRALinear", "NOLALoRALinear"}


def _build(answer, shape, dropout=0.0):
    torch.manual_seed(0)
    base = nn.Linear(*shape)
    W0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    try:
        layer = answer(base, R, ALPHA, dropout=dropout)
    except TypeError as exc:
        library = re.match(r"(\w+)\.__init__\(\) takes 4 positional arguments but \d+ were given", str(exc))
        if library and library.group(1) in _KEYWORD_ONLY:  # super().__init__(base, r, alpha, dropout)
            raise Failure(f"{library.group(1)} takes (base, r, alpha) by position and every option by keyword "
                          f"only: call `super().__init__(base, r, alpha, dropout=dropout)`.") from exc
        raise
    expect(isinstance(layer, nn.Module), f"Calling your class gave a {type(layer).__name__}, not an "
           "nn.Module. Subclass nn.Module and call super().__init__() first.")
    return base, layer, W0, b0


def _check_construction(answer, shape) -> None:
    n_in, n_out = shape
    base, layer, _, _ = _build(answer, shape)
    A, B = _matrix(layer, "lora_A"), _matrix(layer, "lora_B")
    expect(tuple(A.shape) == (R, n_in), f"As a matrix, lora_A should be (r, in_features) = {(R, n_in)}, "
           f"got {tuple(A.shape)}. A takes the input x (in_features) down to r numbers.")
    expect(tuple(B.shape) == (n_out, R), f"As a matrix, lora_B should be (out_features, r) = {(n_out, R)}, "
           f"got {tuple(B.shape)}. B takes the r numbers up to out_features.")
    expect(hasattr(layer, "scaling"), "Your layer has no `.scaling`. Set `self.scaling = alpha / r`.")
    scaling = float(layer.scaling)
    expect(abs(scaling - ALPHA) > 1e-6, f"With r={R}, alpha={ALPHA} your scaling is {scaling:g} = alpha. "
           "Eq. 3 scales by alpha / r: divide by r, so that changing r does not change the step size.")
    expect(abs(scaling - SCALING) < 1e-6, f"With r={R}, alpha={ALPHA} the scaling should be alpha / r = "
           f"{SCALING:g}, yours is {scaling:g}.")
    expect(torch.count_nonzero(B) == 0, "B is not zero at the start. Initialise B to zeros, so that "
           "B A = 0 and the new layer starts exactly as the base layer.")
    expect(torch.count_nonzero(A) > 0, "A is all zeros at the start. With A = 0 and B = 0 both gradients "
           "are zero and the layer never learns: initialise A randomly (e.g. nn.init.kaiming_uniform_).")
    expect(A.requires_grad and B.requires_grad, "A and B must be trainable (requires_grad=True).")
    lora_ids = {id(A), id(B)}
    trainable = [p for p in layer.parameters() if id(p) not in lora_ids and p.requires_grad]
    expect(not trainable and not base.weight.requires_grad and not base.bias.requires_grad,
           "The base layer's weight or bias is still trainable. Freeze it with "
           "`base.requires_grad_(False)`: LoRA trains only A and B.")


def _lora_input(shape) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, shape[0])  # (batch, tokens, features), as in a transformer


def _randomise(A: torch.Tensor, B: torch.Tensor) -> None:
    with torch.no_grad():
        A.copy_(torch.randn_like(A))
        B.copy_(torch.randn_like(B))


_NO_BIAS = ("The base layer's bias is missing from your output: call the base layer "
            "(`self.base_layer(x)`), which adds its bias, rather than x @ W.T alone.")


def _forward_any_batch(layer, x: torch.Tensor) -> torch.Tensor:
    try:
        return layer(x)
    except Exception:
        try:
            layer(x.reshape(-1, x.shape[-1]))
        except Exception:
            raise  # fails for 2-d inputs too: report the learner's own error
        raise Failure(f"Your forward works for a 2-d input but fails for x of shape {tuple(x.shape)}. "
                      "In a transformer x is (batch, tokens, features): write it for any leading "
                      "dimensions (x @ A.T, or einsum('...i,ri->...r', x, A))."
                      ) from None


def _check_forward(answer, shape) -> None:
    base, layer, W0, b0 = _build(answer, shape)
    A, B = _matrix(layer, "lora_A"), _matrix(layer, "lora_B")
    x = _lora_input(shape)
    layer.eval()
    got = _forward_any_batch(layer, x)
    expect(not _close(got, F.linear(x, W0)), _NO_BIAS)
    expect(_close(got, F.linear(x, W0, b0)), "At the start (B = 0) your layer's output differs "
           "from the base layer's. With B = 0 the forward must be exactly base(x).")
    _randomise(A, B)
    got = layer(x)
    lora = x @ A.detach().T @ B.detach().T
    want = F.linear(x, W0, b0) + SCALING * lora
    if _close(got, want):
        return
    expect(tuple(got.shape) == tuple(want.shape), f"For x of shape {tuple(x.shape)} your output has "
           f"shape {tuple(got.shape)}, want {tuple(want.shape)}.")
    mistakes = [
        (F.linear(x, W0) + SCALING * lora, _NO_BIAS),
        (F.linear(x, W0, b0) + ALPHA * lora, "Your forward scales B A x by alpha, not alpha / r."),
        (F.linear(x, W0, b0) + lora, "Your forward adds B A x without the scaling alpha / r."),
        (F.linear(x, W0, b0), "Your output is the base layer's alone: the LoRA branch B A x is not added."),
        (SCALING * lora, "Your output lacks the base layer's output: h = base(x) + scaling * B A x."),
    ]
    for output, message in mistakes:
        expect(not _close(got, output), message)
    raise Failure("With random A and B your output is not base(x) + (alpha / r) * B A x. Compare your "
                  "forward with eq. 3: h = W0 x + b + (alpha / r) B A x.")


def _check_gradients(answer, shape) -> None:
    base, layer, W0, b0 = _build(answer, shape)
    A, B = _matrix(layer, "lora_A"), _matrix(layer, "lora_B")
    _randomise(A, B)
    x = _lora_input(shape).requires_grad_(True)
    layer.train()
    torch.manual_seed(2)
    upstream = torch.randn(*x.shape[:-1], shape[1])
    (layer(x) * upstream).sum().backward()
    A_ref, B_ref = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    ((F.linear(x_ref, W0, b0) + SCALING * x_ref @ A_ref.T @ B_ref.T) * upstream).sum().backward()
    for name, got, want in (("A", A.grad, A_ref.grad), ("B", B.grad, B_ref.grad), ("x", x.grad, x_ref.grad)):
        expect(got is not None, f"No gradient reached {name}: is the LoRA branch detached "
               "(`.detach()`, `torch.no_grad()`, `.data`)?")
        expect(_close(got, want, atol=1e-4), f"The gradient with respect to {name} is not the one "
               "of base(x) + scaling * B A x.")


def _dropped_fraction(answer, shape, p: float) -> tuple[float, torch.Tensor]:
    """Train-mode LoRA branch on one-hot inputs: the fraction of inputs dropped with ``dropout=p``,
    and the factor each kept input was scaled by.

    Row k of the input is the unit vector e_(k mod in). Dropout on x keeps or drops that single
    feature, so each row's LoRA output is either 0 or ``scaling * B A e / (1 - p)``; dropout
    anywhere else (on A x, or on the output) gives rows that are neither.
    """
    base, layer, W0, b0 = _build(answer, shape, dropout=p)
    A, B = _matrix(layer, "lora_A"), _matrix(layer, "lora_B")
    _randomise(A, B)
    layer.train()
    rows = 3000
    x = torch.zeros(rows, shape[0])
    x[torch.arange(rows), torch.arange(rows) % shape[0]] = 1.0
    torch.manual_seed(3)
    with torch.no_grad():
        branch = layer(x) - F.linear(x, W0, b0)
    full = SCALING * x @ A.detach().T @ B.detach().T
    dropped = branch.abs().amax(-1) < 1e-5
    kept = branch[~dropped]
    expected = full[~dropped]
    ratio = (kept * expected).sum(-1) / (expected * expected).sum(-1)  # per row, if kept * 1/(1-q)
    whole_rows = close(kept, ratio[:, None] * expected, rtol=1e-4, atol=1e-5)
    expect(whole_rows, f"With dropout={p} in train mode your LoRA branch is not B A applied to a dropped-out "
           "x: dropout seems to act after A (on A x) or on the output. Apply it to the input of the "
           "LoRA branch, so that each input feature is kept or dropped as a whole: B(A(dropout(x))).")
    return dropped.float().mean().item(), ratio


def _check_dropout(answer, shape) -> None:
    base, layer, W0, b0 = _build(answer, shape, dropout=0.5)
    A, B = _matrix(layer, "lora_A"), _matrix(layer, "lora_B")
    x = _lora_input(shape)
    layer.train()
    with torch.no_grad():
        B.zero_()
    # With B = 0 the LoRA branch adds exactly 0 whatever the dropout: the rest is the base path.
    expect(torch.equal(layer(x), F.linear(x, W0, b0)) or _close(layer(x), F.linear(x, W0, b0), 1e-6),
           "With dropout=0.5 in train mode, your layer changes the base layer's output. Dropout "
           "belongs on the LoRA branch only: base(x) + scaling * B(A(dropout(x))).")
    _randomise(A, B)
    no_dropout = F.linear(x, W0, b0) + SCALING * x @ A.detach().T @ B.detach().T
    expect(not _close(layer(x), no_dropout), "With dropout=0.5 in train mode your LoRA branch "
           "ignores dropout. Apply it to x on the way into A: B(A(dropout(x))).")
    layer.eval()
    expect(_close(layer(x), no_dropout), "In eval mode (layer.eval()) dropout must do nothing, "
           "but your output still changes. Use nn.Dropout, which knows the mode.")
    # 3000 draws: the dropped fraction's standard deviation is at most 0.009, so 0.05 is over 5 of them.
    (low, low_scale), (high, high_scale) = _dropped_fraction(answer, shape, 0.2), _dropped_fraction(answer, shape, 0.6)
    expect(abs(high - low) > 0.2, f"Your layer drops about {low:.0%} of the inputs with dropout=0.2 and "
           f"{high:.0%} with dropout=0.6: the probability is written into the class. Pass the "
           "`dropout` argument on: nn.Dropout(dropout).")
    for p, fraction, scale in ((0.2, low, low_scale), (0.6, high, high_scale)):
        expect(abs(fraction - p) < 0.05, f"With dropout={p} your layer drops {fraction:.0%} of the inputs to "
               f"the LoRA branch, not {p:.0%}. Use nn.Dropout(dropout) with the argument as given.")
        expect(close(scale, torch.full_like(scale, 1 / (1 - p)), rtol=1e-3, atol=1e-8),
               f"With dropout={p} the inputs your LoRA branch keeps are scaled by {scale.mean().item():.3g}, "
               f"not by 1 / (1 - p) = {1 / (1 - p):.3g}. nn.Dropout(p) does this rescaling for you.")


def _check_merge(answer, shape) -> None:
    base, layer, W0, b0 = _build(answer, shape)
    A, B = _matrix(layer, "lora_A"), _matrix(layer, "lora_B")
    for method in ("merge", "unmerge"):
        expect(callable(getattr(layer, method, None)), f"Your layer has no `.{method}()` method.")
    expect(getattr(layer, "merged", None) is False, "A new layer should have `.merged == False`.")
    _randomise(A, B)
    layer.eval()
    x = _lora_input(shape)
    before = layer(x).detach()
    weight = _base_weight(layer, base)
    delta = SCALING * B.detach() @ A.detach()

    layer.merge()
    expect(layer.merged is True, "After `.merge()`, `.merged` should be True.")
    merged = weight.detach()
    if _close(merged, W0):
        raise Failure("`.merge()` did not change the base weight. Add scaling * B @ A to it, in place, "
                      "under torch.no_grad().")
    expect(not _close(merged, W0 + B.detach() @ A.detach()), "`.merge()` adds B @ A without the "
           "scaling: the merged weight must be W0 + (alpha / r) * B @ A.")
    expect(_close(merged, W0 + delta), "After `.merge()` the base weight should be W0 + (alpha / r) * B @ A.")
    after = layer(x).detach()
    expect(not _close(after, before + SCALING * x @ A.detach().T @ B.detach().T),
           "After `.merge()` your forward still adds the LoRA branch, so B A counts twice. "
           "When merged, the forward is the base layer alone.")
    expect(_close(after, before), "After `.merge()` the output changed; it should stay the same.")
    layer.merge()
    expect(not _close(weight.detach(), W0 + 2 * delta), "Merging twice added B A twice. Make `.merge()` "
           "do nothing when `self.merged` is already True.")
    expect(_close(weight.detach(), W0 + delta), "A second `.merge()` changed the base weight.")

    layer.unmerge()
    expect(layer.merged is False, "After `.unmerge()`, `.merged` should be False.")
    expect(_close(weight.detach(), W0), "`.unmerge()` should restore the base weight W0 (subtract the "
           "same scaling * B @ A that merge added).")
    expect(_close(layer(x).detach(), before), "After `.unmerge()` the output should be as before merging.")
    layer.unmerge()
    expect(_close(weight.detach(), W0), "Unmerging twice subtracted B A twice. Make `.unmerge()` do "
           "nothing when the layer is not merged.")


@check(
    "lora_linear",
    hint=[
        "Follow eq. 3 piece by piece: keep the base layer (as `self.base_layer`, PEFT's name) and freeze it; "
        "A takes in_features down to r "
        "numbers, B takes them up to out_features; the layer returns base(x) plus the scaled LoRA branch. "
        "Start with B = 0 so that the new layer begins as the base layer.",
        "Keep `self.base_layer = base.requires_grad_(False)`. Make "
        "`self.lora_A = nn.Linear(base.in_features, r, bias=False)` (random by default) and "
        "`self.lora_B = nn.Linear(r, base.out_features, bias=False)` with `nn.init.zeros_` on its weight, "
        "`self.scaling = alpha / r` and `self.dropout = nn.Dropout(dropout)`. `merge()` and `unmerge()` "
        "change the base weight in place, under `torch.no_grad()`, and keep `self.merged` up to date.",
        "Forward: `return self.base_layer(x) if self.merged else self.base_layer(x) + "
        "self.lora_B(self.lora_A(self.dropout(x))) * self.scaling`. `get_delta_weight()` (PEFT's name): "
        "`return self.scaling * self.lora_B.weight @ self.lora_A.weight`. `merge()`: `if not self.merged: "
        "self.base_layer.weight += self.get_delta_weight(); self.merged = True`; `unmerge()` subtracts the "
        "same product when merged.",
    ],
    solution=None,  # the solution notebook's answer, from the exercise manifest
    reference="course.lora:LoRALinear",
)
def lora_linear(answer):
    """``answer`` is a class ``C(base: nn.Linear, r, alpha, dropout=0.0)``: a LoRA layer (eq. 3)."""
    expect(isinstance(answer, type) or callable(answer), "Expected a class C(base, r, alpha, "
           f"dropout=0.0), got {type(answer).__name__}. Pass the class itself: check.lora_linear(LoRALinear).")
    run_on_both_shapes(answer, (_check_construction, _check_forward, _check_gradients, _check_dropout,
                                _check_merge), "of A and B uses in_features and which out_features")


def run_on_both_shapes(answer, steps, what_to_check: str) -> None:
    """Run each ``step(answer, shape)`` on a square layer, then on a non-square one.

    A layer that only fails when in_features != out_features mixed the two up somewhere:
    the failure says so, and ``what_to_check`` says where to look. Shared by the layer
    checks of notebooks 02 (LoRA) and 03 (DoRA).
    """
    with torch.random.fork_rng():
        for step in steps:
            step(answer, SQUARE)
        for step in steps:
            try:
                step(answer, NON_SQUARE)
            except NotImplementedError:
                raise
            except Exception as exc:
                raise Failure(f"Your layer works for a square nn.Linear{SQUARE} but not for "
                              f"nn.Linear{NON_SQUARE}, where in_features != out_features: check which "
                              f"{what_to_check}.\n\n{exc}") from exc


from course.check.inject import inject_lora  # noqa: E402, F401 (check.inject_lora, chapter 02's second check)
