"""course.olora against PEFT's ``init_lora_weights="olora"`` and its OLoRA-to-LoRA conversion.

Tolerances:
- ``olora_init`` runs PEFT's very operations in PEFT's order (QR in float32, ``(s * B) @ A``),
  so A, B and the residual are compared bit for bit (``torch.equal``).
- Outputs of an OLoRA-initialised model against the base model: the layer computes
  ``W_res x + s B0 A0 x`` instead of ``W x``; in float32 the two differ by rounding, about
  eps * |W| * sqrt(in) per layer (eps = 1.2e-7), so 1e-5 on the tiny models' outputs of order 1
  and 1e-3 on SmolLM2's logits of order 10-30 (measured: 1e-4) is ample, and far below what a
  missing residual or scaling would change (order 1).
- Converted (rank 2r on the original W) against trained OLoRA (rank r on W_res): the same
  function computed in another order, ``W x + s (B1 A1 - B0 A0) x`` against
  ``(W - s B0 A0) x + s B1 A1 x``; same bounds as above.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import peft
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from course.lora import (
    LoRALinear,
    inject_lora,
    load_peft_adapter,
    lora_layers,
    mark_only_lora_as_trainable,
    save_peft_adapter,
)
from course.olora import OLoRALinear, olora_init, olora_to_lora, to_lora

R, ALPHA = 4, 6.0  # scaling 1.5: not a power of two, so the order of (s * B) @ A matters to the bit
TINY_TOL = {"rtol": 1e-5, "atol": 1e-5}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]


def _peft_layer(base: nn.Linear, r=R, alpha=ALPHA, **options) -> nn.Module:
    holder = nn.ModuleDict({"target": copy.deepcopy(base)})
    peft.inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, target_modules=["target"],
                                            init_lora_weights="olora", **options), holder)
    return holder["target"]


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


def _ids():
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def _train_a_little(model: nn.Module, seed: int = 0) -> None:
    """Stand-in for training: move every LoRA factor by a seeded random step."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=generator).to(p.dtype))


# ---------------------------------------------------------------------------
# olora_init and OLoRALinear equal PEFT
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(12, 12), (12, 7), (7, 12)], ids=["square", "wide-in", "wide-out"])
def test_olora_init_equals_peft_bit_for_bit(shape):
    torch.manual_seed(0)
    base = nn.Linear(*shape)
    theirs = _peft_layer(base)
    A, B, residual = olora_init(base.weight, R, ALPHA / R)
    assert torch.equal(A, theirs.lora_A["default"].weight)
    assert torch.equal(B, theirs.lora_B["default"].weight)
    assert torch.equal(residual, theirs.base_layer.weight)
    assert not torch.allclose(residual, base.weight)  # the base weight really changes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_olora_init_equals_peft_in_half_precision(dtype):
    # Through get_peft_model, which keeps the factors in float32 (after their pass through the base dtype).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12)).to(dtype)
    weight = model[0].weight.detach().clone()
    peft_model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0"],
                                                  init_lora_weights="olora"))
    theirs = peft_model.base_model.model[0]
    A, B, residual = olora_init(weight, R, ALPHA / R)
    assert A.dtype == B.dtype == residual.dtype == dtype
    assert theirs.lora_A["default"].weight.dtype == torch.float32
    assert torch.equal(A.float(), theirs.lora_A["default"].weight)
    assert torch.equal(B.float(), theirs.lora_B["default"].weight)
    assert torch.equal(residual, theirs.base_layer.weight)


def test_olora_linear_equals_peft_layer_forward_and_gradients():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    ours, theirs = OLoRALinear(copy.deepcopy(base), R, ALPHA), _peft_layer(base)
    assert torch.equal(ours.base_layer.weight, theirs.base_layer.weight)
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(ours(x), base(x), **TINY_TOL)  # starts as the base layer
    out_ours, out_theirs = ours(x), theirs(x)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1.3e-6, atol=1e-6)  # same ops, same order
    upstream = torch.randn_like(out_ours)
    (out_ours * upstream).sum().backward()
    (out_theirs * upstream).sum().backward()
    torch.testing.assert_close(ours.lora_A.weight.grad, theirs.lora_A["default"].weight.grad, rtol=1.3e-6, atol=1e-6)
    torch.testing.assert_close(ours.lora_B.weight.grad, theirs.lora_B["default"].weight.grad, rtol=1.3e-6, atol=1e-6)
    assert ours.lora_A.weight.grad.abs().sum() > 0 and ours.lora_B.weight.grad.abs().sum() > 0


def test_olora_linear_over_bfloat16_base_keeps_float32_factors():
    torch.manual_seed(0)
    base = nn.Linear(16, 12).to(torch.bfloat16)
    layer = OLoRALinear(copy.deepcopy(base), R, ALPHA)
    A, B, residual = olora_init(base.weight, R, ALPHA / R)
    assert layer.lora_A.weight.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    assert torch.equal(layer.lora_A.weight, A.float()) and torch.equal(layer.base_layer.weight, residual)
    x = torch.randn(4, 16).to(torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    # bfloat16: 8 significant bits; the residual and the product are each rounded once.
    torch.testing.assert_close(layer(x).float(), base(x).float(), rtol=0.02, atol=0.02)


def test_whole_model_initialisation_equals_base_outputs():
    base = _tiny_llama()
    model = inject_lora(copy.deepcopy(base), TARGETS, R, ALPHA, layer=OLoRALinear)
    layers = lora_layers(model)
    assert len(layers) == 2 * len(TARGETS) and all(isinstance(m, OLoRALinear) for m in layers.values())
    changed = [name for name, m in layers.items()
               if not torch.equal(m.base_layer.weight, base.get_submodule(name).weight)]
    assert changed == list(layers)  # every targeted base weight is now a residual
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, **TINY_TOL)


def test_inject_failure_says_to_reload():
    model = _tiny_llama()
    with pytest.raises(ValueError, match="load the base model again"):
        inject_lora(model, ["q_proj", "k_proj"], 20, 40, layer=OLoRALinear)  # k_proj is 16 wide


def test_olora_init_refuses_bad_input():
    with pytest.raises(TypeError, match="floating-point"):
        olora_init(torch.zeros(4, 4, dtype=torch.int8), 2, 1.0)
    with pytest.raises(ValueError, match="min\\(out, in\\)"):
        olora_init(torch.zeros(4, 6), 5, 1.0)


# ---------------------------------------------------------------------------
# Saving an OLoRA model as it is: PEFT redoes the QR on a pristine base
# ---------------------------------------------------------------------------


def test_saved_olora_adapter_loads_on_a_pristine_base(tmp_path):
    base = _tiny_llama()
    model = inject_lora(copy.deepcopy(base), TARGETS, R, ALPHA, layer=OLoRALinear)
    _train_a_little(model)
    save_peft_adapter(model, tmp_path / "olora")
    config = json.loads((tmp_path / "olora" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "olora"
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
        # PEFT turns the pristine base into the same residual when it builds the layers, then loads A and B.
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "olora")
        torch.testing.assert_close(theirs(ids).logits, want, rtol=0, atol=0)
        ours = load_peft_adapter(copy.deepcopy(base), tmp_path / "olora")
        assert all(isinstance(m, OLoRALinear) for m in lora_layers(ours).values())
        torch.testing.assert_close(ours(ids).logits, want, rtol=0, atol=0)


def test_failed_olora_load_leaves_the_model_unchanged(tmp_path):
    model = inject_lora(_tiny_llama(), TARGETS, R, ALPHA, layer=OLoRALinear)
    save_peft_adapter(model, tmp_path / "olora")
    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="another base model"):
        load_peft_adapter(other, tmp_path / "olora")  # up_proj is 40 wide there, not 48
    after = other.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------
# Conversion to plain LoRA of rank 2r, against PEFT's
# ---------------------------------------------------------------------------


def test_olora_to_lora_is_the_change_training_made():
    generator = torch.Generator().manual_seed(0)
    A0, B0, A1, B1 = (torch.randn(*s, generator=generator) for s in ((3, 7), (5, 3), (3, 7), (5, 3)))
    A, B = olora_to_lora(A0, B0, A1, B1)
    assert A.shape == (6, 7) and B.shape == (5, 6)
    torch.testing.assert_close(B @ A, B1 @ A1 - B0 @ A0)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_converted_model_equals_trained_olora_and_peft_conversion(tmp_path, rslora):
    base = _tiny_llama()
    model = inject_lora(copy.deepcopy(base), TARGETS, R, ALPHA, layer=OLoRALinear, rslora=rslora)
    _train_a_little(model)
    converted = to_lora(model, copy.deepcopy(base))
    layers = lora_layers(converted)
    assert all(type(m) is LoRALinear and m.r == 2 * R for m in layers.values())
    assert all(math.isclose(m.scaling, ALPHA / (math.sqrt(R) if rslora else R)) for m in layers.values())
    ids = _ids()
    with torch.no_grad():
        trained = model(ids).logits
        torch.testing.assert_close(converted(ids).logits, trained, **TINY_TOL)
        assert not torch.allclose(trained, base(ids).logits, atol=1e-3)  # training changed something

    save_peft_adapter(converted, tmp_path / "ours")
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        torch.testing.assert_close(loaded(ids).logits, trained, **TINY_TOL)

    # PEFT's own conversion of the same adapter: its initial adapter saved before "training", the
    # trained factors copied in, then save_pretrained(path_initial_model_for_weight_conversion=...).
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                                                 init_lora_weights="olora", use_rslora=rslora))
    peft_model.save_pretrained(tmp_path / "initial")
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            theirs = peft_model.base_model.model.get_submodule(name)
            assert torch.equal(theirs.base_layer.weight, layer.base_layer.weight)
            theirs.lora_A["default"].weight.copy_(layer.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(layer.lora_B.weight)
    with pytest.warns(UserWarning, match="OLoRA changes the base weights"):
        peft_model.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    ours, theirs = load_file(tmp_path / "ours" / "adapter_model.safetensors"), load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key in ours:  # the same concatenation in the same order: equal to the bit
        assert torch.equal(ours[key], theirs[key]), key
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in ("r", "use_rslora", "init_lora_weights"):
        assert ours_config[key] == peft_config[key], key
    assert math.isclose(ours_config["lora_alpha"], peft_config["lora_alpha"])


def test_converted_adapter_works_next_to_another_adapter(tmp_path):
    base = _tiny_llama()
    model = inject_lora(copy.deepcopy(base), TARGETS, R, ALPHA, layer=OLoRALinear)
    _train_a_little(model)
    save_peft_adapter(to_lora(model, copy.deepcopy(base)), tmp_path / "converted")
    other = inject_lora(copy.deepcopy(base), ["q_proj", "v_proj"], R, ALPHA)
    _train_a_little(other, seed=1)
    save_peft_adapter(other, tmp_path / "other")
    ids = _ids()
    with torch.no_grad():
        both = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "converted", adapter_name="converted")
        both.load_adapter(tmp_path / "other", adapter_name="other")
        torch.testing.assert_close(both(ids).logits, model(ids).logits, **TINY_TOL)
        both.set_adapter("other")
        torch.testing.assert_close(both(ids).logits, other(ids).logits, **TINY_TOL)


def test_to_lora_refuses_rslora_with_patterns():
    model = _tiny_llama()
    inject_lora(model, ["q_proj", "v_proj"], R, ALPHA, layer=OLoRALinear, rslora=True)
    inject_lora(model, ["up_proj"], 2 * R, ALPHA, layer=OLoRALinear, rslora=True)  # a rank_pattern
    with pytest.raises(ValueError, match="rsLoRA.*rank_pattern"):
        to_lora(model, _tiny_llama())


def test_peft_refuses_the_same_case(tmp_path):
    # The case the course refuses is the one PEFT's conversion refuses.
    with pytest.warns(UserWarning, match="rank_pattern"):
        config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], init_lora_weights="olora",
                            use_rslora=True, rank_pattern={"v_proj": 2 * R})
    peft_model = get_peft_model(_tiny_llama(), config)
    peft_model.save_pretrained(tmp_path / "initial")
    with pytest.raises(ValueError, match="use_rslora"):
        peft_model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))


def test_to_lora_refuses_a_mutated_base_and_leaves_the_model_alone():
    base = _tiny_llama()
    model = inject_lora(copy.deepcopy(base), TARGETS, R, ALPHA, layer=OLoRALinear)
    _train_a_little(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mutated = inject_lora(copy.deepcopy(base), TARGETS, R, ALPHA, layer=OLoRALinear)
    with pytest.raises(ValueError, match="LoRA layer|plain nn.Linear"):
        to_lora(model, mutated)
    residual_base = copy.deepcopy(base)  # plain nn.Linear layers, but holding OLoRA's residuals
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            residual_base.get_submodule(name).weight.copy_(layer.base_layer.weight)
    with pytest.raises(ValueError, match="residual"):
        to_lora(model, residual_base)
    last = sorted(lora_layers(model))[-1]  # only the last layer wrong: nothing at all may change
    half = copy.deepcopy(base).requires_grad_(True)
    with torch.no_grad():
        half.get_submodule(last).weight.copy_(model.get_submodule(last).base_layer.weight)
    with pytest.raises(ValueError, match="residual"):
        to_lora(model, half)
    assert not lora_layers(half) and all(p.requires_grad for p in half.parameters())
    to_lora(model, copy.deepcopy(base))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="no OLoRA layers"):
        to_lora(base, copy.deepcopy(base))


# ---------------------------------------------------------------------------
# The real model, once
# ---------------------------------------------------------------------------


@pytest.mark.model
def test_trained_smollm2_converts_to_lora_on_the_pristine_base(base_model, tokenizer, tmp_path):
    from course.data import addition_splits
    from course.train import train

    model = inject_lora(copy.deepcopy(base_model), ["q_proj", "v_proj"], 8, 16, layer=OLoRALinear)
    ids = tokenizer(["What is 12+34? Reply with the number only."], return_tensors="pt")
    with torch.no_grad():
        base_logits = base_model(**ids).logits
        torch.testing.assert_close(model(**ids).logits, base_logits, rtol=0, atol=1e-3)
    mark_only_lora_as_trainable(model)
    train(model, tokenizer, addition_splits()["train"], steps=2, batch_size=2, lr=2e-4, progress=False)
    converted = to_lora(model, copy.deepcopy(base_model))
    save_peft_adapter(converted, tmp_path / "converted")
    with torch.no_grad():
        trained = model(**ids).logits
        assert (trained - base_logits).abs().max() > 1e-2  # two steps did change the model
        torch.testing.assert_close(converted(**ids).logits, trained, rtol=0, atol=1e-3)
        del model, converted
        loaded = PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path / "converted")
        torch.testing.assert_close(loaded(**ids).logits, trained, rtol=0, atol=1e-3)


# ---------------------------------------------------------------------------
# What notebook 04 relies on in bitsandbytes' 4-bit layers on the CPU
# ---------------------------------------------------------------------------


def test_linear4bit_input_gradient_is_the_dequantised_weights():
    # Notebook 04 trains OLoRA over a 4-bit base on the CPU and silences PyTorch's note that the
    # 4-bit kernel has no autograd registration: the gradient that flows to earlier layers must
    # still be the one of the de-quantised weight. Float32 throughout: rounding ~1e-6 on
    # entries of order 1-10, so 1e-5.
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")  # quantises the weight
    assert layer.weight.bnb_quantized
    layer.train()
    dequantised = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    x = torch.randn(2, 5, 64, requires_grad=True)
    upstream = torch.randn(2, 5, 32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autograd kernel was not registered.*")
        (layer(x) * upstream).sum().backward()
    got = x.grad.clone()
    x.grad = None
    (torch.nn.functional.linear(x, dequantised) * upstream).sum().backward()
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, x.grad, rtol=1e-5, atol=1e-5)
