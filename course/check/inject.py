"""``check.inject_lora`` (notebook 02, exercise 2): a LoRA layer in place of every targeted ``nn.Linear``.

The check runs the learner's ``inject(model, targets, r, alpha, layer)`` on three tiny models
(``course.check.toy_models``) with a spy ``layer`` that notes what it wraps, and compares the
wrapped modules with PEFT's target rule (``course.surgery.matches_target``), restricted to
``nn.Linear``; then only LoRA may be trainable and, B being zero, the model must compute what it
computed before. Its reference is ``course.lora.inject_lora_linear``.
"""

from __future__ import annotations

import torch
from torch import nn

from course.check.core import Failure, check, close, expect
from course.check.toy_models import _LlamaLike, _T5Like, _ViTLike
from course.surgery import matches_target

INJECT_R, INJECT_ALPHA = 2, 5.0  # distinct, so that swapped arguments show


def _inject_cases():
    torch.manual_seed(0)
    yield "a Llama-like model, targets ['q_proj', 'v_proj']", _LlamaLike(), ["q_proj", "v_proj"], torch.tensor([[1, 4, 2, 9]])
    yield "a T5-like model, targets ['q', 'o']", _T5Like(), ["q", "o"], torch.randn(2, 3, 5)
    yield ("a ViT-like model, targets ['qkv', 'proj', 'head']", _ViTLike(), ["qkv", "proj", "head"],
           torch.randn(2, 3, 4, 4))


def _spy_layer(made: list):
    """The ``layer`` the check passes: a minimal LoRA layer that notes what it wraps.

    It does not freeze its base layer (freezing is ``inject``'s job here) and starts with
    B = 0, so a model with it in the right places computes what it computed before.
    """

    class CheckLoRA(nn.Module):
        def __init__(self, base, r, alpha, dropout=0.0):
            super().__init__()
            made.append((base, r, alpha))
            self.base_layer = base
            self.scaling = alpha / r
            if isinstance(base, nn.Linear):
                rank = max(1, int(r))  # even when r and alpha come swapped: the check says so afterwards
                self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) / 3)
                self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))

        def forward(self, x):
            out = self.base_layer(x)
            if isinstance(self.base_layer, nn.Linear):
                out = out + self.scaling * x @ self.lora_A.T @ self.lora_B.T
            return out

    return CheckLoRA


def _names(names) -> str:
    names = sorted(names)
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _judge_injection(answer, label, model, targets, x) -> None:
    originals = dict(model.named_modules())
    with torch.no_grad():
        before = model(x)
    linear = {n for n, m in originals.items() if n and isinstance(m, nn.Linear)}
    want = {n for n in linear if matches_target(n, targets)}  # PEFT's rule; the last name part, for plain names
    made: list = []
    spy = _spy_layer(made)
    got_model = answer(model, list(targets), INJECT_R, INJECT_ALPHA, layer=spy)
    expect(got_model is not None, f"For {label} your function returned None. Return the model (changing "
           "it in place and returning it is fine): `return model`.")
    expect(isinstance(got_model, nn.Module), f"For {label} your function returned a "
           f"{type(got_model).__name__}; return the model itself.")
    name_of = {id(m): n for n, m in originals.items()}
    wrapped_bases = [base for base, _, _ in made]
    not_linear = [f"{name_of.get(id(b), '?')} (an nn.{type(b).__name__})" for b in wrapped_bases
                  if not isinstance(b, nn.Linear)]
    expect(not not_linear, f"For {label} you wrapped {', '.join(not_linear)}: `layer` is a LoRA layer for "
           "nn.Linear only. Keep the name test, and add `isinstance(module, nn.Linear)`.")
    if not made:
        others = [n for n, m in got_model.named_modules() if hasattr(m, "lora_A")]
        expect(not others, f"For {label} your function did not use the `layer` it was given: it put other "
               "LoRA layers in. Build each wrapper with `layer(module, r, alpha)`, whatever class is passed.")
    placed = {n for n, m in got_model.named_modules() if isinstance(m, spy)}
    misplaced = sorted(n for n in placed if "." in n and _get(got_model, n) is not dict(got_model.named_modules())[n])
    if misplaced or (made and not placed):
        raise Failure(f"For {label} you made LoRA layers but they are not where the old layers were "
                      f"({_names(misplaced) or 'nowhere in the model'}). `setattr(model, 'layers.0.q_proj', new)` "
                      "adds an attribute with dots in its name; set the new layer on the parent instead: "
                      "`setattr(model.get_submodule(parent_name), child_name, new)`.")
    for _, r, alpha in made:
        expect((r, alpha) != (INJECT_ALPHA, INJECT_R), f"For {label} your layers got r={r}, alpha={alpha}: "
               "r and alpha are swapped. Call `layer(module, r, alpha)` in that order.")
        expect((r, alpha) == (INJECT_R, INJECT_ALPHA), f"For {label} your layers got r={r}, alpha={alpha}, "
               f"not the r={INJECT_R}, alpha={INJECT_ALPHA} passed to inject. Pass them on: `layer(module, r, alpha)`.")
    if placed != want:
        substring = {n for n in linear if any(t in n for t in targets)}
        suffix = {n for n in linear if any(n.endswith(t) for t in targets)}
        if placed == substring != want:
            raise Failure(f"For {label} you wrapped {_names(placed - want)} too: you matched a target anywhere in "
                          "the name (`t in name`). A module is a target when the last part of its name is one: "
                          "`name.rpartition('.')[2] in targets`.")
        if placed == suffix != want:
            raise Failure(f"For {label} you wrapped {_names(placed - want)} too: `name.endswith(t)` also matches "
                          "names that merely end in the same letters. Compare the last part of the name: "
                          "`name.rpartition('.')[2] in targets`.")
        if placed and all("." not in n for n in placed):
            raise Failure(f"For {label} you wrapped only top-level modules ({_names(placed)}), not "
                          f"{_names(want - placed)}: `model.named_children()` sees one level only. "
                          "`model.named_modules()` walks the whole tree, with dotted names.")
        if not placed:
            raise Failure(f"For {label} you wrapped nothing; the targets are {_names(want)}. Walk "
                          "`model.named_modules()` (every module, with dotted names such as "
                          "`layers.0.self_attn.q_proj`; `named_children()` sees one level only) and wrap each "
                          "nn.Linear whose last name part is in targets.")
        extra, missing = placed - want, want - placed
        raise Failure(f"For {label} the wrapped layers are not the targets"
                      + (f"; wrapped but not targets: {_names(extra)}" if extra else "")
                      + (f"; targets not wrapped: {_names(missing)}" if missing else "")
                      + ". A target is an nn.Linear whose last name part is in targets.")
    params = dict(got_model.named_parameters())
    lora = [n for n in params if "lora_" in n]
    frozen_lora = [n for n in lora if not params[n].requires_grad]
    expect(not frozen_lora, f"For {label} the LoRA parameters are frozen ({_names(frozen_lora)}): nothing "
           "would train. Set `requires_grad` to `'lora_' in name` for each parameter.")
    trainable = [n for n, p in params.items() if "lora_" not in n and p.requires_grad]
    expect(not trainable, f"For {label} the base model is still trainable ({_names(trainable)}): full "
           "fine-tuning plus LoRA. Freeze every parameter whose name does not contain 'lora_': "
           "`p.requires_grad_('lora_' in name)` over `model.named_parameters()`.")
    with torch.no_grad():
        after = got_model(x)
    expect(close(after, before, rtol=1e-5, atol=1e-6),
           f"For {label} the model computes something else after your injection, though B = 0. "
           "Wrap the module you found, unchanged: `layer(module, r, alpha)`.")


def _get(model: nn.Module, dotted: str):
    """The module at a dotted path, following attributes (None if there is none)."""
    try:
        return model.get_submodule(dotted)
    except AttributeError:
        return None


@check(
    "inject_lora",
    hint=[
        "`model.named_modules()` yields every module with its dotted name, such as "
        "`layers.0.self_attn.q_proj`. A module is a target when it is an `nn.Linear` and the last "
        "part of its name is in `targets`. Then freeze what is not LoRA.",
        "Collect the matches first (`list(model.named_modules())`), then swap each one on its parent: "
        "`parent_name, _, child = name.rpartition('.')` and "
        "`setattr(model.get_submodule(parent_name), child, layer(module, r, alpha))`. Finally "
        "`p.requires_grad_('lora_' in name)` for every `name, p in model.named_parameters()`, and "
        "`return model`.",
        "```python\n"
        "for name, module in list(model.named_modules()):\n"
        "    if isinstance(module, nn.Linear) and name.rpartition('.')[2] in targets:\n"
        "        parent, _, child = name.rpartition('.')\n"
        "        setattr(model.get_submodule(parent), child, layer(module, r, alpha))\n"
        "for name, p in model.named_parameters():\n"
        "    p.requires_grad_('lora_' in name)\n"
        "return model\n```",
    ],
    solution=None,  # the solution notebook's answer, from the exercise manifest
    reference="course.lora:inject_lora_linear",
)
def inject_lora(answer):
    """``answer(model, targets, r, alpha, layer)``: ``layer(module, r, alpha)`` in place of every
    nn.Linear whose last name part is in ``targets``, only ``lora_`` parameters trainable, the model returned."""
    expect(callable(answer), f"Expected a function inject(model, targets, r, alpha, layer), got {type(answer).__name__}.")
    with torch.random.fork_rng():
        for label, model, targets, x in _inject_cases():
            _judge_injection(answer, label, model, targets, x)
