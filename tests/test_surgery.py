"""One target rule for the whole course, PEFT's: course.surgery.matches_target and its users."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from course.adapters.anatomy import lora_parameter_count
from course.lora import LoRALinear, inject_lora, lora_layers
from course.surgery import matches_target, plain_modules, replace_module, targeted_names

TARGET_LISTS = [
    ["q_proj"],
    ["q_proj", "v_proj"],
    ["self_attn.q_proj", "mlp.down_proj"],
    ["proj"],                        # a name part that is not whole: no match
    ["layers.0.self_attn.q_proj"],   # one layer only
    ["model.layers.29.mlp"],         # a whole block (not a Linear)
    ["lm_head", "embed_tokens"],
    ["0.self_attn.v_proj"],          # layers 0, 10 and 20: a dotted end, not a prefix
    ["_proj"],
    ["model.layers.3.self_attn.k_proj"],
]


@pytest.fixture(scope="module")
def smollm2_shaped():
    """A tiny random model with SmolLM2-135M's module names: LlamaForCausalLM, 30 blocks, tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=30, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def _peft_adapted(model: nn.Module, targets: list[str]) -> set[str]:
    """The module names PEFT itself puts LoRA on for ``targets``."""
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=targets))
    prefix = "base_model.model."
    return {name.removeprefix(prefix) for name, m in peft_model.named_modules()
            if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def test_smollm2_names_are_what_the_real_model_has(smollm2_shaped):
    names = {name for name, _ in smollm2_shaped.named_modules()}
    assert "model.layers.29.self_attn.q_proj" in names and "model.layers.30.self_attn.q_proj" not in names
    assert {"model.embed_tokens", "lm_head", "model.layers.0.mlp.down_proj", "model.norm"} <= names


@pytest.mark.parametrize("targets", TARGET_LISTS, ids=lambda t: ",".join(t))
def test_matches_target_is_peft_rule_on_every_module_name(targets, smollm2_shaped):
    config = LoraConfig(target_modules=targets)
    names = [name for name, _ in smollm2_shaped.named_modules() if name]
    ours = {name for name in names if matches_target(name, targets)}
    peft = {name for name in names if check_target_module_exists(config, name)}
    assert ours == peft
    assert set(targeted_names(smollm2_shaped, targets)) == peft


def test_dotted_targets_pick_the_same_modules_as_peft_when_injected(smollm2_shaped):
    targets = ["self_attn.q_proj", "mlp.down_proj"]
    model = copy.deepcopy(smollm2_shaped)
    inject_lora(model, targets, 2, 4)
    assert set(lora_layers(model)) == _peft_adapted(smollm2_shaped, targets)
    assert len(lora_layers(model)) == 60  # 30 blocks x 2


def test_a_single_string_is_one_name_and_bad_targets_are_refused():
    assert matches_target("model.layers.0.self_attn.q_proj", "q_proj")
    assert not matches_target("model.layers.0.self_attn.q_proj", "q")  # not a substring
    with pytest.raises(TypeError, match="module names"):
        matches_target("q_proj", ["q_proj", None])


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["self_attn.q_proj", "mlp.down_proj"]])
def test_parameter_count_reference_follows_peft_for_dotted_targets(targets, smollm2_shaped):
    peft_model = get_peft_model(copy.deepcopy(smollm2_shaped), LoraConfig(r=4, target_modules=targets))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_parameter_count(smollm2_shaped, 4, targets) == trainable > 0


def test_plain_modules_skip_the_insides_of_adapter_layers_and_replace_sets_on_the_parent():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)))
    replace_module(model, "1.0", LoRALinear(model[1][0], 2, 4))
    assert isinstance(model[1][0], LoRALinear)
    names = set(plain_modules(model))
    assert "1.0" in names and "1.0.base_layer" not in names and "1.0.lora_A" not in names


def test_finetune_resolves_dotted_targets_to_exactly_what_peft_adapts(smollm2_shaped):
    """``--lora_target_modules self_attn.q_proj,mlp.down_proj``: the flag is accepted, and the layers it
    names (checked for the rank, trained by NOLA) are the ones PEFT adapts with the config it builds."""
    from course.finetune import _targeted_linears, adapter_config, parser

    flag = "self_attn.q_proj,mlp.down_proj"
    expected = _peft_adapted(smollm2_shaped, ["self_attn.q_proj", "mlp.down_proj"])
    assert len(expected) == 60
    o = parser().parse_args(["--lora_r", "2", "--lora_target_modules", flag])
    config = adapter_config(o, smollm2_shaped)
    assert sorted(config.target_modules) == ["mlp.down_proj", "self_attn.q_proj"]
    assert _peft_adapted(smollm2_shaped, sorted(config.target_modules)) == expected
    assert set(_targeted_linears(smollm2_shaped, ["self_attn.q_proj", "mlp.down_proj"])) == expected
    nola = adapter_config(parser().parse_args(["--method", "nola", "--lora_target_modules", flag]), smollm2_shaped)
    assert set(nola["target_modules"]) == expected
    # all-linear: PEFT's rule too (every linear layer but the output layer)
    everything = adapter_config(parser().parse_args(["--lora_r", "2"]), smollm2_shaped)
    assert set(_targeted_linears(smollm2_shaped, "all-linear")) == _peft_adapted(smollm2_shaped, everything.target_modules)


LOAD_WITH_LORA_ONLY = """
import sys, torch
from torch import nn
from course.lora import load_peft_adapter
assert "course.dora" not in sys.modules and "course.olora" not in sys.modules
torch.manual_seed(0)
model = load_peft_adapter(nn.Sequential(nn.Linear(6, 5)), sys.argv[1])
print(type(model[0]).__name__)
"""


@pytest.mark.parametrize(("variant", "expected"), [("course.dora:DoRALinear", "DoRALinear"),
                                                    ("course.olora:OLoRALinear", "OLoRALinear")])
def test_an_adapter_of_a_variant_loads_with_only_course_lora_imported(variant, expected, tmp_path):
    """The file format imports no method: the variant's module registers its class when an adapter needs it."""
    import importlib
    import subprocess
    import sys

    from course.lora import save_peft_adapter

    module, _, name = variant.partition(":")
    layer_class = getattr(importlib.import_module(module), name)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    model[0] = layer_class(model[0], 2, 4.0)
    save_peft_adapter(model, tmp_path / "adapter")
    result = subprocess.run([sys.executable, "-c", LOAD_WITH_LORA_ONLY, str(tmp_path / "adapter")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == expected


class _LearnersLoRA(nn.Module):
    """A learner's layer (chapter 02): ``lora_A`` and ``lora_B``, but no ``peft_state``."""

    def __init__(self, base: nn.Linear, r: int = 2):
        super().__init__()
        self.base, self.lora_A = base, nn.Parameter(torch.randn(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x):
        return self.base(x) + x @ self.lora_A.T @ self.lora_B.T


def _one_of_each():
    from course.nola import NOLALoRALinear
    from course.olora import OLoRALinear

    torch.manual_seed(0)
    model = nn.ModuleDict({name: nn.Linear(6, 5) for name in ("lora", "nola", "olora", "plain")})
    model["lora"] = LoRALinear(model["lora"], 2, 4)
    model["nola"] = NOLALoRALinear(model["nola"], 2, 4, num_basis_A=8, num_basis_B=8, seed=1)
    model["olora"] = OLoRALinear(model["olora"], 2, 4)
    return model


def test_every_list_of_layers_counts_by_one_rule():
    """lora_layers, nola_layers, OLoRA's layers and what save_peft_adapter writes: one rule (adapter_layers)."""
    from course.nola import nola_layers
    from course.olora import _olora_layers
    from course.surgery import adapter_layers

    model = _one_of_each()
    assert set(lora_layers(model)) == set(adapter_layers(model)) == {"lora", "nola", "olora"}
    assert set(nola_layers(model)) == {"nola"} and set(_olora_layers(model)) == {"olora"}
    assert set(nola_layers(model)) | set(_olora_layers(model)) <= set(lora_layers(model))
    # A layer passed on its own is no model of layers: it has no name to save it under, in any of the lists.
    bare = model["nola"]
    assert lora_layers(bare) == nola_layers(bare) == {}
    with pytest.raises(ValueError, match="no OLoRA layers"):
        _olora_layers(model["olora"])


def test_save_peft_adapter_writes_exactly_the_layers_lora_layers_counts(tmp_path):
    import json

    from safetensors import safe_open

    from course.lora import save_peft_adapter
    from course.nola import save_nola

    model = _one_of_each()
    del model["olora"]  # a PEFT config holds one variant: plain LoRA and NOLA (exported as plain LoRA) here
    save_peft_adapter(model, tmp_path / "both")
    with safe_open(tmp_path / "both" / "adapter_model.safetensors", "pt") as f:
        written = {key.removeprefix("base_model.model.").partition(".")[0] for key in f.keys()}
    assert written == set(lora_layers(model)) == {"lora", "nola"}
    assert json.loads((tmp_path / "both" / "adapter_config.json").read_text())["target_modules"] == ["lora", "nola"]
    # A bare layer has no module name: nothing to write, said as such (it used to be saved under the name "").
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_peft_adapter(model["lora"], tmp_path / "bare")
    with pytest.raises(ValueError, match="no NOLALoRALinear layers"):
        save_nola(model["nola"], tmp_path / "bare-nola")


def test_a_learners_layer_is_counted_and_named_when_it_cannot_be_written(tmp_path):
    from course.lora import save_peft_adapter

    model = _one_of_each()
    model["mine"] = _LearnersLoRA(nn.Linear(6, 5))
    assert "mine" in lora_layers(model)
    with pytest.raises(ValueError, match=r"1 of the model's 4 LoRA layers .* mine \(_LearnersLoRA\) have no "
                                         r"peft_state\(\).*inject_lora"):
        save_peft_adapter(model, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()  # refused before anything was written
    only_mine = nn.ModuleDict({"mine": _LearnersLoRA(nn.Linear(6, 5))})
    with pytest.raises(ValueError, match=r"1 of the model's 1 LoRA layers"):  # not "no LoRA layers: inject_lora"
        save_peft_adapter(only_mine, tmp_path / "mine")


class _Picky(LoRALinear):
    """Builds like LoRALinear (freezing its base) and then refuses a narrow layer, as a rank check would."""

    changes_base_weight = True

    def __init__(self, base, r, alpha, **options):
        super().__init__(base, r, alpha, **options)
        with torch.no_grad():
            base.weight.mul_(2)  # a base-changing initialisation (OLoRA's residual), before the refusal
        if base.out_features < 3:
            raise ValueError("too narrow for this layer")


@pytest.mark.parametrize("inject", ["inject_lora", "inject_lora_linear"])
def test_every_injection_is_all_or_none(inject):
    """When one target fails, the model is as it was: no layer swapped, no base frozen or changed."""
    import course.lora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="too narrow"):
        getattr(course.lora, inject)(model, ["0", "1"], 2, 4, layer=_Picky)
    assert all(type(m) is nn.Linear for m in model) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    getattr(course.lora, inject)(model, ["0"], 2, 4, layer=_Picky)  # the layer that fits goes in
    assert isinstance(model[0], _Picky) and type(model[1]) is nn.Linear


def test_swap_in_passes_none_for_a_missing_name_and_puts_everything_back_on_failure():
    from course.surgery import swap_in

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    seen = {}

    def build(name, module):
        seen[name] = module
        if module is None:
            raise KeyError(f"no module {name}")
        return LoRALinear(module, 2, 4)

    with pytest.raises(KeyError, match="no module 7"):
        swap_in(model, ["0", "1", "7"], build)
    assert seen["7"] is None and seen["0"] is model[0]
    assert all(type(m) is nn.Linear for m in model) and all(p.requires_grad for p in model.parameters())
    assert swap_in(model, ["1"], build) is model and isinstance(model[1], LoRALinear)
