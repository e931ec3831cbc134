"""course.lora against PEFT, layer by layer, on seeded inputs with the same A and B.

Tolerances (float32 throughout):
- ``SAME_OPS``: forward and gradients of Linear / Embedding / Conv2d. The course layers
  run the very operations PEFT runs, in the same order, so the results agree to the
  last bit today; a few ulp (rtol 1.3e-6, torch's float32 default) leaves room for a
  harmless reordering in a later PEFT.
- ``MERGE``: merged weights. For Conv2d PEFT builds B A with a convolution where we use
  einsum: a different summation order, so rounding differs by ~1e-7 on entries of
  order 1; atol 1e-6 is ten times that.
- ``ROUND_TRIP``: merge then unmerge computes (W + D) - D, exact up to one rounding of
  W + D, at most eps * |W + D| ~ 1e-7 here; atol 1e-6.
"""

from __future__ import annotations

import copy
import inspect
import math

import peft
import pytest
import torch
from peft.tuners.lora import layer as peft_lora
from torch import nn

from course.lora import (
    LoRAConv2d,
    LoRAEmbedding,
    LoRALinear,
    MergedLoRALinear,
    inject_lora,
    lora_state_dict,
    mark_only_lora_as_trainable,
)

SAME_OPS = {"rtol": 1.3e-6, "atol": 1e-6}
MERGE = {"rtol": 1e-5, "atol": 1e-6}
ROUND_TRIP = {"rtol": 0, "atol": 1e-6}
R, ALPHA = 4, 8.0


def _peft_layer(base: nn.Module, dropout: float = 0.0) -> nn.Module:
    """PEFT's LoRA layer around a copy of ``base`` (through its public injection API)."""
    holder = nn.ModuleDict({"target": copy.deepcopy(base)})
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=["target"])
    peft.inject_adapter_in_model(config, holder)
    return holder["target"]


def _factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of a course or PEFT layer, as the tensors that hold them."""
    if isinstance(layer, LoRAEmbedding):
        return layer.lora_embedding_A, layer.lora_embedding_B
    if isinstance(layer, peft_lora.Embedding):
        return layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    if isinstance(layer, peft_lora.LoraLayer):
        return layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return layer.lora_A.weight, layer.lora_B.weight


CASES = {
    "linear": (lambda: nn.Linear(12, 7), lambda: torch.randn(2, 5, 12), LoRALinear),
    "linear-no-bias": (lambda: nn.Linear(7, 12, bias=False), lambda: torch.randn(3, 7), LoRALinear),
    "embedding": (lambda: nn.Embedding(20, 6, padding_idx=0), lambda: torch.randint(0, 20, (3, 9)), LoRAEmbedding),
    "conv2d": (lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1), lambda: torch.randn(2, 3, 9, 9), LoRAConv2d),
}


def _pair(case: str):
    """A course layer and a PEFT layer on equal copies of one seeded base, with equal random A and B."""
    make_base, make_input, course_class = CASES[case]
    torch.manual_seed(0)
    base = make_base()
    ours, theirs = course_class(copy.deepcopy(base), R, ALPHA), _peft_layer(base)
    with torch.no_grad():
        for mine, peft_tensor in zip(_factors(ours), _factors(theirs), strict=True):
            mine.copy_(torch.randn_like(mine))
            peft_tensor.copy_(mine)
    return base, ours, theirs, make_input()


@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_equal_peft(case):
    _, ours, theirs, x = _pair(case)
    out_ours, out_peft = ours(x), theirs(x)
    torch.testing.assert_close(out_ours, out_peft, **SAME_OPS)
    torch.manual_seed(1)
    upstream = torch.randn_like(out_ours)
    for out in (out_ours, out_peft):
        (out * upstream).sum().backward()
    for mine, peft_tensor in zip(_factors(ours), _factors(theirs), strict=True):
        assert mine.grad is not None and mine.grad.abs().sum() > 0
        torch.testing.assert_close(mine.grad, peft_tensor.grad, **SAME_OPS)


@pytest.mark.parametrize("case", ["linear", "linear-no-bias", "conv2d"])
def test_input_gradient_equals_peft(case):
    _, ours, theirs, x = _pair(case)
    grads = []
    for layer in (ours, theirs):
        x_in = x.clone().requires_grad_(True)
        (layer(x_in) ** 2).sum().backward()
        grads.append(x_in.grad)
    torch.testing.assert_close(*grads, **SAME_OPS)


@pytest.mark.parametrize("case", CASES)
def test_merge_equals_peft_and_unmerge_restores_the_base(case):
    base, ours, theirs, x = _pair(case)
    before = ours(x).detach()
    torch.testing.assert_close(ours.get_delta_weight(), theirs.get_delta_weight("default"), **MERGE)

    ours.merge()
    theirs.merge()
    assert ours.merged and theirs.merged
    torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight, **MERGE)
    assert not torch.allclose(ours.base_layer.weight, base.weight)  # the merge did something
    # The merged forward is the base layer alone, with the merged weight.
    torch.testing.assert_close(ours(x), before, **MERGE)
    assert torch.equal(ours(x), ours.base_layer(x))

    ours.merge()  # a second merge changes nothing
    torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight, **MERGE)

    ours.unmerge()
    assert not ours.merged
    torch.testing.assert_close(ours.base_layer.weight, base.weight, **ROUND_TRIP)
    ours.unmerge()  # and a second unmerge too
    torch.testing.assert_close(ours.base_layer.weight, base.weight, **ROUND_TRIP)
    torch.testing.assert_close(ours(x), before, **MERGE)


@pytest.mark.parametrize("case", CASES)
def test_a_new_layer_is_the_base_layer_and_only_lora_trains(case):
    make_base, make_input, course_class = CASES[case]
    torch.manual_seed(0)
    base = make_base()
    reference = copy.deepcopy(base)
    layer = course_class(base, R, ALPHA)
    x = make_input()
    assert torch.equal(layer(x), reference(x))
    A, B = _factors(layer)
    if course_class is LoRAEmbedding:  # PEFT's embedding convention: A zero, B normal
        assert A.count_nonzero() == 0 and B.count_nonzero() == B.numel()
    else:  # B zero, A Kaiming-uniform(a=sqrt(5)): bound 1 / sqrt(fan_in)
        fan_in = A[0].numel()
        assert B.count_nonzero() == 0 and A.count_nonzero() == A.numel()
        assert A.abs().max() <= 1 / math.sqrt(fan_in)
        assert A.abs().max() > 0.5 / math.sqrt(fan_in)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(not p.requires_grad for p in layer.base_layer.parameters())
    assert layer.scaling == ALPHA / R


def test_rslora_scaling():
    assert LoRALinear(nn.Linear(4, 4), 4, 8.0, rslora=True).scaling == 8.0 / 2


def test_dropout_is_on_the_lora_branch_only():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoRALinear(copy.deepcopy(base), R, ALPHA, dropout=0.5).train()
    x = torch.randn(4, 16)
    # B = 0: whatever the dropout does to the branch, the output is the intact base path.
    assert torch.equal(layer(x), base(x))
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    no_dropout = base(x) + layer.lora_B(layer.lora_A(x)) * layer.scaling
    assert not torch.allclose(layer(x), no_dropout)  # train: the branch is dropped out
    torch.testing.assert_close(layer.eval()(x), no_dropout, **SAME_OPS)  # eval: dropout is off
    # PEFT in train mode with the same seed drops the same entries.
    theirs = _peft_layer(base, dropout=0.5).train()
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(layer.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(layer.lora_B.weight)
    layer.train()
    torch.manual_seed(3)
    ours_out = layer(x)
    torch.manual_seed(3)
    torch.testing.assert_close(ours_out, theirs(x), **SAME_OPS)


def test_merge_on_eval_merges_and_train_unmerges():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, 2, 4.0, merge_on_eval=True)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 6)
    unmerged_out = layer(x).detach()
    nn.Sequential(layer).eval()  # through a parent, as model.eval() does
    assert layer.merged and not torch.allclose(layer.base_layer.weight, w0)
    torch.testing.assert_close(layer(x), unmerged_out, **MERGE)
    layer.train()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, w0, **ROUND_TRIP)
    assert not LoRALinear(nn.Linear(6, 5), 2, 4.0).eval().merged  # off by default


@pytest.mark.parametrize(
    ("make", "error", "phrase"),
    [
        (lambda: LoRALinear(nn.Linear(4, 4), 0, 1.0), ValueError, "positive integer"),
        (lambda: LoRALinear(nn.Linear(4, 4), 2.5, 1.0), ValueError, "positive integer"),
        (lambda: LoRALinear(nn.Linear(4, 4), True, 1.0), ValueError, "positive integer"),
        (lambda: LoRALinear(nn.Linear(4, 4), 2, 0.0), ValueError, "alpha"),
        (lambda: LoRALinear(nn.Linear(4, 4), 2, 1.0, dropout=1.0), ValueError, "dropout"),
        (lambda: LoRALinear(nn.Conv2d(3, 3, 1), 2, 1.0), TypeError, "LoRAConv2d"),
        (lambda: LoRAEmbedding(nn.Linear(3, 3), 2, 1.0), TypeError, "LoRALinear"),
        (lambda: LoRAConv2d(nn.Conv2d(4, 4, 3, groups=2), 2, 1.0), ValueError, "groups"),
        (lambda: MergedLoRALinear(nn.Linear(4, 10), 2, 1.0, enable_lora=[True, False, True]), ValueError, "split evenly"),
        (lambda: MergedLoRALinear(nn.Linear(4, 9), 2, 1.0, enable_lora=[False, False, False]), ValueError, "all False"),
    ],
)
def test_bad_arguments_say_what_is_wrong(make, error, phrase):
    with pytest.raises(error, match=phrase):
        make()


# ---------------------------------------------------------------------------
# Fused qkv
# ---------------------------------------------------------------------------


def test_fused_qkv_equals_separate_layers():
    torch.manual_seed(0)
    d, r = 8, 2
    qkv = nn.Linear(d, 3 * d)
    fused = MergedLoRALinear(copy.deepcopy(qkv), r, 4.0, enable_lora=[True, False, True])
    with torch.no_grad():
        fused.lora_B.normal_()
    parts = []
    for i, has_lora in enumerate([True, False, True]):
        part = nn.Linear(d, d)
        with torch.no_grad():
            part.weight.copy_(qkv.weight[i * d:(i + 1) * d])
            part.bias.copy_(qkv.bias[i * d:(i + 1) * d])
        if has_lora:
            n = fused.enabled.index(i)
            part = LoRALinear(part, r, 4.0)
            with torch.no_grad():
                part.lora_A.weight.copy_(fused.lora_A.weight[n * r:(n + 1) * r])
                part.lora_B.weight.copy_(fused.lora_B[n])
        parts.append(part)
    x = torch.randn(3, 5, d)
    separate = torch.cat([p(x) for p in parts], dim=-1)
    # Same products, but one (3*d)-row matmul against three d-row ones: rounding may differ.
    torch.testing.assert_close(fused(x), separate, **MERGE)
    assert torch.equal(fused(x)[..., d:2 * d], qkv(x)[..., d:2 * d])  # k has no LoRA

    delta = fused.get_delta_weight()
    assert delta[d:2 * d].count_nonzero() == 0
    torch.testing.assert_close(delta[:d], parts[0].get_delta_weight(), **MERGE)
    torch.testing.assert_close(delta[2 * d:], parts[2].get_delta_weight(), **MERGE)
    before = fused(x).detach()
    fused.merge()
    fused.merge()
    torch.testing.assert_close(fused(x), before, **MERGE)
    fused.unmerge()
    torch.testing.assert_close(fused.base_layer.weight, qkv.weight, **ROUND_TRIP)


# ---------------------------------------------------------------------------
# Injecting, freezing, saving
# ---------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.norm = nn.LayerNorm(8)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(30, 8)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(4, 30, bias=False)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        for block in self.layers:
            h = block.norm(h + block.v_proj(block.q_proj(h)))
        return self.head(self.layers[-1].out(h))


def _lora_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAEmbedding, peft_lora.LoraLayer))}


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["layers.1.q_proj", "embed_tokens"], ["out", "head"]])
def test_inject_lora_picks_the_modules_peft_picks(targets):
    ours = inject_lora(Tiny(), targets, R, ALPHA)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets), Tiny())
    assert _lora_names(ours) == _lora_names(theirs)
    assert _lora_names(ours)


def test_inject_lora_lists_what_could_be_targeted():
    with pytest.raises(ValueError, match="target_modules") as info:
        inject_lora(Tiny(), ["k_proj"], R, ALPHA)
    message = str(info.value)
    assert "embed_tokens, head, out, q_proj, v_proj." in message  # sorted, each once
    assert "norm" not in message and "layers" not in message  # not LoRA-able


def test_a_target_matches_whole_name_parts_only():
    # "proj" is the end of "q_proj" but not a dot-separated part of any name: no match, as in PEFT.
    with pytest.raises(ValueError, match="No module matches"):
        inject_lora(Tiny(), ["proj"], R, ALPHA)
    with pytest.raises(ValueError):
        peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["proj"]), Tiny())


def test_inject_lora_refuses_other_module_types_and_twice():
    model = Tiny()
    with pytest.raises(TypeError, match="LayerNorm"):
        inject_lora(model, ["q_proj", "norm"], R, ALPHA)
    assert not _lora_names(model)  # nothing was changed
    model = inject_lora(Tiny(), ["q_proj"], R, ALPHA)
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model, ["q_proj"], R, ALPHA)


def test_inject_lora_passes_dropout_and_keeps_the_output():
    torch.manual_seed(0)
    model = Tiny()
    ids = torch.randint(0, 30, (2, 5))
    before = model(ids)
    inject_lora(model, ["q_proj", "embed_tokens"], R, ALPHA, dropout=0.1)
    assert model.layers[0].q_proj.dropout.p == 0.1
    assert torch.equal(model(ids), before)


def test_mark_only_lora_as_trainable_modes():
    model = inject_lora(Tiny(), ["q_proj"], R, ALPHA)

    def trainable():
        return {n for n, p in model.named_parameters() if p.requires_grad}

    lora = {f"layers.{i}.q_proj.lora_{ab}.weight" for i in (0, 1) for ab in "AB"}
    mark_only_lora_as_trainable(model)
    assert trainable() == lora
    mark_only_lora_as_trainable(model, bias="lora_only")
    assert trainable() == lora | {"layers.0.q_proj.base_layer.bias", "layers.1.q_proj.base_layer.bias"}
    mark_only_lora_as_trainable(model, bias="all")
    biases = {n for n, _ in model.named_parameters() if n.endswith("bias")}
    assert "layers.0.norm.bias" in biases
    assert trainable() == lora | biases
    with pytest.raises(ValueError, match="lora_only"):
        mark_only_lora_as_trainable(model, bias="some")


def test_lora_state_dict_keys():
    model = inject_lora(Tiny(), ["q_proj", "embed_tokens"], R, ALPHA)
    lora = {f"layers.{i}.q_proj.lora_{ab}.weight" for i in (0, 1) for ab in "AB"}
    lora |= {"embed_tokens.lora_embedding_A", "embed_tokens.lora_embedding_B"}
    assert set(lora_state_dict(model)) == lora
    only = set(lora_state_dict(model, bias="lora_only"))
    assert only == lora | {"layers.0.q_proj.base_layer.bias", "layers.1.q_proj.base_layer.bias"}
    assert set(lora_state_dict(model, bias="all")) == lora | {k for k in model.state_dict() if k.endswith("bias")}
    # The saved dict loads back into a fresh injected model (strict=False: the base is not in it).
    fresh = inject_lora(Tiny(), ["q_proj", "embed_tokens"], R, ALPHA)
    missing, unexpected = fresh.load_state_dict(lora_state_dict(model), strict=False)
    assert not unexpected and not (set(missing) & lora)


def test_a_rank_larger_than_the_layer_is_refused():
    with pytest.raises(ValueError, match="Choose a smaller r"):
        LoRALinear(nn.Linear(16, 4), r=5, alpha=10)
    LoRALinear(nn.Linear(16, 4), r=4, alpha=8)  # the largest useful rank is fine


def _layer_classes():
    from course.dora import DoRALinear
    from course.nola import NOLALoRALinear
    from course.olora import OLoRALinear

    return [LoRALinear, LoRAEmbedding, LoRAConv2d, MergedLoRALinear, DoRALinear, OLoRALinear, NOLALoRALinear]


@pytest.mark.parametrize("layer_class", _layer_classes(), ids=lambda c: c.__name__)
def test_every_layer_class_takes_base_r_alpha_positionally_and_options_by_keyword_only(layer_class):
    params = list(inspect.signature(layer_class).parameters.values())
    assert [p.name for p in params[:3]] == ["base", "r", "alpha"]
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params[:3])
    assert params[3:] and all(p.kind is p.KEYWORD_ONLY for p in params[3:]), params


def test_an_option_passed_by_position_is_refused_not_put_in_another_slot():
    with pytest.raises(TypeError, match="positional"):
        LoRAEmbedding(nn.Embedding(10, 4), 2, 4.0, 0.1)  # once silently merge_on_eval=0.1
    with pytest.raises(TypeError, match="positional"):
        LoRALinear(nn.Linear(4, 4), 2, 4.0, 0.1)
    assert LoRALinear(nn.Linear(4, 4), 2, 4.0, dropout=0.1).dropout.p == 0.1
