"""The adapters shipped with the course: present, small, loadable, true to their recipe, and rebuildable."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from safetensors.torch import load_file

from course.adapters import RECIPES, adapter_path, build_all
from course.adapters.build import sha256

build_module = importlib.import_module("course.adapters.build")  # the module, not the function it exports
NAMES = sorted(RECIPES)
MB = 1024 * 1024


@pytest.mark.parametrize("name", NAMES)
def test_shipped_files_exist_and_are_small(name):
    folder = adapter_path(name)
    for file in ("adapter_config.json", "adapter_model.safetensors", "README.md", "recipe.json", "scores.json"):
        assert (folder / file).is_file(), f"{folder / file} is missing: run `python -m course adapters build {name}`"
    assert (folder / "adapter_model.safetensors").stat().st_size < 5 * MB
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt")), "adapters ship as safetensors only"


@pytest.mark.parametrize("name", NAMES)
def test_shipped_adapter_matches_its_recipe(name):
    """recipe.json is the recipe in code; the config and tensors are what that recipe gives."""
    folder = adapter_path(name)
    recipe = RECIPES[name]
    assert json.loads((folder / "recipe.json").read_text()) == recipe.to_dict(), (
        f"RECIPES[{name!r}] changed since the shipped adapter was built: rebuild it with "
        f"`python -m course adapters build {name}`"
    )
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == recipe.r
    assert config["lora_alpha"] == recipe.lora_alpha
    assert config["target_modules"] == sorted(recipe.target_modules)
    assert config["base_model_name_or_path"] == recipe.base_model
    scores = json.loads((folder / "scores.json").read_text())
    assert scores["safetensors_sha256"] == sha256(folder / "adapter_model.safetensors"), "tensors edited after the build"
    tensors = load_file(folder / "adapter_model.safetensors")
    assert sum(t.numel() for t in tensors.values()) == scores["trainable_parameters"]
    # every targeted projection of each of the 30 layers has an A (r x in) and a B (out x r)
    assert len(tensors) == 2 * 30 * len(recipe.target_modules)
    assert all(recipe.r in t.shape for t in tensors.values())


def test_recorded_scores_show_the_behaviour():
    """What the build measured (README.md and scores.json): each adapter does what it is for."""
    for name in NAMES:
        scores = json.loads((adapter_path(name) / "scores.json").read_text())
        assert scores["adapter"] >= 0.6 and scores["adapter"] >= scores["base"] + 0.5, (name, scores)
        readme = (adapter_path(name) / "README.md").read_text()
        assert f"{scores['adapter']:.3f}" in readme and f"{scores['base']:.3f}" in readme


@pytest.fixture
def with_adapters(base_model):
    """The session's base model with both shipped adapters loaded; unloaded afterwards."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, adapter_path("addition"), adapter_name="addition")
    model.load_adapter(adapter_path("pirate"), adapter_name="pirate")
    try:
        yield model
    finally:
        restored = model.unload()
        assert restored is base_model
        assert not any("lora" in name for name, _ in base_model.named_modules())


@pytest.mark.model
def test_shipped_adapters_change_behaviour(with_adapters, tokenizer):
    from course.adapters.recipes import HELD_OUT_QUESTIONS
    from course.data import addition_splits
    from course.generate import accuracy, generate

    held_out = addition_splits(n_train=10, n_eval=64)["eval"].select(range(32))
    with_adapters.set_adapter("addition")
    adapter = accuracy(with_adapters, tokenizer, held_out)
    with with_adapters.disable_adapter():
        base = accuracy(with_adapters, tokenizer, held_out)
    assert adapter >= 0.5 and adapter >= base + 0.4, (base, adapter)

    questions = HELD_OUT_QUESTIONS[:3]
    with_adapters.set_adapter("pirate")
    pirate = generate(with_adapters, tokenizer, questions, max_new_tokens=4)
    with with_adapters.disable_adapter():
        plain = generate(with_adapters, tokenizer, questions, max_new_tokens=4)
    assert sum(r.lower().startswith("arr") for r in pirate) >= 2, pirate
    assert not any(r.lower().startswith("arr") for r in plain), plain


TINY = {"n_train": 4, "n_eval": 2, "batch_size": 2, "examples": ()}


def _tensors(folder):
    return load_file(folder / "adapter_model.safetensors")


@pytest.mark.model
def test_cheap_rebuild_is_deterministic_and_true_to_the_format(tmp_path):
    first = build_all(["pirate"], steps=2, progress=False, out_dir=tmp_path / "a", overrides=TINY)["pirate"]
    second = build_all(["pirate"], steps=2, progress=False, out_dir=tmp_path / "b", overrides=TINY)["pirate"]
    a, b = _tensors(first), _tensors(second)
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs between two builds with the same seed"
    # PEFT writes target_modules from a set; the build sorts them so that the file is stable too
    assert (first / "adapter_config.json").read_bytes() == (second / "adapter_config.json").read_bytes()
    # the B matrices moved away from zero: the two steps trained something
    assert any(t.abs().sum() > 0 for k, t in a.items() if "lora_B" in k)
    recorded = json.loads((first / "recipe.json").read_text())
    assert recorded["steps"] == 2 and recorded["n_train"] == 4, "recipe.json records the recipe actually used"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["pirate"], "no temporary folders left behind"

    from peft import PeftConfig

    assert PeftConfig.from_pretrained(first).r == RECIPES["pirate"].r


@pytest.mark.model
def test_rebuild_replaces_atomically_and_a_failed_build_leaves_the_old_one(tmp_path, monkeypatch):
    old = tmp_path / "addition"
    old.mkdir()
    (old / "marker.txt").write_text("the previous adapter")

    def broken(*args, **kwargs):
        raise RuntimeError("training failed half-way")

    with monkeypatch.context() as patch:
        patch.setattr(build_module, "train_adapter", broken)
        with pytest.raises(RuntimeError, match="half-way"):
            build_all(["addition"], steps=1, progress=False, out_dir=tmp_path, overrides=TINY)
    assert (old / "marker.txt").read_text() == "the previous adapter"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["addition"], "a failed build left files behind"

    build_all(["addition"], steps=1, progress=False, out_dir=tmp_path, overrides=TINY)
    assert not (old / "marker.txt").exists(), "the new adapter replaces the old folder as a whole"
    assert (old / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["addition"]
    assert oct((old / "adapter_model.safetensors").stat().st_mode & 0o777) == "0o644"


def test_unknown_adapter_names_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="Unknown adapter"):
        build_all(["nonsense"], out_dir=tmp_path)
    with pytest.raises(KeyError, match="addition"):
        adapter_path("nonsense")


def test_pirate_transform_is_deterministic_and_visible():
    from course.adapters import pirate, sounds_like_a_pirate

    assert pirate("Hello, my friend! Yes, you are right.") == "Arr, matey! Ahoy, me matey! Aye, ye be right. Yo ho ho!"
    assert sounds_like_a_pirate(pirate("Anything at all."))
    assert not sounds_like_a_pirate("The capital of Italy is Rome.")
