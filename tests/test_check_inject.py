"""check.inject_lora both ways: correct injections written differently pass, each mistake fails with its reason."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from course import check
from course.lora import LoRALinear, inject_lora, inject_lora_linear, mark_only_lora_as_trainable

# ---------------------------------------------------------------------------
# Correct answers, written differently
# ---------------------------------------------------------------------------


def notebook_answer(model, targets, r, alpha, layer):
    """The solution notebook's answer."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in targets:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer(module, r, alpha))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def recursive_freeze_first(model, targets, r, alpha, layer):
    """Freeze everything first, then recurse through the children by hand; PEFT's name rule."""
    model.requires_grad_(False)

    def visit(module, prefix):
        for child_name, child in list(module.named_children()):
            full = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, nn.Linear) and any(full == t or full.endswith("." + t) for t in targets):
                module.add_module(child_name, layer(child, r, alpha))  # the new layer's A and B train
            else:
                visit(child, full)

    visit(model, "")
    return model


def course_api_for_linear_targets(model, targets, r, alpha, layer):
    """The course's inject_lora on the nn.Linear targets only, then mark_only_lora_as_trainable."""
    linear = sorted({n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] in targets})
    return mark_only_lora_as_trainable(inject_lora(model, linear, r, alpha, layer=layer))


@pytest.mark.parametrize("answer", [inject_lora_linear, notebook_answer, recursive_freeze_first,
                                    course_api_for_linear_targets])
def test_correct_injections_pass(answer):
    result = check.inject_lora.run(answer)
    assert result.status == "passed", result.message


def test_the_reference_works_with_the_course_layer_on_a_real_shape():
    from course.check.toy_models import _LlamaLike

    model = inject_lora_linear(_LlamaLike(), ["q_proj"], 2, 4)
    assert isinstance(model.layers[0].self_attn.q_proj, LoRALinear)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"layers.{i}.self_attn.q_proj.lora_{f}.weight" for i in (0, 1) for f in "AB"}


# ---------------------------------------------------------------------------
# Typical mistakes, each with its own message
# ---------------------------------------------------------------------------


def _freeze(model):
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def _swap(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def substring_match(model, targets, r, alpha, layer):
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and any(t in name for t in targets):
            _swap(model, name, layer(module, r, alpha))
    return _freeze(model)


def endswith_without_dot(model, targets, r, alpha, layer):
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and any(name.endswith(t) for t in targets):
            _swap(model, name, layer(module, r, alpha))
    return _freeze(model)


def any_module_type(model, targets, r, alpha, layer):
    for name, module in list(model.named_modules()):
        if name and name.rpartition(".")[2] in targets:
            _swap(model, name, layer(module, r, alpha))
    return _freeze(model)


def base_left_trainable(model, targets, r, alpha, layer):
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in targets:
            _swap(model, name, layer(module, r, alpha))
    return model


def everything_frozen(model, targets, r, alpha, layer):
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in targets:
            _swap(model, name, layer(module, r, alpha))
    return model.requires_grad_(False)


def top_level_only(model, targets, r, alpha, layer):
    for name, module in list(model.named_children()):
        if isinstance(module, nn.Linear) and name in targets:
            setattr(model, name, layer(module, r, alpha))
    return _freeze(model)


def returns_none(model, targets, r, alpha, layer):
    notebook_answer(model, targets, r, alpha, layer)


def dotted_setattr(model, targets, r, alpha, layer):
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in targets:
            setattr(model, name, layer(module, r, alpha))
    return _freeze(model)


def ignores_layer(model, targets, r, alpha, layer):
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in targets:
            _swap(model, name, LoRALinear(module, r, alpha))
    return _freeze(model)


def swapped_r_alpha(model, targets, r, alpha, layer):
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in targets:
            _swap(model, name, layer(module, alpha, r))
    return _freeze(model)


def wraps_a_copy(model, targets, r, alpha, layer):
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in targets:
            fresh = copy.deepcopy(module)
            nn.init.normal_(fresh.weight)
            _swap(model, name, layer(fresh, r, alpha))
    return _freeze(model)


MISTAKES = [
    (substring_match, ["anywhere in the name", "`t in name`"]),
    (endswith_without_dot, ["`name.endswith(t)`", "last part of the name"]),
    (any_module_type, ["nn.Conv2d", "isinstance(module, nn.Linear)"]),
    (base_left_trainable, ["still trainable", "'lora_'"]),
    (everything_frozen, ["LoRA parameters are frozen", "nothing would train"]),
    (top_level_only, ["wrapped nothing", "named_children()"]),
    (returns_none, ["returned None", "return model"]),
    (dotted_setattr, ["not where the old layers were", "get_submodule(parent_name)"]),
    (ignores_layer, ["did not use the `layer`"]),
    (swapped_r_alpha, ["r and alpha are swapped"]),
    (wraps_a_copy, ["computes something else"]),
]


@pytest.mark.parametrize(("answer", "phrases"), MISTAKES, ids=[m[0].__name__ for m in MISTAKES])
def test_mistakes_fail_with_their_reason(answer, phrases):
    result = check.inject_lora.run(answer)
    assert result.status == "failed"
    for phrase in phrases:
        assert phrase in result.message, result.message


def test_each_mistake_has_its_own_message():
    # the reason, without the "For <model>, targets [...]" that names the case
    reasons = [re.sub(r"^For .*?\] ", "", check.inject_lora.run(answer).message)[:60] for answer, _ in MISTAKES]
    assert len(set(reasons)) == len(reasons), reasons


def test_only_top_level_on_a_model_with_a_top_level_target():
    def top_level_and_vit_only(model, targets, r, alpha, layer):
        if not hasattr(model, "head"):  # pass the cases without a top-level target
            return notebook_answer(model, targets, r, alpha, layer)
        return top_level_only(model, targets, r, alpha, layer)

    result = check.inject_lora.run(top_level_and_vit_only)
    assert result.status == "failed" and "only top-level modules" in result.message, result.message


def test_the_course_inject_lora_alone_does_not_pass():
    # inject_lora also wraps nn.Conv2d targets and leaves the rest trainable: not this exercise.
    def course_only(model, targets, r, alpha, layer):
        return inject_lora(model, targets, r, alpha, layer=layer)

    assert check.inject_lora.run(course_only).status == "failed"


def test_inject_lora_linear_leaves_a_convolution_with_a_target_name_alone():
    from course.check.toy_models import _ViTLike

    model = inject_lora_linear(_ViTLike(), ["proj"], 2, 4)
    assert isinstance(model.patch_embed.proj, nn.Conv2d)
    assert isinstance(model.blocks[0].attn.proj, LoRALinear)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"blocks.{i}.attn.proj.lora_{f}.weight" for i in (0, 1) for f in "AB"}


def test_inject_lora_linear_refuses_targets_without_a_linear_and_changes_nothing():
    from course.check.toy_models import _ViTLike

    model = _ViTLike()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="No nn.Linear matches"):
        inject_lora_linear(model, ["patch_embed.proj"], 2, 4)  # a convolution only
    assert [type(m) for m in model.modules()] == before
    assert all(p.requires_grad for p in model.parameters())


def test_not_a_function_and_stub():
    assert check.inject_lora.run(42).status == "failed"

    def stub(model, targets, r, alpha, layer):
        raise NotImplementedError()

    assert check.inject_lora.run(stub).status == "not_attempted"


def test_the_check_passes_layer_as_a_keyword():
    seen = {}

    def keyword_only(model, targets, r, alpha, *, layer):
        seen["layer"] = layer
        return notebook_answer(model, targets, r, alpha, layer)

    assert check.inject_lora.run(keyword_only).status == "passed"
    assert isinstance(seen["layer"], type)


def test_hints_are_tiered(capsys):
    check.inject_lora.hint()
    first = capsys.readouterr().out
    assert "Hint 1 of 3" in first and "hint(2)" in first and "setattr" not in first
    check.inject_lora.hint(3)
    assert "requires_grad_('lora_' in name)" in capsys.readouterr().out


def test_global_random_state_is_untouched():
    torch.manual_seed(3)
    before = torch.get_rng_state()
    check.inject_lora.run(notebook_answer)
    assert torch.equal(before, torch.get_rng_state())
