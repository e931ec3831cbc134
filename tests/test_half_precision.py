"""The course's LoRA layers over a float16 / bfloat16 base with float32 adapters, as on a Colab GPU.

No GPU here, so the GPU's dtype paths run on the CPU: the base layer in half precision, the
factors in float32 (as PEFT keeps them), outside and inside ``torch.autocast``. Each layer is
compared with PEFT's in the very same set-up.

Tolerance: ours and PEFT's cast the input to float32, add the LoRA branch to the half-precision
base output in float32 and round the sum once, so they agree to the bit today. One unit in the
last place of the half dtype (``eps``: 2^-7 for bfloat16, 2^-10 for float16, relative) leaves
room for a harmless reordering; a mistake (the branch rounded before the sum, the wrong dtype,
a missing scaling) is far larger. Gradients of the float32 factors: relative 2 * eps.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from test_lora import _factors  # (A, B) of a course or PEFT layer
from torch import nn

from course.lora import (
    LoRAConv2d,
    LoRAEmbedding,
    LoRALinear,
    MergedLoRALinear,
    adapter_dtype,
    inject_lora,
    mark_only_lora_as_trainable,
)

HALF = [torch.bfloat16, torch.float16]
R, ALPHA = 4, 8.0


def _tol(dtype, factor=1.0):
    eps = torch.finfo(dtype).eps * factor
    return {"rtol": eps, "atol": eps}


def _peft_layer(base: nn.Module) -> nn.Module:
    holder = nn.ModuleDict({"target": copy.deepcopy(base)})
    peft.inject_adapter_in_model(peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["target"]), holder)
    layer = holder["target"]
    for name, p in layer.named_parameters():  # PEFT's get_peft_model does this (autocast_adapter_dtype)
        if "lora_" in name:
            p.data = p.data.float()
    return layer


CASES = {
    "linear": (lambda: nn.Linear(12, 7), lambda: torch.randn(2, 5, 12), LoRALinear),
    "embedding": (lambda: nn.Embedding(20, 6), lambda: torch.randint(0, 20, (3, 9)), LoRAEmbedding),
    "conv2d": (lambda: nn.Conv2d(3, 5, 3, padding=1), lambda: torch.randn(2, 3, 6, 6), LoRAConv2d),
}


def _pair(case, dtype):
    make_base, make_input, course_class = CASES[case]
    torch.manual_seed(0)
    base = make_base().to(dtype)
    ours, theirs = course_class(copy.deepcopy(base), R, ALPHA), _peft_layer(base)
    with torch.no_grad():
        for mine, other in zip(_factors(ours), _factors(theirs), strict=True):
            mine.copy_(torch.randn_like(mine))
            other.copy_(mine)
    x = make_input()
    return ours, theirs, (x.to(dtype) if x.is_floating_point() else x)


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_half_precision_base_float32_adapter_equals_peft(case, dtype, autocast):
    ours, theirs, x = _pair(case, dtype)
    assert all(t.dtype == torch.float32 for t in _factors(ours)), "adapters are made in float32 over a half base"
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        out_ours, out_peft = ours(x), theirs(x)
        assert out_ours.dtype == out_peft.dtype == dtype, "the output keeps the base model's dtype"
        torch.testing.assert_close(out_ours, out_peft, **_tol(dtype))
        upstream = torch.randn_like(out_ours, dtype=torch.float32).to(dtype)
        for out in (out_ours, out_peft):
            (out.float() * upstream.float()).sum().backward()
    for mine, other in zip(_factors(ours), _factors(theirs), strict=True):
        assert mine.grad is not None and mine.grad.dtype == torch.float32
        torch.testing.assert_close(mine.grad, other.grad, **_tol(dtype, 2))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_fused_qkv_in_half_precision_equals_peft_on_separate_projections(dtype):
    torch.manual_seed(0)
    d = 8
    separate = nn.ModuleDict({k: nn.Linear(d, d) for k in "qkv"}).to(dtype)
    fused = nn.Linear(d, 3 * d).to(dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([separate[k].weight for k in "qkv"]))
        fused.bias.copy_(torch.cat([separate[k].bias for k in "qkv"]))
    ours = MergedLoRALinear(fused, R, ALPHA, enable_lora=[True, False, True])
    assert ours.lora_A.weight.dtype == ours.lora_B.dtype == torch.float32
    peft_q, peft_v = _peft_layer(separate["q"]), _peft_layer(separate["v"])
    with torch.no_grad():
        ours.lora_B.normal_()
        for n, layer in enumerate((peft_q, peft_v)):
            layer.lora_A["default"].weight.copy_(ours.lora_A.weight[n * R:(n + 1) * R])
            layer.lora_B["default"].weight.copy_(ours.lora_B[n])
    x = torch.randn(2, 5, d).to(dtype)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=dtype, enabled=autocast), torch.no_grad():
            got = ours(x)
            want = torch.cat([peft_q(x), separate["k"](x), peft_v(x)], dim=-1)
        assert got.dtype == dtype
        # One stacked (2r)-row product against two r-row ones: the float32 sums may round differently.
        torch.testing.assert_close(got, want, **_tol(dtype, 2))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_merge_and_unmerge_over_a_half_precision_base(dtype):
    ours, theirs, x = _pair("linear", dtype)
    W0 = ours.base_layer.weight.detach().clone()
    ours.merge()
    theirs.merge()
    assert ours.base_layer.weight.dtype == dtype
    # PEFT's default merge adds the float32 change to the half weight and rounds once; so do we.
    assert torch.equal(ours.base_layer.weight, theirs.base_layer.weight)
    merged = ours.base_layer.weight.detach().float()
    ours.unmerge()
    # (W0 + D) was rounded once to the half dtype: unmerging gets W0 back up to that rounding
    # (half an ulp of |W0 + D|) plus the final rounding of the difference (half an ulp of |W0|).
    eps = torch.finfo(dtype).eps
    error = (ours.base_layer.weight.float() - W0.float()).abs()
    assert (error <= eps * (merged.abs() + W0.float().abs()) / 2 + 1e-12).all()


def test_adapter_dtype_policy():
    assert adapter_dtype(torch.bfloat16) == adapter_dtype(torch.float16) == torch.float32
    assert adapter_dtype(torch.float32) == torch.float32 and adapter_dtype(torch.float64) == torch.float64


def _tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_a_half_precision_llama_with_lora_on_embeddings_and_attention_trains(dtype, tokenizer):
    from course.data import addition_splits
    from course.train import train

    model = _tiny_llama(len(tokenizer)).to(dtype)
    inject_lora(model, ["embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj"], R, ALPHA)
    mark_only_lora_as_trainable(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.register_hook(lambda g, name=name: grads.update({name: g.dtype}))
    history = train(model, tokenizer, addition_splits(n_train=8, n_eval=1)["train"], steps=2, batch_size=4,
                    lr=1e-2, progress=False)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("embedding" in n for n in trainable) and any("q_proj" in n for n in trainable)
    assert set(grads) == set(trainable) and set(grads.values()) == {torch.float32}
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert all(torch.isfinite(torch.tensor(history.losses)))
    moved = [n for n, p in trainable.items() if not torch.equal(p, before[n])]
    assert moved, "the adapters learned nothing"
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert {p.dtype for p in frozen} == {dtype}, "the base stays in half precision"
    if dtype == torch.float16:
        assert history.loss_scales and history.loss_scales[0] > 1, "float16 training scales the loss"
    else:
        assert history.loss_scales == [], "bfloat16 has float32's range: no loss scaling"
