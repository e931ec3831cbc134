"""Checks for notebook 01 (loading and inspecting adapters): ``delta_weight``, ``lora_parameter_count``.

Both are judged against PEFT on small seeded models built here, not on the
135M base model, so that a check takes well under a second.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from course.adapters.anatomy import delta_weight as _delta_weight_solution
from course.adapters.anatomy import lora_parameter_count as _count_solution
from course.check.core import Failure, check, close, expect
from course.surgery import matches_target


class _Block(nn.Module):
    def __init__(self, width: int = 6, narrow: int = 4, hidden: int = 10):
        super().__init__()
        self.q_proj = nn.Linear(width, width)  # square
        self.k_proj = nn.Linear(width, narrow, bias=False)
        self.v_proj = nn.Linear(width, narrow)  # not square: out 4, in 6
        self.o_proj = nn.Linear(narrow, width, bias=False)
        self.up_proj = nn.Linear(width, hidden)
        self.down_proj = nn.Linear(hidden, width)


class _Tiny(nn.Module):
    """Two blocks of differently shaped Linear layers, named as in Llama."""

    def __init__(self, blocks: int = 2, **shape):
        super().__init__()
        self.layers = nn.ModuleList(_Block(**shape) for _ in range(blocks))

    def forward(self, x):
        for block in self.layers:
            x = x + block.o_proj(block.v_proj(x)) + block.q_proj(x) + block.down_proj(block.up_proj(x))
        return x


def _lora(r: int, alpha: float, targets=("q_proj", "v_proj")):
    from peft import LoraConfig

    # init_lora_weights=False: B is random too, so that every adapter has a non-zero change
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)


def _two_adapter_model(active: str):
    """A seeded PEFT model with adapters "first" (r=2, scaling 3) and "second" (r=4, scaling 0.5)."""
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_Tiny(), _lora(2, 6), adapter_name="first")
    torch.manual_seed(1)
    model.add_adapter("second", _lora(4, 2))
    model.set_adapter(active)
    return model


def _one_adapter_model():
    from peft import get_peft_model

    torch.manual_seed(2)
    return get_peft_model(_Tiny(), _lora(2, 5))  # adapter "default", scaling 2.5


def _rslora_and_pattern_model():
    """rsLoRA (scaling alpha / sqrt(r)) with a rank_pattern and an alpha_pattern: the scaling
    differs from ``lora_alpha / r`` and from layer to layer."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.q_proj": 3})
    return get_peft_model(_Tiny(), config, adapter_name="tuned")


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # float32 products of a few numbers of order 1: 1e-5 is far above rounding, far below any mistake
    return close(a, b, rtol=1e-5, atol=1e-6)


def _call(answer, model, module_name: str) -> torch.Tensor:
    try:
        got = answer(model, module_name)
    except NotImplementedError:
        raise
    except KeyError as exc:
        raise Failure(
            f"Your function looked up {exc} and it is not there. This model's adapters are "
            f"{sorted(model.peft_config)} and the active one is {model.active_adapter!r}: take the "
            "adapter's name from `peft_model.active_adapter` rather than writing it in."
        ) from None
    except (RuntimeError, AttributeError) as exc:
        raise Failure(
            f"Your function raised {type(exc).__name__}: {exc}\n"
            f"Get the layer with `peft_model.get_submodule(module_name)`; its `lora_A[name].weight` is "
            "(r, in_features) and `lora_B[name].weight` is (out_features, r), so the product is B @ A."
        ) from None
    if not isinstance(got, torch.Tensor):
        raise Failure(f"Return a torch.Tensor of shape (out_features, in_features), not {type(got).__name__}.")
    return got.detach().float()


def _diagnose(got, model, module_name: str, where: str) -> None:
    layer = model.get_submodule(module_name)
    active = model.active_adapter
    want = layer.get_delta_weight(active).detach()  # PEFT's own answer
    out_features, in_features = want.shape
    if _close(got, want):
        return
    if got.shape != want.shape:
        if tuple(got.shape) == (in_features, out_features):
            raise Failure(
                f"{where}: your tensor is {tuple(got.shape)}, the transpose of the weight's shape "
                f"({out_features}, {in_features}). A Linear layer's weight is (out_features, in_features): "
                "the change is B @ A with B = lora_B.weight (out, r) and A = lora_A.weight (r, in), "
                "not A.T @ B.T."
            )
        raise Failure(
            f"{where}: your tensor is {tuple(got.shape)}, the layer's weight is ({out_features}, {in_features}). "
            "Multiply B (out, r) by A (r, in): B @ A."
        )
    A = layer.lora_A[active].weight.detach()
    B = layer.lora_B[active].weight.detach()
    scaling = layer.scaling[active]
    config = model.peft_config[active]
    from_config = config.lora_alpha / config.r
    if abs(from_config - scaling) > 1e-6 and _close(got, from_config * B @ A):
        raise Failure(
            f"{where}: you took the scaling from the config, lora_alpha / r = {from_config:g}, but this layer "
            f"scales by {scaling:g}: with rsLoRA it is alpha / sqrt(r), and rank_pattern / alpha_pattern "
            "give layers their own r and alpha. Read the layer's own `layer.scaling[adapter_name]`."
        )
    if _close(got, B @ A):
        raise Failure(
            f"{where}: you returned B @ A without the scaling. LoRA adds scaling * B @ A with "
            f"scaling = lora_alpha / r (here {scaling:g}); PEFT keeps it in `layer.scaling[adapter_name]`."
        )
    if _close(got, want.T) or _close(got, (B @ A).T):
        raise Failure(
            f"{where} (a square layer): you returned the transpose of the change. The change is B @ A "
            "with B = lora_B.weight (out, r) and A = lora_A.weight (r, in): check which is which."
        )
    if _close(got, layer.base_layer.weight.detach() + want):
        raise Failure(f"{where}: that is the merged weight W + scaling * B @ A; return only the change.")
    for other in model.peft_config:
        if other != active and other in layer.lora_A:
            if _close(got, layer.get_delta_weight(other).detach()) or _close(
                got, layer.lora_B[other].weight.detach() @ layer.lora_A[other].weight.detach()
            ):
                raise Failure(
                    f"{where}: that is the change of adapter {other!r}, but the active adapter is "
                    f"{active!r}. Read its name from `peft_model.active_adapter`; `set_adapter` changes it."
                )
    flat_got, flat_want = got.flatten(), want.flatten()
    factor = (flat_got @ flat_want) / (flat_want @ flat_want)
    if _close(got, factor * want):
        raise Failure(
            f"{where}: your change is {factor.item():.4g} times the right one: the scaling is "
            f"lora_alpha / r = {scaling:g} (from `layer.scaling[adapter_name]`)."
        )
    raise Failure(
        f"{where}: your tensor has the right shape but not the right values (largest difference "
        f"{(got - want).abs().max().item():.3g}). The change is layer.scaling[name] * lora_B[name].weight "
        "@ lora_A[name].weight for the active adapter."
    )


@check(
    "delta_weight",
    hint=[
        "Get the LoRA layer with `peft_model.get_submodule(module_name)`. It keeps one A, one B and one "
        "scaling per adapter, keyed by the adapter's name: which name is in use?",
        "The adapter in use is `peft_model.active_adapter`. `layer.lora_A[name].weight` is A (r x in), "
        "`layer.lora_B[name].weight` is B (out x r), and `layer.scaling[name]` is the layer's own scaling "
        "(not always lora_alpha / r: rsLoRA and rank patterns change it).",
        "`layer = peft_model.get_submodule(module_name)`, `name = peft_model.active_adapter`, then "
        "`return layer.scaling[name] * layer.lora_B[name].weight @ layer.lora_A[name].weight`.",
    ],
    solution=_delta_weight_solution,
    reference="course.adapters.anatomy:delta_weight",
)
def delta_weight(answer):
    """``answer(peft_model, module_name) -> Tensor(out, in)``: the active adapter's ``scaling * B @ A``."""
    if not callable(answer):
        raise Failure(f"Expected a function f(peft_model, module_name) -> Tensor, got {type(answer).__name__}.")
    one = _one_adapter_model()
    for module_name in ("base_model.model.layers.0.v_proj", "base_model.model.layers.1.q_proj"):
        got = _call(answer, one, module_name)
        _diagnose(got, one, module_name, f"For {module_name} (adapter 'default')")
    tuned = _rslora_and_pattern_model()
    for module_name in ("base_model.model.layers.0.q_proj", "base_model.model.layers.0.v_proj",
                        "base_model.model.layers.1.q_proj"):
        got = _call(answer, tuned, module_name)
        _diagnose(got, tuned, module_name, f"For {module_name} of an rsLoRA adapter with rank and alpha patterns")
    for active in ("second", "first"):
        model = _two_adapter_model(active)
        for module_name in ("base_model.model.layers.1.q_proj", "base_model.model.layers.0.v_proj"):
            got = _call(answer, model, module_name)
            _diagnose(
                got,
                model,
                module_name,
                f"For {module_name} of a model with adapters 'first' and 'second', {active!r} active",
            )


def _peft_count(model: nn.Module, r: int, targets) -> int:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=r, target_modules=list(targets)))
    return peft_model.get_nb_trainable_parameters()[0]


def _linears(model: nn.Module, targets) -> list[nn.Linear]:
    return [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and matches_target(n, targets)]


@check(
    "lora_parameter_count",
    hint=[
        "A LoRA layer adds two thin matrices beside the frozen weight: A (r x in_features) and "
        "B (out_features x r). Which layers get one?",
        "Walk `model.named_modules()`; a layer is targeted when it is an `nn.Linear` and its name is one "
        "of `target_modules` or ends in `'.' + target` (PEFT's rule: `q_proj` and `0.q_proj` both pick "
        "`layers.0.q_proj`). Biases and the base weights are not part of the adapter.",
        "Add up `r * (module.in_features + module.out_features)` over every `name, module` in "
        "`model.named_modules()` with `isinstance(module, nn.Linear)` and "
        "`any(name == t or name.endswith('.' + t) for t in target_modules)`.",
    ],
    solution=_count_solution,
    reference="course.adapters.anatomy:lora_parameter_count",
)
def lora_parameter_count(answer):
    """``answer(model, r, target_modules) -> int``: what a LoRA adds, equal to PEFT's trainable count."""
    if not callable(answer):
        raise Failure(f"Expected a function f(model, r, target_modules) -> int, got {type(answer).__name__}.")
    torch.manual_seed(0)
    cases = [
        ("a 2-block model, r=2 on q_proj and v_proj", _Tiny(), 2, ["q_proj", "v_proj"]),
        ("a 3-block model, r=4 on every projection", _Tiny(blocks=3), 4, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
        ("a 2-block model of other widths, r=3 on k_proj and down_proj", _Tiny(width=8, narrow=2, hidden=5), 3, ["k_proj", "down_proj"]),
        ("a 2-block model, r=2 on 0.q_proj (block 0's only) and v_proj", _Tiny(), 2, ["0.q_proj", "v_proj"]),
    ]
    for label, model, r, targets in cases:
        got = answer(model, r, list(targets))
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        expect(
            isinstance(got, int) and not isinstance(got, bool),
            f"For {label} your function returned {got!r} ({type(got).__name__}); return a Python int.",
        )
        want = _peft_count(model, r, targets)
        if got == want:
            continue
        layers = _linears(model, targets)
        all_linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        blocks = len(model.layers)
        mistakes = {
            sum(r * m.in_features * m.out_features for m in layers): "you counted r x in x out per layer: "
            "A and B are two thin matrices, r x in and out x r, so a layer adds r x (in + out).",
            sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in layers): "you counted "
            "the targeted layers' own weights; the adapter adds r x (in + out) per layer beside them.",
            sum(r * m.in_features for m in layers): "you counted A only (r x in); B (out x r) counts too.",
            sum(r * m.out_features for m in layers): "you counted B only (out x r); A (r x in) counts too.",
            want + sum(m.out_features for m in layers if m.bias is not None): "you added the biases; LoRA "
            "adds no bias, only A and B.",
            want // blocks: f"you counted one block; the target names match in each of the {blocks} blocks.",
            sum(r * (m.in_features + m.out_features) for m in all_linears): "you counted every Linear layer; "
            "only those whose name ends in one of the target modules get an adapter.",
            sum(r * (m.in_features + m.out_features) for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and n.split(".")[-1] in targets): "you compared the last part of each "
            "name with the targets, so a dotted target such as `0.q_proj` matched nothing. PEFT's rule: a name "
            "matches when it is a target or ends in '.' + target (`0.q_proj` picks `layers.0.q_proj`).",
        }
        mistakes.pop(want, None)
        reason = mistakes.get(got, "look at which layers are targeted and what A and B add to each.")
        raise Failure(f"For {label} you returned {got:,}; PEFT adds {want:,}: {reason}")
