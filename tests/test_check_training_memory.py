"""check.training_memory both ways, and course.practice.training_memory against measurement on a tiny Llama."""

from __future__ import annotations

import pytest
import torch
from answers import checks_own_solution

from course import check
from course.check.practice import tiny_llama
from course.memory import tensor_bytes
from course.practice import TrainingMemory, nf4_bytes_per_weight, training_memory

# ---------------------------------------------------------------------------
# The reference against measurement
# ---------------------------------------------------------------------------


def _unique_params(model):
    seen, out = set(), []
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            out.append(p)
    return out


def _measure_one_step(model):
    """(gradient bytes, AdamW exp_avg + exp_avg_sq bytes) after one step on the trainable parameters."""
    trainable = [p for p in _unique_params(model) if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in _unique_params(model) if p.grad is not None)
    states = sum(s[k].numel() * s[k].element_size() for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq"))
    return grads, states


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_fine_tuning_matches_measurement(dtype):
    model = tiny_llama().to(dtype)
    n = sum(p.numel() for p in _unique_params(model))
    want = training_memory("full", n, n, dtype=dtype)
    weights = sum(p.numel() * p.element_size() for p in _unique_params(model))
    assert weights == tensor_bytes(model) - sum(b.numel() * b.element_size() for b in model.buffers())
    assert want.weights == weights
    assert (want.gradients, want.optimizer_state) == _measure_one_step(model)


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_lora_matches_measurement_with_peft(base_dtype):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama().to(base_dtype)
    n = sum(p.numel() for p in _unique_params(base))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = sum(p.numel() for p in _unique_params(model) if p.requires_grad)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # PEFT's adapters
    want = training_memory("lora", n, trainable, dtype=base_dtype, adapter_dtype=torch.float32)
    assert want.weights == sum(p.numel() * p.element_size() for p in _unique_params(model))
    assert (want.gradients, want.optimizer_state) == _measure_one_step(model)
    assert want.total == want.weights + want.gradients + want.optimizer_state


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_bytes_match_bitsandbytes(double_quant):
    F = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(64 * 8, 64 * 4, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16)
    packed, state = F.quantize_4bit(weight, quant_type="nf4", compress_statistics=double_quant)
    stored = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    if double_quant:
        stored += state.state2.absmax.numel() * state.state2.absmax.element_size()
    assert stored == weight.numel() * nf4_bytes_per_weight(double_quant)
    memory = training_memory("qlora", weight.numel() + 10, 40, n_quantised=weight.numel(), dtype=torch.bfloat16,
                             double_quant=double_quant)
    assert memory.weights == stored + 10 * 2 + 40 * 4


@pytest.mark.parametrize(("args", "phrase"), [
    (("adam", 10, 10), "method must be one of"),
    (("full", 10, 11), "cannot exceed n_params"),
    (("lora", 10, 2, 5), "0 for 'lora'"),
    (("lora", -1, 2), "n_params must be a whole number"),
])
def test_bad_input_is_refused_with_a_reason(args, phrase):
    with pytest.raises(ValueError, match=phrase):
        training_memory(*args)


# ---------------------------------------------------------------------------
# The check: correct answers, written differently
# ---------------------------------------------------------------------------


def as_dict(method, n_params, n_trainable, n_quantised=0, dtype=torch.float32, adapter_dtype=torch.float32,
            double_quant=False):
    """A dict, bytes from the dtypes' itemsize, the constants block by block."""
    base = (n_params - n_quantised) * dtype.itemsize
    blocks = n_quantised // 64
    constants = blocks + (blocks // 256) * 4 if double_quant else blocks * 4
    base += n_quantised // 2 + constants
    each = dtype.itemsize if method == "full" else adapter_dtype.itemsize
    adapter = n_trainable * each if method in ("lora", "qlora") else 0
    return {"weights": base + adapter, "gradients": n_trainable * each, "optimizer_state": n_trainable * each * 2}


class Estimate:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def as_object(method, n_params, n_trainable, n_quantised, dtype, adapter_dtype, double_quant):
    d = as_dict(method, n_params, n_trainable, n_quantised, dtype, adapter_dtype, double_quant)
    return Estimate(**{k: torch.tensor(float(v), dtype=torch.float64) for k, v in d.items()})


def other_names(how, total, trained, four_bit, base_dtype, lora_dtype, dq):
    """Parameters named differently: the check passes its arguments by position."""
    return training_memory(how, total, trained, four_bit, base_dtype, lora_dtype, dq)


def _fallback_solution():
    return checks_own_solution(check.training_memory, "training_memory", torch=torch, TrainingMemory=TrainingMemory)


@pytest.mark.parametrize("answer", [training_memory, as_dict, as_object, other_names, _fallback_solution()],
                         ids=["reference", "dict", "object_of_tensors", "other_names", "fallback_solution"])
def test_correct_answers_pass(answer):
    result = check.training_memory.run(answer)
    assert result.status == "passed", result.message


# ---------------------------------------------------------------------------
# Typical mistakes
# ---------------------------------------------------------------------------


def _changed(**fields):
    """The reference with some fields replaced by fn(case) -> value."""
    def answer(method, n_params, n_trainable, n_quantised=0, dtype=torch.float32, adapter_dtype=torch.float32,
               double_quant=False):
        case = dict(method=method, n_params=n_params, n_trainable=n_trainable, n_quantised=n_quantised, dtype=dtype,
                    adapter_dtype=adapter_dtype, double_quant=double_quant)
        right = training_memory(**case).__dict__.copy()
        right.update({k: f(case, right) for k, f in fields.items()})
        return TrainingMemory(**right)
    return answer


def _t(c):
    return (c["dtype"] if c["method"] == "full" else c["adapter_dtype"]).itemsize


def _quantised_at(per_weight):
    """The 4-bit weights at per_weight bytes each (None: in dtype, not quantised at all)."""
    def weights(c, r):
        each = c["dtype"].itemsize if per_weight is None else per_weight
        return r["weights"] - c["n_quantised"] * nf4_bytes_per_weight(c["double_quant"]) + c["n_quantised"] * each
    return weights


MISTAKES = {
    "one_adam_state": (_changed(optimizer_state=lambda c, r: c["n_trainable"] * _t(c)), ["optimizer_state", "two"]),
    "state_for_frozen": (_changed(optimizer_state=lambda c, r: 2 * (c["n_params"] + c["n_trainable"]) * _t(c)
                                  if c["method"] != "full" else r["optimizer_state"]),
                         ["optimiser state for the frozen base weights"]),
    "grads_for_frozen": (_changed(gradients=lambda c, r: c["n_params"] * c["dtype"].itemsize + c["n_trainable"] * _t(c)
                                  if c["method"] != "full" else r["gradients"]),
                         ["gradients for the frozen base weights", "requires_grad=False"]),
    "four_bit_at_one_byte": (_changed(weights=_quantised_at(1.0)),
                             ["4-bit weights at one byte each and no quantisation constants"]),
    "no_constants": (_changed(weights=_quantised_at(0.5)), ["without their quantisation constants", "absmax"]),
    "double_quant_swapped": (_changed(weights=lambda c, r: _quantised_at(nf4_bytes_per_weight(not c["double_quant"]))(c, r)),
                             ["constants of double quantisation"]),
    "no_adapter_weights": (_changed(weights=lambda c, r: c["n_params"] * c["dtype"].itemsize
                                    if c["method"] != "full" else r["weights"]), ["no adapter weights"]),
    "states_in_float32": (_changed(optimizer_state=lambda c, r: 2 * c["n_trainable"] * 4), ["in float32", "zeros_like"]),
    "base_in_dtype": (_changed(weights=_quantised_at(None)), ["base weights all in dtype"]),
    "off_by_a_little": (_changed(gradients=lambda c, r: r["gradients"] + 8), ["gradients is", "expected"]),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_each_mistake_fails_with_its_own_message(name):
    answer, phrases = MISTAKES[name]
    result = check.training_memory.run(answer)
    assert result.status == "failed", f"{name} passed"
    for phrase in phrases:
        assert phrase in result.message, result.message


def test_a_missing_field_and_a_stub():
    result = check.training_memory.run(lambda *args: {"weights": 1, "gradients": 2})
    assert result.status == "failed" and "no optimizer_state" in result.message

    def stub(*args, **kwargs):
        raise NotImplementedError()

    assert check.training_memory.run(stub).status == "not_attempted"
