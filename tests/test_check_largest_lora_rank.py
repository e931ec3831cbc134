"""check.largest_lora_rank both ways; course.practice's count equals PEFT's on tiny Llamas with SmolLM2's names."""

from __future__ import annotations

import pytest
import torch
from answers import checks_own_solution

from course import check
from course.check.practice import ALL_LINEAR, tiny_llama
from course.practice import largest_lora_rank, lora_parameter_count

# ---------------------------------------------------------------------------
# The reference against PEFT
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("targets", "rank", "bias", "attention_bias"), [
    (["q_proj", "v_proj"], 4, "none", False),
    (ALL_LINEAR, 3, "none", False),
    (["self_attn.q_proj", "mlp.down_proj"], 5, "none", False),
    (["q_proj", "k_proj", "v_proj", "o_proj"], 2, "lora_only", True),
    (["q_proj", "k_proj"], 2, "none", True),
    (["lm_head", "embed_tokens"], 2, "none", False),
])
def test_the_count_equals_peft(targets, rank, bias, attention_bias):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(attention_bias=attention_bias)
    ours = lora_parameter_count(model, targets, rank, bias=bias)
    peft_model = get_peft_model(model, LoraConfig(r=rank, target_modules=list(targets), bias=bias))
    assert ours == peft_model.get_nb_trainable_parameters()[0]


def test_the_largest_rank_is_the_last_that_fits():
    model = tiny_llama()
    for budget in (0, 1, 5000, 12345, lora_parameter_count(model, ALL_LINEAR, 7)):
        r = largest_lora_rank(model, ALL_LINEAR, budget)
        assert r == 0 or lora_parameter_count(model, ALL_LINEAR, r) <= budget
        assert lora_parameter_count(model, ALL_LINEAR, r + 1) > budget


@pytest.mark.parametrize(("call", "phrase"), [
    (lambda m: lora_parameter_count(m, ["qproj"], 2), "matches no module"),
    (lambda m: lora_parameter_count(m, ["self_attn"], 2), "LlamaAttention"),
    (lambda m: lora_parameter_count(m, ["q_proj"], 0), "rank must be a whole number"),
    (lambda m: largest_lora_rank(m, ["q_proj"], 10, bias="all"), "bias must be one of"),
    (lambda m: largest_lora_rank(m, ["q_proj"], -3), "budget must be a whole number"),
])
def test_bad_input_is_refused_with_a_reason(call, phrase):
    with pytest.raises(ValueError, match=phrase):
        call(tiny_llama())


# ---------------------------------------------------------------------------
# The check: correct answers, written differently
# ---------------------------------------------------------------------------


def _picked(model, targets):
    return [m for name, m in model.named_modules()
            if any(name == t or name.endswith("." + t) for t in targets)]


def by_search(model, target_modules, budget, bias="none"):
    """Counts by building the factors' shapes and counting up until the next rank does not fit."""
    layers = _picked(model, target_modules)

    def count(r):
        total = sum(torch.Size([r, m.weight.shape[1]]).numel() + torch.Size([m.weight.shape[0], r]).numel()
                    for m in layers)
        return total + (sum(m.bias.numel() for m in layers if m.bias is not None) if bias == "lora_only" else 0)

    r = 0
    while count(r + 1) <= budget:
        r += 1
    return r


def with_regex(model, target_modules, budget, bias="none"):
    """PEFT's rule as a regular expression; the answer as a float that is a whole number."""
    import re

    pattern = re.compile(r"(^|.*\.)(" + "|".join(map(re.escape, target_modules)) + r")$")
    per_rank = fixed = 0
    for name, m in model.named_modules():
        if pattern.match(name):
            per_rank += sum(m.weight.shape)
            fixed += m.bias.numel() if bias == "lora_only" and m.bias is not None else 0
    return float(max(0, (budget - fixed) // per_rank))


def _fallback_solution():
    return checks_own_solution(check.largest_lora_rank, "largest_lora_rank")


@pytest.mark.parametrize("answer", [largest_lora_rank, by_search, with_regex, _fallback_solution()],
                         ids=["reference", "search", "regex", "fallback_solution"])
def test_correct_answers_pass(answer):
    result = check.largest_lora_rank.run(answer)
    assert result.status == "passed", result.message


# ---------------------------------------------------------------------------
# Typical mistakes
# ---------------------------------------------------------------------------


def _rank(per_layer, fixed_of=lambda m: 0, match=lambda name, ts: any(name == t or name.endswith("." + t) for t in ts),
          rounding=lambda free, per: free // per):
    def answer(model, target_modules, budget, bias="none"):
        layers = [m for name, m in model.named_modules() if match(name, target_modules)]
        per = sum(per_layer(m) for m in layers)
        fixed = sum(fixed_of(m) if bias == "lora_only" else 0 for m in layers)
        return max(0, rounding(budget - fixed, per))
    return answer


def _bias(m):
    return m.bias.numel() if m.bias is not None else 0


right_size = lambda m: m.in_features + m.out_features  # noqa: E731

MISTAKES = {
    "only_A": (_rank(lambda m: m.in_features, _bias), ["count only A", "r * (in + out)"]),
    "only_B": (_rank(lambda m: m.out_features, _bias), ["count only B"]),
    "forgets_bias": (_rank(right_size), ["bias='lora_only'", "biases are trained too"]),
    "bias_always": (lambda model, targets, budget, bias="none": _rank(right_size, _bias)(model, targets, budget,
                                                                                       "lora_only"),
                    ["bias='none' trains no bias"]),
    "last_name_part": (_rank(right_size, _bias, match=lambda name, ts: name.split(".")[-1] in ts),
                       ["divided by zero", "dotted targets", "name.endswith('.' + t)"]),
    "strictly_less": (_rank(right_size, _bias, rounding=lambda free, per: (free - 1) // per),
                      ["off by one", "met exactly at rank 5"]),
    "rounds_up": (_rank(right_size, _bias, rounding=lambda free, per: -(-free // per)), ["off by one", "floor division"]),
    "true_division": (_rank(right_size, _bias, rounding=lambda free, per: free / per), ["whole number (int)"]),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_each_mistake_fails_with_its_own_message(name):
    answer, phrases = MISTAKES[name]
    result = check.largest_lora_rank.run(answer)
    assert result.status == "failed", f"{name} passed"
    for phrase in phrases:
        assert phrase in result.message, result.message


def test_a_stub_is_not_attempted():
    def stub(model, target_modules, budget, bias="none"):
        raise NotImplementedError()

    assert check.largest_lora_rank.run(stub).status == "not_attempted"
