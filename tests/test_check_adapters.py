"""Both ways for the checks of notebook 01: right answers pass, typical mistakes fail with their reason."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from course import check
from course.adapters import delta_weight as reference_delta
from course.adapters import lora_parameter_count as reference_count

# ---------------------------------------------------------------- delta_weight


def delta_via_peft(peft_model, module_name):
    layer = peft_model.get_submodule(module_name)
    return layer.get_delta_weight(peft_model.active_adapter)


def delta_via_einsum(peft_model, module_name):
    layer = peft_model.get_submodule(module_name)
    name = peft_model.active_adapters[0]
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    return torch.einsum("or,ri->oi", b, a) * layer.scaling[name]


def delta_scaling_from_config(peft_model, module_name):
    """Right for plain LoRA, wrong for rsLoRA and for rank_pattern / alpha_pattern."""
    layer = peft_model.get_submodule(module_name)
    name = peft_model.active_adapter
    config = peft_model.peft_config[name]
    return (config.lora_alpha / config.r) * layer.lora_B[name].weight @ layer.lora_A[name].weight


def delta_via_forward(peft_model, module_name):
    """Differently again: probe the layer with the identity and subtract the base layer's output."""
    layer = peft_model.get_submodule(module_name)
    eye = torch.eye(layer.in_features)
    with torch.no_grad():
        return (layer(eye) - layer.base_layer(eye)).T


def delta_no_scaling(peft_model, module_name):
    layer = peft_model.get_submodule(module_name)
    name = peft_model.active_adapter
    return layer.lora_B[name].weight @ layer.lora_A[name].weight


def delta_transposed(peft_model, module_name):
    layer = peft_model.get_submodule(module_name)
    name = peft_model.active_adapter
    return layer.scaling[name] * layer.lora_A[name].weight.T @ layer.lora_B[name].weight.T


def delta_swapped(peft_model, module_name):
    layer = peft_model.get_submodule(module_name)
    name = peft_model.active_adapter
    return layer.scaling[name] * layer.lora_A[name].weight @ layer.lora_B[name].weight


def delta_first_adapter(peft_model, module_name):
    layer = peft_model.get_submodule(module_name)
    name = next(iter(layer.lora_A))  # the first adapter, whichever is active
    return layer.scaling[name] * layer.lora_B[name].weight @ layer.lora_A[name].weight


def delta_hard_coded_default(peft_model, module_name):
    layer = peft_model.get_submodule(module_name)
    return layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight


def delta_alpha_not_scaling(peft_model, module_name):
    layer = peft_model.get_submodule(module_name)
    name = peft_model.active_adapter
    alpha = peft_model.peft_config[name].lora_alpha
    return alpha * layer.lora_B[name].weight @ layer.lora_A[name].weight


def delta_merged_weight(peft_model, module_name):
    layer = peft_model.get_submodule(module_name)
    return layer.base_layer.weight + reference_delta(peft_model, module_name)


def delta_stub(peft_model, module_name):
    raise NotImplementedError()


@pytest.mark.parametrize("answer", [reference_delta, delta_via_peft, delta_via_einsum, delta_via_forward])
def test_delta_weight_passes_right_answers(answer):
    result = check.delta_weight.run(answer)
    assert result.status == "passed", result.message


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (delta_no_scaling, "without the scaling"),
        (delta_transposed, "transpose"),
        (delta_swapped, "B @ A"),
        (delta_first_adapter, "the active adapter is 'second'"),
        (delta_hard_coded_default, "peft_model.active_adapter"),
        (delta_alpha_not_scaling, "times the right one"),
        (delta_merged_weight, "merged weight"),
        (delta_scaling_from_config, "from the config"),
        (lambda m, n: [[0.0]], "torch.Tensor"),
    ],
)
def test_delta_weight_explains_mistakes(answer, words):
    result = check.delta_weight.run(answer)
    assert result.status == "failed"
    assert words in result.message, result.message


def test_delta_weight_swapped_square_layer_is_called_a_transpose():
    """On a square layer A.T @ B.T has the right shape: the check must still catch it by value."""
    from course.check.adapters import _diagnose, _one_adapter_model

    model = _one_adapter_model()
    name = "base_model.model.layers.1.q_proj"
    with pytest.raises(AssertionError, match="transpose"):
        _diagnose(delta_transposed(model, name).detach(), model, name, "square")


def test_delta_weight_stub_is_not_attempted():
    assert check.delta_weight.run(delta_stub).status == "not_attempted"


# ---------------------------------------------------------------- lora_parameter_count


def count_by_config(model, r, target_modules):
    """Differently written: per-module sums with the weight's shape rather than in/out_features, and
    PEFT's rule for a name as a suffix test on the dotted name."""
    total = 0
    for name, module in model.named_modules():
        if any(f".{name}".endswith(f".{t}") for t in target_modules) and hasattr(module, "weight"):
            out_features, in_features = module.weight.shape
            total += r * out_features + r * in_features
    return total


def _targeted(model, targets):
    return [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]


def count_full_matrix(model, r, targets):
    return sum(r * m.in_features * m.out_features for m in _targeted(model, targets))


def count_a_only(model, r, targets):
    return sum(r * m.in_features for m in _targeted(model, targets))


def count_with_bias(model, r, targets):
    return reference_count(model, r, targets) + sum(m.out_features for m in _targeted(model, targets) if m.bias is not None)


def count_one_block(model, r, targets):
    return reference_count(model.layers[0], r, targets)


def count_every_linear(model, r, targets):
    return sum(r * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, nn.Linear))


def count_base_weights(model, r, targets):
    return sum(p.numel() for m in _targeted(model, targets) for p in m.parameters())


def count_as_float(model, r, targets):
    return float(reference_count(model, r, targets))


def count_last_name_part(model, r, targets):  # chapter 01's answer before it taught PEFT's rule
    return sum(r * (m.in_features + m.out_features) for m in _targeted(model, targets))


@pytest.mark.parametrize("answer", [reference_count, count_by_config])
def test_lora_parameter_count_passes_right_answers(answer):
    result = check.lora_parameter_count.run(answer)
    assert result.status == "passed", result.message


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (count_full_matrix, "r x in x out"),
        (count_a_only, "A only"),
        (count_with_bias, "no bias"),
        (count_one_block, "one block"),
        (count_every_linear, "every Linear"),
        (count_base_weights, "own weights"),
        (count_as_float, "Python int"),
        (count_last_name_part, "ends in '.' + target"),
    ],
)
def test_lora_parameter_count_explains_mistakes(answer, words):
    result = check.lora_parameter_count.run(answer)
    assert result.status == "failed"
    assert words in result.message, result.message


def test_lora_parameter_count_stub_is_not_attempted():
    def stub(model, r, target_modules):
        raise NotImplementedError()

    assert check.lora_parameter_count.run(stub).status == "not_attempted"


def test_reference_count_matches_peft_on_the_real_shapes():
    """The reference agrees with PEFT on a model shaped like SmolLM2's attention (576 -> 192 for k, v)."""
    from course.check.adapters import _peft_count, _Tiny

    model = _Tiny(blocks=2, width=576, narrow=192, hidden=64)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert reference_count(model, 8, targets) == _peft_count(model, 8, targets) == 2 * 8 * (1152 + 768 + 768 + 768)
