"""Checks for notebook 03, DoRA: ``check.dora_linear``.

The learner's layer is judged by what it computes, compared with eq. 5 of Liu et al.
2024 written out from the layer's own A, B and magnitude, on seeded random layers:

    h = m / ||W0 + s B A||_row * (W0 + s B A) x + b,    the norm detached in backward.

It may subclass ``course.lora.LoRALinear`` or be written from scratch; A and B may be
``nn.Parameter``s or bias-free ``nn.Linear``s; the magnitude any trainable vector
reachable as ``.magnitude``. Each typical mistake is recognised by the output it gives
and named in the message.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from course.check.core import Failure, check, expect
from course.check.lora import (
    ALPHA,
    SCALING,
    R,
    _base_weight,
    _build,
    _close,
    _forward_any_batch,
    _lora_input,
    _matrix,
    run_on_both_shapes,
)

_NO_MAGNITUDE = ("Your layer has no `.magnitude`. Store m, one trainable number per output feature, "
                 "as an nn.Parameter (the notebook's class keeps it as `self.lora_magnitude_vector`, PEFT's "
                 "name, and its `magnitude` property returns it).")
_WRONG_DIM = ("The norm is taken over the wrong dimension. A weight is (out_features, in_features): DoRA "
              "gives each output row its own magnitude, the L2 norm over the input dimension, "
              "`weight.norm(dim=1)` (the paper's column norm ||.||_c, its weights being (in, out)).")


def _magnitude(layer) -> torch.Tensor:
    try:
        m = layer.magnitude
    except AttributeError:
        raise Failure(_NO_MAGNITUDE) from None
    expect(isinstance(m, torch.Tensor), f"`.magnitude` is a {type(m).__name__}; make it an nn.Parameter "
           "holding one number per output feature.")
    return m


def _factors(layer):
    return _matrix(layer, "lora_A"), _matrix(layer, "lora_B"), _magnitude(layer)


def _dora(x, W0, b0, A, B, m, *, norm_scaling=SCALING, dim=1, bias_scaled=False, detach=True):
    """Eq. 5 written out, with switches for the typical mistakes."""
    V = W0 + SCALING * B @ A
    norm = torch.linalg.vector_norm(W0 + norm_scaling * B @ A, dim=dim)
    if detach:
        norm = norm.detach()
    factor = m / norm
    out = F.linear(x, V) * factor
    return out + (b0 * factor if bias_scaled else b0)


def _randomise(A, B, m) -> None:
    """Random factors, and a magnitude that moved from its start (positive, as trained ones stay)."""
    with torch.no_grad():
        A.copy_(torch.randn_like(A))
        B.copy_(0.3 * torch.randn_like(B))
        m.mul_(0.5 + torch.rand_like(m))


def _check_construction(answer, shape) -> None:
    n_in, n_out = shape
    base, layer, W0, _ = _build(answer, shape)
    A, B = _matrix(layer, "lora_A"), _matrix(layer, "lora_B")
    expect(tuple(A.shape) == (R, n_in) and tuple(B.shape) == (n_out, R), "As matrices, lora_A should be "
           f"(r, in_features) = {(R, n_in)} and lora_B (out_features, r) = {(n_out, R)}; got "
           f"{tuple(A.shape)} and {tuple(B.shape)}. DoRA puts a LoRA pair on the direction, as in notebook 02.")
    expect(abs(float(getattr(layer, "scaling", float("nan"))) - SCALING) < 1e-6,
           f"`.scaling` should be alpha / r = {SCALING:g} (r={R}, alpha={ALPHA}).")
    expect(torch.count_nonzero(B) == 0 and torch.count_nonzero(A) > 0, "At the start B must be zero and A "
           "random, as in LoRA: then W0 + s B A = W0 and the layer starts as the base layer.")
    m = _magnitude(layer)
    expect(m.dim() == 1, f"`.magnitude` has shape {tuple(m.shape)}; it is a vector, one number per output "
           f"feature: shape ({n_out},).")
    if n_in != n_out and tuple(m.shape) == (n_in,):
        raise Failure(f"`.magnitude` has shape ({n_in},) = (in_features,), not ({n_out},). {_WRONG_DIM}")
    expect(tuple(m.shape) == (n_out,), f"`.magnitude` has shape {tuple(m.shape)}, want (out_features,) = ({n_out},).")
    expect(m.requires_grad and any(p is m for p in layer.parameters()), "`.magnitude` is not trained: make "
           "it an nn.Parameter of the layer (requires_grad=True), so that the optimizer updates it.")
    got = m.detach()
    if _close(got, torch.ones_like(got)):
        raise Failure("`.magnitude` starts at ones. It must start at the row norms of the base weight, "
                      "m0 = ||W0||_row = `base.weight.norm(dim=1)`, so that m0 * W0 / ||W0|| = W0 and the "
                      "layer starts as the base layer.")
    if n_in == n_out and _close(got, W0.norm(dim=0)):
        raise Failure(f"`.magnitude` starts at the column norms of W0. {_WRONG_DIM}")
    if _close(got, (W0 ** 2).sum(dim=1)):
        raise Failure("`.magnitude` starts at the squared row norms; take the square root: `weight.norm(dim=1)`.")
    expect(_close(got, W0.norm(dim=1)), "`.magnitude` should start at ||W0||_row, the L2 norm of each row of "
           "the base weight (`base.weight.norm(dim=1)`).")
    ids = {id(A), id(B), id(m)}
    others = [p for p in layer.parameters() if id(p) not in ids and p.requires_grad]
    expect(not others and not base.weight.requires_grad and not base.bias.requires_grad,
           "Something besides A, B and the magnitude is trainable (the base layer's weight or bias?). "
           "Freeze the base layer: `base.requires_grad_(False)`.")


def _diagnose(got, x, W0, b0, A, B, m, square: bool) -> None:
    """Fail with the mistake's own message when ``got`` is what a typical mistake computes."""
    V = W0 + SCALING * B @ A
    mistakes = [
        (_dora(x, W0, b0, A, B, m, norm_scaling=1.0), "The norm misses the scaling: it must be the norm of "
         "the weight the layer applies, ||W0 + s B A||_row with s = alpha / r, not ||W0 + B A||_row."),
        (_dora(x, W0, b0, A, B, m, bias_scaled=True), "Your output scales the bias by m / ||W0 + s B A||: "
         "DoRA rescales the weight only. Add the base layer's bias after the rescaling (h = f W' x + b)."),
        (F.linear(x, V, b0), "Your output is plain LoRA's, W0 x + s B A x + b: the magnitude m and the "
         "normalisation by ||W0 + s B A||_row are missing."),
        (F.linear(x, V) * m + b0, "Your output multiplies by m without dividing by ||W0 + s B A||_row: the "
         "direction must be a unit vector per row, (W0 + s B A) / ||W0 + s B A||_row."),
        (F.linear(x, V) / torch.linalg.vector_norm(V, dim=1) + b0, "Your output is the direction alone: "
         "multiply it by the trained magnitude m."),
        (F.linear(x, W0 + B @ A) * (m / torch.linalg.vector_norm(W0 + B @ A, dim=1)) + b0,
         "Your forward leaves out the scaling alpha / r: the weight is W0 + (alpha / r) B A."),
    ]
    if square:
        mistakes.insert(0, (_dora(x, W0, b0, A, B, m, dim=0), _WRONG_DIM))
    correct = _dora(x, W0, b0, A, B, m)
    for output, message in mistakes:
        # A mistake that gives the right output for these A, B, m (B = 0, say) is not one here.
        expect(_close(output, correct) or not _close(got, output), message)


def _check_forward(answer, shape) -> None:
    base, layer, W0, b0 = _build(answer, shape)
    A, B, m = _factors(layer)
    x = _lora_input(shape)
    layer.eval()
    square = shape[0] == shape[1]
    got = _forward_any_batch(layer, x)
    if not _close(got, F.linear(x, W0, b0)):
        expect(tuple(got.shape) == (*x.shape[:-1], shape[1]), f"For x of shape {tuple(x.shape)} your output "
               f"has shape {tuple(got.shape)}, want {(*x.shape[:-1], shape[1])}.")
        _diagnose(got, x, W0, b0, A.detach(), B.detach(), m.detach(), square)
        raise Failure("At the start (B = 0, m = ||W0||_row) your layer's output differs from the base "
                      "layer's. Then m / ||W0|| * W0 = W0, so the forward must be exactly base(x).")
    _randomise(A, B, m)
    A, B, m = A.detach(), B.detach(), m.detach()
    got = layer(x)
    if _close(got, _dora(x, W0, b0, A, B, m)):
        return
    _diagnose(got, x, W0, b0, A, B, m, square)
    raise Failure("With random A, B and m your output is not m / ||W0 + s B A||_row * (W0 + s B A) x + b. "
                  "Compare your forward with eq. 5, term by term.")


def _check_gradients(answer, shape) -> None:
    base, layer, W0, b0 = _build(answer, shape)
    A, B, m = _factors(layer)
    _randomise(A, B, m)
    x = _lora_input(shape)
    layer.train()
    torch.manual_seed(2)
    upstream = torch.randn(*x.shape[:-1], shape[1])
    (layer(x) * upstream).sum().backward()
    grads = {"A": A.grad, "B": B.grad, "the magnitude": m.grad}
    for name, grad in grads.items():
        expect(grad is not None, f"No gradient reached {name}: is it detached somewhere (`.detach()`, "
               "`torch.no_grad()`, `.data`), or not used in the forward?")
    refs = {}
    for detach in (True, False):
        leaves = [t.detach().clone().requires_grad_() for t in (A, B, m)]
        (_dora(x, W0, b0, *leaves, detach=detach) * upstream).sum().backward()
        refs[detach] = dict(zip(grads, (t.grad for t in leaves), strict=True))
    if not all(_close(grads[k], refs[True][k], atol=1e-4) for k in ("A", "B")):
        expect(not all(_close(grads[k], refs[False][k], atol=1e-4) for k in ("A", "B")),
               "Your gradients of A and B flow through the norm ||W0 + s B A||_row. Section 4.3 of the paper "
               "(and PEFT) treat the norm as a constant in backward: `.detach()` it (or compute it under "
               "torch.no_grad()), so that only m and W0 + s B A carry gradient.")
        raise Failure("Your gradients of A and B are not those of eq. 5 with the norm detached.")
    expect(_close(grads["the magnitude"], refs[True]["the magnitude"], atol=1e-4), "The gradient of the "
           "magnitude is not the one of eq. 5: d h / d m = (W0 + s B A) x / ||W0 + s B A||_row.")


def _check_dropout(answer, shape) -> None:
    base, layer, W0, b0 = _build(answer, shape, dropout=0.5)
    A, B, m = _factors(layer)
    x = _lora_input(shape)
    layer.train()
    with torch.no_grad():  # at the start (B = 0, m = ||W0||) the layer is the base layer, dropout or not
        expect(_close(layer(x), F.linear(x, W0, b0), 1e-6), "With dropout=0.5 in train mode, your new layer "
               "no longer computes base(x): dropout reaches the base path. Apply it on the way into the "
               "LoRA branch only (PEFT also feeds the dropped-out x to the rescaling of W0 x).")
        _randomise(A, B, m)
        exact = _dora(x, W0, b0, A.detach(), B.detach(), m.detach())
        expect(not _close(layer(x), exact), "With dropout=0.5 in train mode your layer ignores dropout. "
               "Pass the `dropout` argument on (nn.Dropout(dropout)) and apply it to the input of the LoRA branch.")
        layer.eval()
        expect(_close(layer(x), exact), "In eval mode dropout must do nothing, but your output still "
               "changes. Use nn.Dropout, which knows the mode.")


def _check_merge(answer, shape) -> None:
    base, layer, W0, b0 = _build(answer, shape)
    A, B, m = _factors(layer)
    for method in ("merge", "unmerge"):
        expect(callable(getattr(layer, method, None)), f"Your layer has no `.{method}()` method.")
    expect(getattr(layer, "merged", None) is False, "A new layer should have `.merged == False`.")
    _randomise(A, B, m)
    A, B, m = A.detach(), B.detach(), m.detach()
    layer.eval()
    x = _lora_input(shape)
    before = layer(x).detach()
    weight = _base_weight(layer, base)
    V = W0 + SCALING * B @ A
    merged_want = (m / torch.linalg.vector_norm(V, dim=1))[:, None] * V

    layer.merge()
    expect(layer.merged is True, "After `.merge()`, `.merged` should be True.")
    merged = weight.detach().clone()
    expect(not _close(merged, W0), "`.merge()` did not change the base weight. Write "
           "m / ||W0 + s B A||_row * (W0 + s B A) into it, in place, under torch.no_grad().")
    expect(not _close(merged, V), "`.merge()` added s B A as LoRA does, without the magnitude: the merged "
           "weight is m / ||W0 + s B A||_row * (W0 + s B A), each row rescaled.")
    expect(_close(merged, merged_want, atol=1e-5), "After `.merge()` the base weight should be "
           "m / ||W0 + s B A||_row * (W0 + s B A): each row has norm m.")
    expect(_close(layer(x).detach(), before, atol=1e-5), "After `.merge()` the output changed. Once merged, the "
           "forward is the base layer alone (its weight now holds the whole DoRA weight).")
    layer.merge()
    expect(_close(weight.detach(), merged, atol=1e-5), "A second `.merge()` changed the base weight. Make "
           "`.merge()` do nothing when `self.merged` is already True.")

    layer.unmerge()
    expect(layer.merged is False, "After `.unmerge()`, `.merged` should be False.")
    restored = weight.detach()
    if not _close(restored, W0, atol=1e-5):
        expect(not _close(restored, V, atol=1e-5), "`.unmerge()` divided the magnitude out but forgot the LoRA "
               "part: it gave back W0 + s B A. Subtract s B A as well: W0 = W' / f - s B A.")
        expect(not _close(restored, merged - SCALING * B @ A, atol=1e-5), "`.unmerge()` divided by a factor "
               "computed from the merged weight, whose rows all have norm m, so it divided by 1. The norm "
               "of W0 + s B A is lost once merged: keep the factor m / ||W0 + s B A|| from `merge()` "
               "(as PEFT caches it) and divide by that one.")
        raise Failure("`.unmerge()` should restore the base weight W0: divide by the factor "
                      "f = m / ||W0 + s B A||_row that merge multiplied in, then subtract s B A.")
    expect(_close(layer(x).detach(), before, atol=1e-5), "After `.unmerge()` the output should be as before merging.")
    layer.unmerge()
    expect(_close(weight.detach(), W0, atol=1e-5), "A second `.unmerge()` changed the base weight. Make "
           "`.unmerge()` do nothing when the layer is not merged.")


@check(
    "dora_linear",
    hint=[
        "DoRA keeps LoRA's A and B and adds one trainable vector, the magnitude m, which starts at the "
        "row norms of the base weight, `base.weight.norm(dim=1)`. The forward rescales each output of the "
        "LoRA-adapted weight W0 + s B A to length m.",
        "Compute the combined weight `V = W0 + scaling * B @ A` and its row norms `n = V.norm(dim=1)`, "
        "detached (`.detach()`, section 4.3). The output is `(m / n) * (x @ V.T) + bias`: the bias is added "
        "after the rescaling. Merging writes `(m / n)[:, None] * V` into the base weight.",
        "From `LoRALinear`'s `adapt(x, result)`: `f = m / n`, `plain = result - bias`, return "
        "`result + (f - 1) * plain + f * scaling * B(A(x))`. `merged_weight(W)`: keep `f` "
        "(`self.merge_factor = f`) and return `f[:, None] * (W + delta)`; `unmerged_weight(W)`: "
        "return `W / self.merge_factor[:, None] - delta`, with `delta = self.get_delta_weight()`.",
    ],
    solution=None,  # the solution notebook's answer, from the exercise manifest
    reference="course.dora:DoRALinear",
)
def dora_linear(answer):
    """``answer`` is a class ``C(base: nn.Linear, r, alpha, dropout=0.0)``: a DoRA layer (eq. 5)."""
    expect(isinstance(answer, type) or callable(answer), "Expected a class C(base, r, alpha, dropout=0.0), "
           f"got {type(answer).__name__}. Pass the class itself: check.dora_linear(DoRALinear).")
    run_on_both_shapes(answer, (_check_construction, _check_forward, _check_gradients, _check_dropout,
                                _check_merge), "dimension each shape and norm uses")

