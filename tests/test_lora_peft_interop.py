"""Adapters move between course.lora and PEFT on the real base model, with the same logits.

Tolerance for logits: both sides run the same float32 operations in the same order
(base(x) + B(A(x)) * scaling in every adapted layer) on the same weights, so they
agree to the bit today. We allow atol 1e-5 (logits are of order 10, float32 eps
there is ~1e-6) so that a harmless reordering inside a future PEFT does not fail
the test, while any real difference (a wrong scaling, a missing layer, a
transposed factor) moves logits by far more: the adapters below change them by
more than 0.1.
"""

from __future__ import annotations

import copy
import json
import re
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from course.lora import (
    LoRALinear,
    MergedLoRALinear,
    inject_lora,
    load_peft_adapter,
    save_peft_adapter,
)

pytestmark = pytest.mark.model
LOGITS = {"rtol": 0, "atol": 1e-5}


@pytest.fixture(scope="module")
def ids(tokenizer):
    return tokenizer(["LoRA adds a low-rank update to a frozen weight."], return_tensors="pt").input_ids


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _randomise_lora_B(model, std=0.05):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)


@pytest.fixture(scope="module")
def base_logits(base_model, ids):
    return _logits(base_model, ids)


def test_course_adapter_loads_in_peft(base_model, ids, base_logits, tmp_path):
    model = inject_lora(copy.deepcopy(base_model), ["q_proj", "v_proj"], r=4, alpha=8)
    # Two training steps, so that A moved from its init too, then a random B on top.
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    optimizer = torch.optim.SGD(params, lr=1e-2)
    _randomise_lora_B(model)
    model.train()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    ours = _logits(model, ids)
    assert (ours - base_logits).abs().max() > 0.1  # the adapter really changes the model

    directory = save_peft_adapter(model, tmp_path / "adapter", task_type="CAUSAL_LM")
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == base_model.config._name_or_path
    del model

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base_model), directory)
    torch.testing.assert_close(_logits(peft_model, ids), ours, **LOGITS)


@pytest.fixture(scope="module")
def peft_adapter(base_model, ids, tmp_path_factory):
    """An adapter saved by PEFT itself (rsLoRA, a rank_pattern), and the logits PEFT gives with it."""
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "o_proj", "down_proj"],
                        use_rslora=True, rank_pattern={"down_proj": 2}, task_type="CAUSAL_LM")
    peft_model = get_peft_model(copy.deepcopy(base_model), config)
    _randomise_lora_B(peft_model)
    peft_model.eval()
    logits = _logits(peft_model, ids)
    directory = tmp_path_factory.mktemp("peft") / "adapter"
    peft_model.save_pretrained(directory)
    return directory, logits


def test_peft_adapter_loads_into_course_layers(base_model, ids, base_logits, peft_adapter, tmp_path):
    directory, peft_logits = peft_adapter
    model = load_peft_adapter(copy.deepcopy(base_model), directory)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert len(layers) == 3 * base_model.config.num_hidden_layers
    down = layers["model.layers.0.mlp.down_proj"]
    assert (down.r, down.scaling) == (2, 16 / 2**0.5)  # rank_pattern and rsLoRA honoured
    ours = _logits(model.eval(), ids)
    assert (ours - base_logits).abs().max() > 0.1
    torch.testing.assert_close(ours, peft_logits, **LOGITS)

    # And back: saved by the course, the same adapter loads in PEFT with the same logits.
    directory = save_peft_adapter(model, tmp_path / "again")
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["r"] == 4
    assert len(config["rank_pattern"]) == base_model.config.num_hidden_layers  # every down_proj: r=2
    del model
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base_model), directory)
    torch.testing.assert_close(_logits(peft_model, ids), peft_logits, **LOGITS)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config)


def test_adapter_for_another_model_is_refused_and_changes_nothing(peft_adapter):
    directory, _ = peft_adapter
    tiny = _tiny_llama()
    flags = {n: p.requires_grad for n, p in tiny.named_parameters()}
    with pytest.raises(ValueError, match="made for another base model") as info:
        load_peft_adapter(tiny, directory)
    message = str(info.value)
    assert "model.layers.0.mlp.down_proj" in message
    assert "(2, 1536)" in message and "(2, 64)" in message  # the adapter's shape and the model's
    assert not any("lora_" in n for n, _ in tiny.named_parameters())
    assert flags == {n: p.requires_grad for n, p in tiny.named_parameters()}


def test_adapter_naming_a_missing_module_is_refused(tmp_path):
    model = inject_lora(_tiny_llama(), ["q_proj"], r=2, alpha=4)
    directory = save_peft_adapter(model, tmp_path / "a", base_model_name_or_path="tiny-llama")
    other = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(ValueError, match=r"does not have: the adapter was made for another model \(tiny-llama\)"):
        load_peft_adapter(other, directory)


@pytest.fixture
def tiny_adapter(tmp_path):
    model = inject_lora(_tiny_llama(), ["q_proj", "v_proj"], r=2, alpha=4)
    return save_peft_adapter(model, tmp_path / "adapter")


def test_missing_files_are_named(tiny_adapter, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_peft_adapter(_tiny_llama(), tmp_path / "nowhere")
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_adapter, no_weights)
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors is missing"):
        load_peft_adapter(_tiny_llama(), no_weights)
    (no_weights / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pickle"):
        load_peft_adapter(_tiny_llama(), no_weights)
    (tiny_adapter / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        load_peft_adapter(_tiny_llama(), tiny_adapter)


@pytest.mark.parametrize(("change", "phrase"), [
    ({"peft_type": "IA3"}, "'IA3' adapter"),
    ({"lora_bias": True}, "trained LoRA bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_adapters_the_course_layers_cannot_express_are_refused(tiny_adapter, change, phrase):
    path = tiny_adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ValueError, match=phrase):
        load_peft_adapter(_tiny_llama(), tiny_adapter)


def test_saving_again_replaces_the_adapter_and_leaves_no_temporary_files(tiny_adapter):
    (tiny_adapter / "README.md").write_text("my notes")
    model = inject_lora(_tiny_llama(), ["q_proj", "v_proj"], r=2, alpha=4)
    _randomise_lora_B(model)
    save_peft_adapter(model, tiny_adapter)
    assert sorted(p.name for p in tiny_adapter.parent.iterdir()) == ["adapter"]
    assert (tiny_adapter / "README.md").read_text() == "my notes"
    loaded = load_peft_adapter(_tiny_llama(), tiny_adapter)
    ids = torch.randint(0, 64, (1, 6))
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), **LOGITS)


def test_mixed_ranks_and_alphas_are_saved_as_patterns(tmp_path):
    model = inject_lora(_tiny_llama(), ["q_proj", "k_proj"], r=2, alpha=4)
    inject_lora(model, ["v_proj"], r=4, alpha=16)
    _randomise_lora_B(model)
    directory = save_peft_adapter(model, tmp_path / "a")
    config = json.loads((directory / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (2, 4)
    v_proj = re.escape("model.layers.0.self_attn.v_proj")
    assert config["rank_pattern"] == {v_proj: 4} and config["alpha_pattern"] == {v_proj: 16}
    ids = torch.randint(0, 64, (1, 6))
    theirs = PeftModel.from_pretrained(_tiny_llama(), directory)
    torch.testing.assert_close(_logits(theirs, ids), _logits(model, ids), **LOGITS)
    ours = load_peft_adapter(_tiny_llama(), directory)
    assert ours.model.layers[0].self_attn.v_proj.scaling == 16 / 4
    torch.testing.assert_close(_logits(ours, ids), _logits(model, ids), **LOGITS)


def test_what_peft_cannot_express_is_not_saved(tmp_path):
    model = inject_lora(_tiny_llama(), ["q_proj"], r=2, alpha=4)
    attention = model.model.layers[0].self_attn
    attention.v_proj = LoRALinear(attention.v_proj, 2, 4, rslora=True)
    with pytest.raises(ValueError, match="rsLoRA"):
        save_peft_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_peft_adapter(_tiny_llama(), tmp_path / "b")
    fused = nn.Sequential(MergedLoRALinear(nn.Linear(4, 12), 2, 4, enable_lora=[True, False, True]))
    with pytest.raises(ValueError, match="PEFT has no fused layer"):
        save_peft_adapter(fused, tmp_path / "c")
    assert not any(tmp_path.iterdir())
