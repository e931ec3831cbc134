"""course.dora.DoRALinear against PEFT's ``use_dora=True`` layer, on seeded inputs with the same A, B, m.

Tolerances (float32):
- ``CLOSE`` for outputs and gradients. Ours and PEFT's compute the same formula in a
  different order: PEFT forms B A by pushing an identity matrix through both factors and
  adds ``(f - 1) W0 x`` and ``f B A x s`` in separate passes; we use ``addmm`` and
  ``addcmul`` with the scaling folded into ``f``. Each reordering changes a float32 result
  by about one rounding (eps = 1.2e-7, relative); outputs and gradients here are of order
  1 to 10, so rtol 1e-5 / atol 1e-6 is ten times that and still far below any real mistake
  (a wrong scaling or an undetached norm moves gradients by more than 1e-2).
- ``ROUND_TRIP`` for merge then unmerge: ``W' = fl(f V)`` then ``fl(W' / f) - s B A``, a few
  roundings of entries of ``V = W0 + s B A``: atol 4 eps max|V|.
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from course.dora import DoRALinear, row_norm
from course.lora import (
    LoRALinear,
    inject_lora,
    load_peft_adapter,
    lora_state_dict,
    mark_only_lora_as_trainable,
    save_peft_adapter,
)

CLOSE = {"rtol": 1e-5, "atol": 1e-6}
LOGITS = {"rtol": 0, "atol": 1e-5}  # logits of order 10 after 2 layers: float32 rounding is ~1e-6
# On the real model the reorderings of CLOSE (about one rounding per adapted layer) add up over
# 30 layers: 3e-5 measured on logits of order 20. 1e-4 allows that; the adapter moves logits by > 0.1.
REAL_LOGITS = {"rtol": 0, "atol": 1e-4}
R, ALPHA = 4, 8.0
HALF = [torch.bfloat16, torch.float16]


def _peft_dora(base: nn.Module, dropout: float = 0.0) -> nn.Module:
    """PEFT's DoRA layer around a copy of ``base`` (through its public injection API)."""
    holder = nn.ModuleDict({"target": copy.deepcopy(base)})
    config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=["target"], use_dora=True)
    peft.inject_adapter_in_model(config, holder)
    layer = holder["target"]
    for name, p in layer.named_parameters():  # get_peft_model keeps adapters in float32 (autocast_adapter_dtype)
        if "lora_" in name:
            p.data = p.data.float()
    return layer


def _tensors(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, magnitude) of a course or PEFT DoRA layer, as the tensors that hold them."""
    if isinstance(layer, DoRALinear):
        return layer.lora_A.weight, layer.lora_B.weight, layer.magnitude
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_magnitude_vector["default"].weight


def _pair(bias: bool = True, dropout: float = 0.0, dtype=torch.float32):
    """Ours and PEFT's on equal copies of one seeded base, with equal random A, B and a moved magnitude."""
    torch.manual_seed(0)
    base = nn.Linear(12, 7, bias=bias).to(dtype)
    ours, theirs = DoRALinear(copy.deepcopy(base), R, ALPHA, dropout=dropout), _peft_dora(base, dropout)
    with torch.no_grad():
        A, B, m = _tensors(ours)
        A.normal_()
        B.normal_(0, 0.3)
        m.mul_(torch.rand_like(m) + 0.5)
        for mine, other in zip(_tensors(ours), _tensors(theirs), strict=True):
            other.copy_(mine)
    return base, ours, theirs, torch.randn(2, 5, 12).to(dtype)


def test_a_new_layer_is_the_base_layer_with_peft_s_magnitude():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    ours, theirs = DoRALinear(copy.deepcopy(base), R, ALPHA), _peft_dora(base)
    torch.testing.assert_close(ours.magnitude, base.weight.norm(dim=1), **CLOSE)
    torch.testing.assert_close(ours.magnitude, _tensors(theirs)[2], **CLOSE)
    x = torch.randn(3, 12)
    assert torch.equal(ours(x), base(x))  # f = m / ||W0|| = 1 exactly, B = 0
    assert ours.magnitude is ours.lora_magnitude_vector


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_forward_and_gradients_equal_peft(bias):
    _, ours, theirs, x = _pair(bias)
    outputs, grads_x = [], []
    torch.manual_seed(1)
    upstream = torch.randn(2, 5, 7)
    for layer in (ours, theirs):
        x_in = x.clone().requires_grad_(True)
        out = layer(x_in)
        (out * upstream).sum().backward()
        outputs.append(out)
        grads_x.append(x_in.grad)
    torch.testing.assert_close(outputs[0], outputs[1], **CLOSE)
    assert (outputs[0] - theirs.base_layer(x)).abs().max() > 0.1  # the adapter matters
    torch.testing.assert_close(grads_x[0], grads_x[1], **CLOSE)
    for name, mine, other in zip("ABm", _tensors(ours), _tensors(theirs), strict=True):
        assert mine.grad is not None and mine.grad.abs().sum() > 0, name
        torch.testing.assert_close(mine.grad, other.grad, **CLOSE, msg=f"gradient of {name}")


def test_the_norm_is_detached_as_in_section_4_3():
    """An explicit formula: gradients equal eq. 5 with the norm a constant, not with it differentiated."""
    base, ours, _, x = _pair()
    A, B, m = (t.detach().clone().requires_grad_() for t in _tensors(ours))

    def eq5(detach: bool) -> torch.Tensor:
        V = base.weight + (ALPHA / R) * B @ A
        norm = row_norm(V).detach() if detach else row_norm(V)
        return nn.functional.linear(x, V) * (m / norm) + base.bias

    ours(x).sum().backward()
    for detach, same in ((True, True), (False, False)):
        A.grad = B.grad = m.grad = None
        eq5(detach).sum().backward()
        assert torch.allclose(ours.lora_A.weight.grad, A.grad, **CLOSE) is same
        assert torch.allclose(ours.lora_B.weight.grad, B.grad, **CLOSE) is same
    torch.testing.assert_close(ours.magnitude.grad, m.grad, **CLOSE)


def test_dropout_in_training_equals_peft_with_the_same_seed():
    _, ours, theirs, x = _pair(dropout=0.5)
    ours.train(), theirs.train()
    torch.manual_seed(3)
    mine = ours(x)
    torch.manual_seed(3)
    torch.testing.assert_close(mine, theirs(x), **CLOSE)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), **CLOSE)
    assert not torch.allclose(ours(x), mine)  # dropout did something in training


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_merge_equals_peft_and_unmerge_restores_the_base(bias):
    base, ours, theirs, x = _pair(bias)
    before = ours(x).detach()
    ours.merge()
    theirs.merge()
    assert ours.merged
    torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight, **CLOSE)
    # Each merged row has norm m: the decomposition made literal.
    torch.testing.assert_close(row_norm(ours.base_layer.weight), ours.magnitude.detach(), **CLOSE)
    torch.testing.assert_close(ours(x), before, **CLOSE)
    assert torch.equal(ours(x), ours.base_layer(x))
    merged = ours.base_layer.weight.detach().clone()
    ours.merge()
    assert torch.equal(ours.base_layer.weight, merged)  # a second merge changes nothing

    ours.unmerge()
    assert not ours.merged and ours.merge_factor is None
    V = base.weight + ours.get_delta_weight().detach()
    round_trip = {"rtol": 0, "atol": 4 * torch.finfo(torch.float32).eps * V.abs().max().item()}
    torch.testing.assert_close(ours.base_layer.weight, base.weight, **round_trip)
    ours.unmerge()
    torch.testing.assert_close(ours.base_layer.weight, base.weight, **round_trip)
    torch.testing.assert_close(ours(x), before, **CLOSE)


def test_merge_on_eval_and_a_second_round_trip():
    _, ours, _, x = _pair()
    layer = DoRALinear(copy.deepcopy(ours.base_layer), R, ALPHA, merge_on_eval=True)
    layer.load_state_dict(ours.state_dict())
    w0 = layer.base_layer.weight.detach().clone()
    for _ in range(2):
        nn.Sequential(layer).eval()
        assert layer.merged
        torch.testing.assert_close(layer(x), ours(x), **CLOSE)
        layer.train()
        assert not layer.merged
        torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_base_equals_peft(dtype):
    """Over a half-precision base, as on a GPU; float32 A, B and m. Tolerance: one ulp of the half
    dtype (its eps, relative), the rounding of the final cast, as in tests/test_half_precision.py."""
    _, ours, theirs, x = _pair(dtype=dtype)
    assert all(t.dtype == torch.float32 for t in _tensors(ours))
    eps = torch.finfo(dtype).eps
    out_ours, out_peft = ours(x), theirs(x)
    assert out_ours.dtype == dtype
    torch.testing.assert_close(out_ours, out_peft, rtol=eps, atol=eps)
    for out in (out_ours, out_peft):
        out.float().sum().backward()
    for mine, other in zip(_tensors(ours), _tensors(theirs), strict=True):
        torch.testing.assert_close(mine.grad, other.grad, rtol=2 * eps, atol=2 * eps)
    ours.merge()
    theirs.merge()
    assert ours.base_layer.weight.dtype == dtype
    torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight, rtol=eps, atol=eps)


# ---------------------------------------------------------------------------
# In a model: injecting, freezing, PEFT's file format
# ---------------------------------------------------------------------------


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config)


def _randomise(model, std=0.1):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + std * torch.randn_like(p))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_inject_and_mark_trainable_train_the_magnitude():
    model = inject_lora(_tiny_llama(), ["q_proj", "v_proj"], R, ALPHA, layer=DoRALinear)
    mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.{k}.{t}" for i in (0, 1) for k in ("q_proj", "v_proj")
                         for t in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")}
    assert {k for k in lora_state_dict(model) if "magnitude" in k} == {
        f"model.layers.{i}.self_attn.{k}.lora_magnitude_vector" for i in (0, 1) for k in ("q_proj", "v_proj")}


def test_course_dora_adapter_loads_in_peft_and_back(tmp_path):
    ids = torch.randint(0, 64, (2, 7))
    model = inject_lora(_tiny_llama(), ["q_proj", "v_proj", "down_proj"], R, ALPHA, layer=DoRALinear)
    _randomise(model)
    ours = _logits(model, ids)
    assert (ours - _logits(_tiny_llama(), ids)).abs().max() > 1e-3  # the adapter matters

    directory = save_peft_adapter(model, tmp_path / "dora")
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    theirs = PeftModel.from_pretrained(_tiny_llama(), directory)
    assert isinstance(theirs.base_model.model.model.layers[0].mlp.down_proj.lora_magnitude_vector["default"],
                      nn.Module)
    torch.testing.assert_close(_logits(theirs, ids), ours, **LOGITS)

    again = load_peft_adapter(_tiny_llama(), directory)
    assert isinstance(again.model.layers[1].self_attn.v_proj, DoRALinear)
    torch.testing.assert_close(_logits(again, ids), ours, **LOGITS)


def test_peft_dora_adapter_loads_into_course_layers(tmp_path):
    ids = torch.randint(0, 64, (2, 7))
    peft_model = get_peft_model(_tiny_llama(), LoraConfig(r=2, lora_alpha=8, target_modules=["k_proj", "up_proj"],
                                                          use_dora=True, use_rslora=True))
    _randomise(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = load_peft_adapter(_tiny_llama(), tmp_path / "peft")
    layer = ours.model.layers[0].mlp.up_proj
    assert isinstance(layer, DoRALinear) and layer.scaling == 8 / 2**0.5
    torch.testing.assert_close(_logits(ours, ids), _logits(peft_model, ids), **LOGITS)


def test_a_dora_adapter_on_an_embedding_is_refused_with_a_reason(tmp_path):
    peft_model = get_peft_model(_tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens"],
                                                          use_dora=True))
    peft_model.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    with pytest.raises(ValueError, match="DoRALinear handles nn.Linear layers only"):
        load_peft_adapter(_tiny_llama(), tmp_path / "peft")


def test_lora_and_dora_layers_cannot_share_one_adapter_file(tmp_path):
    model = inject_lora(_tiny_llama(), ["q_proj"], R, ALPHA, layer=DoRALinear)
    inject_lora(model, ["v_proj"], R, ALPHA, layer=LoRALinear)
    with pytest.raises(ValueError, match="mixes LoRA variants"):
        save_peft_adapter(model, tmp_path / "a")


# ---------------------------------------------------------------------------
# On the real base model (the session fixture), both ways
# ---------------------------------------------------------------------------


@pytest.mark.model
def test_round_trips_on_the_real_base_model(base_model, tokenizer, tmp_path):
    ids = tokenizer(["DoRA trains a magnitude and a direction."], return_tensors="pt").input_ids
    base_logits = _logits(base_model, ids)
    model = inject_lora(copy.deepcopy(base_model), ["q_proj", "v_proj"], r=4, alpha=8, layer=DoRALinear)
    _randomise(model, std=0.05)
    ours = _logits(model, ids)
    assert (ours - base_logits).abs().max() > 0.1
    directory = save_peft_adapter(model, tmp_path / "ours", task_type="CAUSAL_LM")
    del model
    theirs = PeftModel.from_pretrained(copy.deepcopy(base_model), directory)
    torch.testing.assert_close(_logits(theirs, ids), ours, **REAL_LOGITS)
    theirs.save_pretrained(tmp_path / "peft")  # and PEFT's own file of the same adapter, read back
    del theirs
    again = load_peft_adapter(copy.deepcopy(base_model), tmp_path / "peft")
    torch.testing.assert_close(_logits(again, ids), ours, **LOGITS)  # the same course layers and tensors
