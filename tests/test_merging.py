"""course.merging against PEFT (``peft.utils.merge_utils`` and ``add_weighted_adapter``) on seeded inputs.

Tolerances:
- ``SAME_OPS``: task arithmetic, TIES and DARE run PEFT's operations in PEFT's order on the
  same float32 tensors (and DARE draws the same masks from the same random state), so they
  agree to the bit today; torch's float32 default (rtol 1.3e-6, atol 1e-5) leaves room for a
  harmless reordering in a later PEFT, far below what any mistake changes (order 1).
- ``SVD``: a float32 SVD reconstructs a matrix up to ~ n * eps * ||delta|| (n = 64 here,
  eps = 1.2e-7, entries of order 10): atol 1e-4 on entries up to ~10, relative 1e-5.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from peft.utils import merge_utils
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from course import merging

SAME_OPS = {"rtol": 1.3e-6, "atol": 1e-5}
SVD = {"rtol": 1e-5, "atol": 1e-4}
WEIGHTS = [1.0, 0.5, -0.7]


def _deltas(shape=(12, 10), n=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) for _ in range(n)]


def _peft(fn, *args):
    with warnings.catch_warnings():  # PEFT warns when density >= 1 ("no pruning will be performed")
        warnings.simplefilter("ignore")
        return fn(*args)


# ---------------------------------------------------------------------------
# The merges, tensor by tensor
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(12, 10), (7,), (2, 5, 4)])
def test_task_arithmetic_equals_peft(shape):
    deltas = _deltas(shape)
    ours = merging.task_arithmetic(deltas, WEIGHTS)
    torch.testing.assert_close(ours, merge_utils.task_arithmetic(deltas, torch.tensor(WEIGHTS)), **SAME_OPS)
    torch.testing.assert_close(ours, sum(w * d for w, d in zip(WEIGHTS, deltas, strict=True)), **SAME_OPS)


@pytest.mark.parametrize("density", [0.1, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(12, 10), (2, 5, 4)])
def test_ties_merge_equals_peft(density, shape):
    deltas = _deltas(shape, seed=1)
    want = _peft(merge_utils.ties, deltas, torch.tensor(WEIGHTS), density, "total")
    torch.testing.assert_close(merging.ties_merge(deltas, WEIGHTS, density), want, **SAME_OPS)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_magnitude_prune_equals_peft(density):
    delta = _deltas(n=1)[0]
    want = _peft(merge_utils.prune, delta, density, "magnitude")
    assert torch.equal(merging.magnitude_prune(delta, density), want)
    assert (merging.magnitude_prune(delta, density) != 0).sum() == int(density * delta.numel())


@pytest.mark.parametrize("density", [0.3, 0.7, 1.0])
def test_dare_prune_equals_peft_under_the_same_random_state(density):
    delta = _deltas(n=1)[0]
    torch.manual_seed(5)
    want = _peft(merge_utils.prune, delta, density, "random", True)
    after_peft = torch.rand(1)
    torch.manual_seed(5)
    torch.testing.assert_close(merging.dare_prune(delta, density), want, **SAME_OPS)
    assert torch.equal(torch.rand(1), after_peft), "DARE must draw from the generator exactly as PEFT does"


@pytest.mark.parametrize("density", [0.3, 0.7, 1.0])
@pytest.mark.parametrize(("ties", "peft_merge"), [(False, merge_utils.dare_linear), (True, merge_utils.dare_ties)])
def test_dare_merge_equals_peft_under_the_same_random_state(density, ties, peft_merge):
    deltas = _deltas(seed=2)
    torch.manual_seed(7)
    want = _peft(peft_merge, deltas, torch.tensor(WEIGHTS), density)
    torch.manual_seed(7)
    torch.testing.assert_close(merging.dare_merge(deltas, WEIGHTS, density, ties=ties), want, **SAME_OPS)


def test_dare_prune_keeps_the_expectation():
    # 20,000 draws of one entry each: the kept share has standard deviation sqrt(0.3 * 0.7 / 20000) = 0.0032,
    # and the mean of the result (delta = 1) sqrt(0.7 / (0.3 * 20000)) = 0.011. Tolerances: 5 of each.
    torch.manual_seed(0)
    out = merging.dare_prune(torch.ones(20_000), 0.3)
    assert abs((out != 0).float().mean().item() - 0.3) < 0.016
    assert torch.equal(out[out != 0], torch.full_like(out[out != 0], 1 / 0.3))
    assert abs(out.mean().item() - 1) < 0.055


def test_ties_keeps_only_entries_that_agree_with_the_elected_sign():
    a = torch.tensor([3.0, -1.0, 2.0, 0.5])
    b = torch.tensor([-1.0, -2.0, 2.0, -4.0])
    # density 1: no trimming. Elected signs +, -, +, -; agreeing entries averaged (weights 1).
    assert torch.equal(merging.ties_merge([a, b], [1.0, 1.0], 1.0), torch.tensor([3.0, -1.5, 2.0, -4.0]))


def test_merges_do_not_change_their_inputs():
    deltas = _deltas()
    copies = [d.clone() for d in deltas]
    merging.task_arithmetic(deltas, WEIGHTS)
    merging.ties_merge(deltas, WEIGHTS, 0.5)
    merging.dare_merge(deltas, WEIGHTS, 0.5, ties=True)
    assert all(torch.equal(d, c) for d, c in zip(deltas, copies, strict=True))


@pytest.mark.parametrize(("call", "phrase"), [
    (lambda: merging.task_arithmetic([], []), "at least one"),
    (lambda: merging.task_arithmetic(torch.zeros(2, 3), [1.0, 1.0]), "list of tensors"),
    (lambda: merging.task_arithmetic([torch.zeros(2, 3), torch.zeros(3, 2)], [1.0, 1.0]), "same shape"),
    (lambda: merging.task_arithmetic([torch.zeros(2, 3)] * 2, [1.0]), "one weight per delta"),
    (lambda: merging.ties_merge([torch.zeros(2, 3)], [1.0], 0.0), "(0, 1]"),
    (lambda: merging.dare_prune(torch.zeros(2, 3), 1.5), "(0, 1]"),
    (lambda: merging.svd_truncate(torch.zeros(4, 3), 4), "from 1 to min(out, in) = 3"),
    (lambda: merging.svd_truncate(torch.zeros(4, 3, 2), 1), "shape (out, in)"),
])
def test_bad_input_says_what_to_do(call, phrase):
    with pytest.raises((ValueError, TypeError)) as error:
        call()
    assert phrase in str(error.value)


# ---------------------------------------------------------------------------
# svd_truncate
# ---------------------------------------------------------------------------


def _low_rank(out, inp, r, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out, r, generator=generator) @ torch.randn(r, inp, generator=generator)


@pytest.mark.parametrize("r", [1, 4, 8])
def test_svd_truncate_of_two_rank_r_changes_at_rank_2r_is_exact(r):
    delta = _low_rank(64, 48, r, 0) + _low_rank(64, 48, r, 1)
    A, B = merging.svd_truncate(delta, 2 * r)
    assert A.shape == (2 * r, 48) and B.shape == (64, 2 * r)
    torch.testing.assert_close(B @ A, delta, **SVD)


def test_svd_truncate_at_rank_r_loses_exactly_the_dropped_singular_values():
    delta = _low_rank(64, 48, 8, 0) + _low_rank(64, 48, 8, 1)
    A, B = merging.svd_truncate(delta, 8)
    s = torch.linalg.svdvals(delta)
    # Eckart-Young: the error's squared Frobenius norm is the energy of the dropped singular values.
    torch.testing.assert_close((delta - B @ A).norm() ** 2, (s[8:] ** 2).sum(), rtol=1e-4, atol=1e-3)
    assert (delta - B @ A).norm() > 0.1 * delta.norm()


def test_svd_truncate_of_half_precision_gives_float32_factors():
    delta = _low_rank(16, 12, 2, 0).to(torch.bfloat16)
    A, B = merging.svd_truncate(delta, 2)
    assert A.dtype == B.dtype == torch.float32
    # Rounding to bfloat16 adds full-rank noise of at most 2^-9 of each entry: the rank-2 part is
    # what is left, within that noise's norm.
    assert (B @ A - delta.float()).norm() <= 2**-9 * delta.float().norm()


# ---------------------------------------------------------------------------
# PEFT's add_weighted_adapter on a tiny model: what the notebook shows on the real one
# ---------------------------------------------------------------------------


def _tiny_two_adapters():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    model = LlamaForCausalLM(config)
    first = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    second = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(model, first, adapter_name="one")
    peft_model.add_adapter("two", second)
    return peft_model


def _layer(peft_model):
    return peft_model.base_model.model.model.layers[0].self_attn.q_proj


def test_peft_cat_is_the_weighted_sum_of_weight_changes_and_linear_is_not():
    peft_model = _tiny_two_adapters()
    weights = [1.0, 0.6]
    peft_model.add_weighted_adapter(["one", "two"], weights, "cat", combination_type="cat")
    peft_model.add_weighted_adapter(["one", "two"], weights, "linear", combination_type="linear")
    layer = _layer(peft_model)
    deltas = [layer.get_delta_weight(name) for name in ("one", "two")]
    want = merging.task_arithmetic(deltas, weights)
    torch.testing.assert_close(layer.get_delta_weight("cat"), want, **SAME_OPS)
    linear = layer.get_delta_weight("linear")
    assert (linear - want).norm() > 0.1 * want.norm()
    # what linear does: the factors are merged, with sqrt(weight * scaling) on each side
    roots = [(w * layer.scaling[name]) ** 0.5 for w, name in zip(weights, ("one", "two"), strict=True)]
    A = merging.task_arithmetic([layer.lora_A[n].weight for n in ("one", "two")], roots)
    B = merging.task_arithmetic([layer.lora_B[n].weight for n in ("one", "two")], roots)
    torch.testing.assert_close(linear, B @ A, **SAME_OPS)


def test_peft_ties_merges_the_factors_as_our_ties_merge_does():
    peft_model = _tiny_two_adapters()
    weights, density = [1.0, 0.6], 0.5
    peft_model.add_weighted_adapter(["one", "two"], weights, "ties", combination_type="ties", density=density)
    layer = _layer(peft_model)
    roots = [(w * layer.scaling[name]) ** 0.5 for w, name in zip(weights, ("one", "two"), strict=True)]
    A = merging.ties_merge([layer.lora_A[n].weight for n in ("one", "two")], roots, density)
    B = merging.ties_merge([layer.lora_B[n].weight for n in ("one", "two")], roots, density)
    torch.testing.assert_close(layer.lora_A["ties"].weight, A, **SAME_OPS)
    torch.testing.assert_close(layer.lora_B["ties"].weight, B, **SAME_OPS)


def test_peft_svd_equals_svd_truncate_of_task_arithmetic():
    peft_model = _tiny_two_adapters()
    weights = [1.0, 0.6]
    peft_model.add_weighted_adapter(["one", "two"], weights, "svd8", combination_type="svd", svd_rank=8)
    peft_model.add_weighted_adapter(["one", "two"], weights, "svd4", combination_type="svd", svd_rank=4)
    layer = _layer(peft_model)
    want = merging.task_arithmetic([layer.get_delta_weight(n) for n in ("one", "two")], weights)
    torch.testing.assert_close(layer.get_delta_weight("svd8"), want, **SVD)  # rank 2r: exact
    A, B = merging.svd_truncate(want, 4)
    torch.testing.assert_close(layer.get_delta_weight("svd4"), B @ A, **SVD)  # rank r: the same truncation
    assert (B @ A - want).norm() > 0.05 * want.norm()


# ---------------------------------------------------------------------------
# compare_models
# ---------------------------------------------------------------------------


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50)
    return LlamaForCausalLM(config).eval()


def test_compare_models_of_a_model_with_itself():
    model = _tiny_model()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    result = merging.compare_models(model, copy.deepcopy(model), ids)
    assert result.max_logit_diff == 0 and result.top1_agreement == 1 and result.mean_kl == 0
    assert result.positions == 14
    # One name for the result, apart from course.evidence's statistical Comparison of two arms.
    assert isinstance(result, merging.ModelComparison) and not hasattr(merging, "Comparison")
    assert str(result).startswith("max |logit diff| 0, top-1 agreement 100.0%")


def test_compare_models_against_an_explicit_computation():
    a, b = _tiny_model(0), _tiny_model(1)
    ids = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding in the first row: those positions must not count
    result = merging.compare_models(a, b, {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        la = a(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        lb = b(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    kl = nn.functional.kl_div(lb.log_softmax(-1), la.log_softmax(-1), log_target=True, reduction="batchmean")
    assert result.positions == 16
    assert result.max_logit_diff == pytest.approx((la - lb).abs().max().item(), rel=1e-6)
    assert result.top1_agreement == pytest.approx((la.argmax(-1) == lb.argmax(-1)).float().mean().item())
    assert result.mean_kl == pytest.approx(kl.item(), rel=1e-4)
    assert result.mean_kl > 0 and "top-1 agreement" in str(result)


def test_compare_models_refuses_inputs_without_token_ids():
    model = _tiny_model()
    with pytest.raises(ValueError, match="input_ids"):
        merging.compare_models(model, model, {"attention_mask": torch.ones(1, 3)})
