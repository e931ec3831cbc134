"""Adapter files never lose work and never load wrong (issue 21): saving refuses what is not an
adapter folder, loading checks the config against the tensors, refuses initialisations PEFT redoes
on the base weights, and names the file of every damaged adapter. ``inject_lora`` is all or nothing.

A tiny random Llama (hidden size 16) stands in for the base model: the point is the plumbing.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from course.lora import LoRALinear, inject_lora, load_peft_adapter, save_peft_adapter
from course.nola import load_nola, nola_layer, save_nola
from course.olora import OLoRALinear


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64)
    return LlamaForCausalLM(config).eval()


IDS = torch.arange(1, 9)[None]


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def trained_adapter(tmp_path, r=4, targets=("q_proj", "v_proj")):
    """A course LoRA adapter with non-zero B, saved in PEFT's format."""
    model = inject_lora(tiny_llama(), list(targets), r, 2 * r)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return save_peft_adapter(model, tmp_path / "adapter")


def state(model):
    return {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}


# --- saving ------------------------------------------------------------------------------------


def test_saving_onto_a_file_refuses_and_keeps_the_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("a week of notes")
    model = inject_lora(tiny_llama(), ["q_proj"], 2, 4)
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        save_peft_adapter(model, notes)
    assert notes.read_text() == "a week of notes"


def test_saving_into_a_folder_of_other_things_refuses_and_keeps_them(tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("text")
    model = inject_lora(tiny_llama(), ["q_proj"], 2, 4)
    with pytest.raises(FileExistsError, match="not an adapter folder"):
        save_peft_adapter(model, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["chapter1.tex"]


def test_saving_into_the_working_folder_works_and_keeps_a_readme(tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    model = inject_lora(tiny_llama(), ["q_proj"], 2, 4)
    save_peft_adapter(model, ".")
    (here / "README.md").write_text("my adapter")
    save_peft_adapter(model, ".")  # an adapter folder now: updated in place
    assert sorted(p.name for p in here.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (here / "README.md").read_text() == "my adapter"
    assert os.getcwd() == str(here) and here.is_dir()
    loaded = load_peft_adapter(tiny_llama(), ".")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_adapter_files_get_the_modes_the_umask_promises(tmp_path):
    model = inject_lora(tiny_llama(), ["q_proj"], 2, 4)
    old = os.umask(0o002)  # a group-shared folder
    try:
        folder = save_peft_adapter(model, tmp_path / "shared")
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o775
    for path in folder.iterdir():
        assert path.stat().st_mode & 0o777 == 0o664, path.name


# --- loading: config against tensors, initialisations ---------------------------------------------


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_a_config_whose_rank_disagrees_with_its_tensors_is_refused(tmp_path):
    folder = trained_adapter(tmp_path, r=4)
    _edit_config(folder, r=8)  # scaling 16/8 instead of 8/4 if the tensors' rank were believed
    model = tiny_llama()
    before = state(model)
    with pytest.raises(ValueError, match=r"gives model\.layers\.0\.self_attn\.[qv]_proj rank r=8, but its tensors .* "
                                         r"have rank 4"):
        load_peft_adapter(model, folder)
    assert all(torch.equal(before[n][0], p) for n, p in model.named_parameters()), "the model changed"


def test_a_rank_pattern_that_explains_the_tensors_is_accepted(tmp_path):
    folder = trained_adapter(tmp_path, r=4)
    _edit_config(folder, r=8, rank_pattern={"q_proj": 4, "v_proj": 4}, lora_alpha=8,
                 alpha_pattern={"q_proj": 8, "v_proj": 8})
    course = load_peft_adapter(tiny_llama(), folder)
    peft = PeftModel.from_pretrained(tiny_llama(), folder)
    torch.testing.assert_close(logits(course), logits(peft), rtol=0, atol=1e-6)


def test_weights_for_modules_the_config_does_not_target_are_refused(tmp_path):
    folder = trained_adapter(tmp_path)
    _edit_config(folder, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"has weights for model\.layers\.0\.self_attn\.v_proj, which target_modules"):
        load_peft_adapter(tiny_llama(), folder)
    _edit_config(folder, target_modules=["q_proj", "v_proj", "k_proj"])
    with pytest.raises(ValueError, match=r"targets k_proj, but .* has no weights for them"):
        load_peft_adapter(tiny_llama(), folder)


def test_pissa_is_refused_by_name_where_plain_lora_would_differ_from_peft(tmp_path):
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights="pissa"))
    peft_model.save_pretrained(tmp_path / "pissa")
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        load_peft_adapter(tiny_llama(), tmp_path / "pissa")


@pytest.mark.parametrize("mode", ["pissa_niter_4", "corda", "loftq", "some_future_mode"])
def test_initialisations_that_change_the_base_are_refused_by_name(mode, tmp_path):
    folder = trained_adapter(tmp_path)
    _edit_config(folder, init_lora_weights=mode)
    with pytest.raises(ValueError, match=re.escape(f"init_lora_weights={mode!r}")):
        load_peft_adapter(tiny_llama(), folder)


@pytest.mark.parametrize("mode", [False, "gaussian", "eva", "orthogonal"])
def test_initialisations_that_leave_the_base_alone_load_as_peft_loads_them(mode, tmp_path):
    folder = trained_adapter(tmp_path)
    _edit_config(folder, init_lora_weights=mode)
    course = load_peft_adapter(tiny_llama(), folder)
    peft = PeftModel.from_pretrained(tiny_llama(), folder)
    assert not torch.allclose(logits(peft), logits(tiny_llama()), atol=1e-3), "the adapter does something"
    torch.testing.assert_close(logits(course), logits(peft), rtol=0, atol=1e-6)


# --- loading: damaged files ---------------------------------------------------------------------


def _damage(folder, how):
    config, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if how == "bad JSON":
        config.write_text('{"r": 4, "lora_alpha": ')
        return config, "not valid JSON"
    if how == "JSON list":
        config.write_text(json.dumps([json.loads(config.read_text())]))
        return config, "holds a JSON list"
    if how == "renamed config key":
        text = json.loads(config.read_text())
        text["alpha"] = text.pop("lora_alpha")
        config.write_text(json.dumps(text))
        return config, "has no lora_alpha"
    if how == "no peft_type":
        text = json.loads(config.read_text())
        del text["peft_type"]
        config.write_text(json.dumps(text))
        return config, "has no peft_type"
    if how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:200])
        return weights, "not a readable safetensors file"
    if how == "empty weights":
        save_file({}, weights)
        return weights, "holds no tensors"
    if how == "renamed tensor":
        tensors = load_file(weights)
        key = next(iter(tensors))
        tensors[key.replace("lora_A", "lora_a")] = tensors.pop(key)
        save_file(tensors, weights)
        return weights, "not a LoRA tensor"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["bad JSON", "JSON list", "renamed config key", "no peft_type", "truncated weights",
                                 "empty weights", "renamed tensor"])
def test_a_damaged_adapter_is_a_value_error_naming_the_file(how, tmp_path):
    folder = trained_adapter(tmp_path)
    path, what = _damage(folder, how)
    model = tiny_llama()
    before = state(model)
    with pytest.raises(ValueError) as caught:
        load_peft_adapter(model, folder)
    assert str(path) in str(caught.value) and what in str(caught.value), str(caught.value)
    assert {n: g for n, (_, g) in before.items()} == {n: p.requires_grad for n, p in model.named_parameters()}


def _nola_adapter(tmp_path):
    base = tiny_llama()
    model = inject_lora(base, ["q_proj", "v_proj"], 2, 4, layer=nola_layer(base, 0), num_basis_A=8, num_basis_B=8)
    return save_nola(model, tmp_path / "nola")


@pytest.mark.parametrize("how", ["bad JSON", "JSON list", "renamed layers key", "missing layer setting",
                                 "truncated weights", "renamed tensor"])
def test_a_damaged_nola_folder_is_a_value_error_naming_the_file(how, tmp_path):
    folder = _nola_adapter(tmp_path)
    config, weights = folder / "nola_config.json", folder / "nola_coefficients.safetensors"
    assert load_nola(tiny_llama(), folder) is not None  # whole, it loads
    if how == "bad JSON":
        config.write_text("{")
        path, what = config, "not valid JSON"
    elif how == "JSON list":
        config.write_text("[1, 2]")
        path, what = config, "holds a JSON list"
    elif how == "renamed layers key":
        text = json.loads(config.read_text())
        text["modules"] = text.pop("layers")
        config.write_text(json.dumps(text))
        path, what = config, 'no "layers" object'
    elif how == "missing layer setting":
        text = json.loads(config.read_text())
        del text["r"]
        config.write_text(json.dumps(text))
        path, what = config, "has no r"
    elif how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:100])
        path, what = weights, "not a readable safetensors file"
    else:
        tensors = load_file(weights)
        key = next(iter(tensors))
        tensors[key + "_old"] = tensors.pop(key)
        save_file(tensors, weights)
        path, what = weights, "does not match"
    with pytest.raises(ValueError) as caught:
        load_nola(tiny_llama(), folder)
    assert str(path) in str(caught.value) and what in str(caught.value), str(caught.value)


# --- inject_lora: every target or nothing --------------------------------------------------------


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.v = nn.Linear(16, 4)  # rank at most 4


@pytest.mark.parametrize("layer", [LoRALinear, OLoRALinear])
def test_inject_lora_that_fails_on_one_target_changes_nothing(layer):
    torch.manual_seed(0)
    model = TwoLayers()
    before = state(model)
    with pytest.raises(ValueError, match="larger than min"):
        inject_lora(model, ["q", "v"], 8, 16, layer=layer)
    assert type(model.q) is nn.Linear and type(model.v) is nn.Linear
    after = state(model)
    for name, (value, trainable) in before.items():
        assert after[name][1] == trainable, f"{name} was left frozen"
        assert torch.equal(after[name][0], value), f"{name} was changed"
