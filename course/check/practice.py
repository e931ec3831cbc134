"""Checks for notebook 09 (choosing and using adapters in practice): a training memory estimate, LoRA under a budget.

``check.training_memory``: ``f(method, n_params, n_trainable, n_quantised, dtype, adapter_dtype,
double_quant) -> TrainingMemory`` (or any object or dict with ``weights``, ``gradients``,
``optimizer_state``), judged against ``course.practice.training_memory`` on seeded cases of each
method. ``check.largest_lora_rank``: ``f(model, target_modules, budget, bias) -> int``, the largest
rank r with r * sum(in + out) (+ the targeted biases for ``bias="lora_only"``) at most ``budget``,
judged against ``course.practice.largest_lora_rank`` on tiny Llama models with SmolLM2's module names.
"""

from __future__ import annotations

import torch

from course import practice
from course.check.core import Failure, check, expect

# ---------------------------------------------------------------------------
# training_memory
# ---------------------------------------------------------------------------

_MEMORY_SOLUTION = '''\
def training_memory(method, n_params, n_trainable, n_quantised=0, dtype=torch.float32,
                    adapter_dtype=torch.float32, double_quant=False):
    size = lambda d: torch.empty((), dtype=d).element_size()  # bytes per element
    nf4 = 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)  # 4 bits + the absmax constants
    base = (n_params - n_quantised) * size(dtype) + n_quantised * nf4
    t = size(dtype) if method == "full" else size(adapter_dtype)  # bytes per trainable parameter
    adapter = 0 if method == "full" else n_trainable * t
    return TrainingMemory(weights=base + adapter, gradients=n_trainable * t,
                          optimizer_state=2 * n_trainable * t)  # AdamW: exp_avg and exp_avg_sq'''

_FIELDS = ("weights", "gradients", "optimizer_state")


def _memory_cases():
    """(label, keyword arguments): each method, float32 and bfloat16 bases, with and without double quantisation."""
    generator = torch.Generator().manual_seed(9)

    def count(low, high, unit=1):
        return int(torch.randint(low, high, (1,), generator=generator)) * unit

    n = count(50, 200, 4096)
    yield "full fine-tuning in float32", dict(method="full", n_params=n, n_trainable=n, n_quantised=0,
                                              dtype=torch.float32, adapter_dtype=torch.float32, double_quant=False)
    n = count(50, 200, 4096)
    yield "full fine-tuning in bfloat16", dict(method="full", n_params=n, n_trainable=n, n_quantised=0,
                                               dtype=torch.bfloat16, adapter_dtype=torch.float32, double_quant=False)
    yield "LoRA on a float32 base", dict(method="lora", n_params=count(200, 400, 4096), n_trainable=count(100, 900, 8),
                                         n_quantised=0, dtype=torch.float32, adapter_dtype=torch.float32,
                                         double_quant=False)
    yield "LoRA on a bfloat16 base", dict(method="lora", n_params=count(200, 400, 4096), n_trainable=count(100, 900, 8),
                                          n_quantised=0, dtype=torch.bfloat16, adapter_dtype=torch.float32,
                                          double_quant=False)
    for double in (False, True):
        n_q = count(20, 60, 64 * 256)
        yield (f"QLoRA, {'with' if double else 'without'} double quantisation",
               dict(method="qlora", n_params=n_q + count(100, 300, 64), n_trainable=count(100, 900, 8),
                    n_quantised=n_q, dtype=torch.bfloat16, adapter_dtype=torch.float32, double_quant=double))


def _fields(out, where: str) -> dict[str, float]:
    if isinstance(out, dict):
        got = {f: out.get(f) for f in _FIELDS}
    else:
        got = {f: getattr(out, f, None) for f in _FIELDS}
    missing = [f for f, v in got.items() if v is None]
    expect(not missing, f"{where}: your answer has no {', '.join(missing)}. Return a TrainingMemory(weights=..., "
           "gradients=..., optimizer_state=...) (or a dict with those keys), each in bytes.")
    for f, v in got.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        expect(isinstance(v, (int, float)) and not isinstance(v, bool),
               f"{where}: {f} should be a number of bytes, got {type(v).__name__}.")
        got[f] = float(v)
    return got


def _size(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _memory_mistakes(field: str, case: dict):
    """(the value a typical mistake gives for ``field``, its message)."""
    method, n, t_n, q = case["method"], case["n_params"], case["n_trainable"], case["n_quantised"]
    d = _size(case["dtype"])
    t = d if method == "full" else _size(case["adapter_dtype"])
    if field == "optimizer_state":
        yield t_n * t, ("one AdamW state per trainable parameter; AdamW keeps two, exp_avg (the first moment) "
                        "and exp_avg_sq (the second): 2 * n_trainable * bytes per trainable parameter.")
        if method != "full":
            for wrong in (2 * (n + t_n) * t, 2 * n * t, 2 * (n * d + t_n * t), 2 * n * d):
                yield wrong, ("optimiser state for the frozen base weights too. The optimiser only sees the "
                              "trainable parameters (the adapter's): 2 * n_trainable * bytes of adapter_dtype.")
            yield 2 * t_n * d, ("the optimiser state in the base's dtype; AdamW's states are zeros_like(param), "
                                "the dtype of the trainable (adapter) parameters: adapter_dtype.")
        if d != 4:
            yield 2 * t_n * 4, ("the optimiser state in float32; torch.optim.AdamW makes its states with "
                                "zeros_like(param), so for parameters in bfloat16 they are bfloat16 too.")
    elif field == "gradients":
        if method != "full":
            for wrong in ((n + t_n) * t, n * t, n * d + t_n * t, n * d):
                yield wrong, ("gradients for the frozen base weights too. A frozen weight "
                              "(requires_grad=False) gets no .grad: only the n_trainable adapter parameters do.")
            yield t_n * d, "the gradients in the base's dtype; a gradient has its parameter's dtype: adapter_dtype."
        yield 2 * t_n * t, "two gradients per trainable parameter; there is one (two is AdamW's state)."
    elif field == "weights" and method != "full":
        adapter = t_n * t
        base = (n - q) * d
        yield n * d, ("no adapter weights: the model in training holds the base weights *and* the adapter's "
                      "n_trainable parameters, in adapter_dtype.")
        if q:
            yield n * d + adapter, "the base weights all in dtype; QLoRA keeps the n_quantised ones in 4 bits."
            yield base + q * 1.0 + q * 4 / 64 + adapter, ("4-bit weights at one byte each. NF4 packs two weights into "
                                                          "a byte: 0.5 byte per weight, plus the constants.")
            yield base + q * 1.0 + adapter, ("4-bit weights at one byte each and no quantisation constants. NF4 packs "
                                             "two weights into a byte (0.5 byte), plus one float32 absmax per block "
                                             "of 64 weights (4/64 byte per weight).")
            yield base + q * 0.5 + adapter, ("4-bit weights without their quantisation constants: bitsandbytes keeps "
                                             "one absmax per block of 64 weights, a float32 (4/64 byte per weight), "
                                             "or with double quantisation one byte per block plus a float32 per "
                                             "256 blocks.")
            other = practice.nf4_bytes_per_weight(not case["double_quant"])
            yield base + q * other + adapter, ("the constants of double quantisation where it is "
                                               f"{'on' if case['double_quant'] else 'off'} (double_quant="
                                               f"{case['double_quant']}): without it one float32 absmax per 64 "
                                               "weights (4/64 byte each); with it one byte per 64 weights plus "
                                               "one float32 per 256 blocks.")


@check(
    "training_memory",
    hint=[
        "Three terms, each in bytes: the weights the model holds, one gradient per *trainable* parameter, and "
        "AdamW's state. Frozen weights need neither a gradient nor optimiser state. Bytes per element: "
        "torch.empty((), dtype=d).element_size() (4 for float32, 2 for bfloat16).",
        "AdamW keeps two tensors per trainable parameter (exp_avg and exp_avg_sq), each like the parameter. For "
        "LoRA and QLoRA the trainable parameters are the adapter's (adapter_dtype); the base weights stay, in "
        "dtype, and the adapter's are added to them. QLoRA keeps n_quantised weights in 4-bit NF4: 0.5 byte each "
        "plus a float32 absmax per block of 64 (4/64 byte per weight).",
        "weights = (n_params - n_quantised) * |dtype| + n_quantised * (0.5 + 4/64) (+ n_trainable * |adapter_dtype| "
        "for LoRA/QLoRA); gradients = n_trainable * t; optimizer_state = 2 * n_trainable * t, t the bytes of a "
        "trainable parameter. With double quantisation the constants are 1/64 + 4/(64*256) byte per weight.",
    ],
    solution=_MEMORY_SOLUTION,
    reference="course.practice:training_memory",
)
def training_memory(answer):
    """``answer(method, n_params, n_trainable, n_quantised, dtype, adapter_dtype, double_quant)``: bytes per term."""
    expect(callable(answer), f"Expected a function f(method, n_params, n_trainable, ...), got "
           f"{type(answer).__name__}. Pass the function itself: check.training_memory(training_memory).")
    for label, case in _memory_cases():
        where = f"For {label} ({case['n_params']:,} parameters, {case['n_trainable']:,} trainable)"
        got = _fields(answer(*case.values()), where)  # positionally: any parameter names will do
        want = practice.training_memory(**case)
        for field in _FIELDS:
            value, right = got[field], float(getattr(want, field))
            if abs(value - right) <= 1e-9 * max(1.0, right):
                continue
            for wrong, message in _memory_mistakes(field, case):
                if abs(value - wrong) <= 1e-9 * max(1.0, wrong):
                    raise Failure(f"{where}: {field} is {value:,.0f} bytes, which counts {message}")
            raise Failure(f"{where}: {field} is {value:,.1f} bytes; expected {right:,.1f}.")


# ---------------------------------------------------------------------------
# largest_lora_rank
# ---------------------------------------------------------------------------

_RANK_SOLUTION = '''\
def largest_lora_rank(model, target_modules, budget, bias="none"):
    per_rank = fixed = 0
    for name, module in model.named_modules():
        if any(name == t or name.endswith("." + t) for t in target_modules):  # PEFT's rule for a list
            per_rank += module.in_features + module.out_features  # A is (r, in), B is (out, r)
            if bias == "lora_only" and module.bias is not None:
                fixed += module.bias.numel()
    return max(0, (budget - fixed) // per_rank)  # the largest r with r * per_rank + fixed <= budget'''

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(attention_bias: bool = False, seed: int = 0):
    """A random LlamaForCausalLM with SmolLM2's module names: hidden 32, 3 blocks, 4 query and 2 key/value heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_bias=attention_bias,
                         tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def _rank_cases():
    """(label, model, targets, budget, bias): budgets between ranks, exactly met, too small, dotted targets, biases."""
    plain, biased = tiny_llama(), tiny_llama(attention_bias=True, seed=1)
    attention = ["q_proj", "v_proj"]
    per = practice.lora_parameter_count
    yield "q_proj and v_proj, a budget between two ranks", plain, attention, per(plain, attention, 6) + 100, "none"
    yield "all linear layers, a budget met exactly at rank 5", plain, ALL_LINEAR, per(plain, ALL_LINEAR, 5), "none"
    yield ("all linear layers, one parameter short of rank 5", plain, ALL_LINEAR, per(plain, ALL_LINEAR, 5) - 1,
           "none")
    dotted = ["self_attn.q_proj", "mlp.down_proj"]
    yield "the dotted targets 'self_attn.q_proj' and 'mlp.down_proj'", plain, dotted, per(plain, dotted, 3) + 7, "none"
    yield "q_proj and v_proj, a budget below rank 1", plain, attention, per(plain, attention, 1) - 1, "none"
    qkv = ["q_proj", "k_proj", "v_proj"]
    yield ("q, k and v with biases, bias='lora_only', met exactly at rank 4", biased, qkv,
           per(biased, qkv, 4, bias="lora_only"), "lora_only")
    yield ("q, k and v with biases, bias='lora_only', the budget of rank 4 without biases", biased, qkv,
           per(biased, qkv, 4), "lora_only")
    yield "q, k and v with biases, bias='none'", biased, qkv, per(biased, qkv, 4), "none"


def _rank_mistakes(model, targets, budget, bias):
    """(the rank a typical mistake gives, its message)."""
    layers = [m for name, m in model.named_modules() if name and any(name == t or name.endswith("." + t)
                                                                    for t in targets)]
    ins, outs = sum(m.in_features for m in layers), sum(m.out_features for m in layers)
    biases = sum(m.bias.numel() for m in layers if m.bias is not None)
    fixed = biases if bias == "lora_only" else 0
    right = max(0, (budget - fixed) // (ins + outs))
    if bias == "lora_only":
        yield max(0, budget // (ins + outs)), ("with bias='lora_only' the targeted layers' biases are trained too: "
                                               "subtract their numel() from the budget before dividing.")
    elif biases:
        yield max(0, (budget - biases) // (ins + outs)), ("bias='none' trains no bias: the biases count only with "
                                                         "bias='lora_only'.")
    yield max(0, (budget - fixed) // ins), ("you count only A (r x in). LoRA trains B (out x r) as well: r * (in + "
                                            "out) per layer.")
    yield max(0, (budget - fixed) // outs), ("you count only B (out x r). LoRA trains A (r x in) as well: r * (in + "
                                             "out) per layer.")
    if budget >= fixed and (budget - fixed) % (ins + outs) == 0:
        yield right - 1, ("off by one: the budget is met exactly at rank "
                          f"{right}, and 'at most budget' includes it (<=, or floor division).")
    yield right + 1, (f"off by one: rank {right + 1} needs more than the budget. Take the largest r with "
                      "r * sum(in + out) <= budget: floor division, not rounding up.")


@check(
    "largest_lora_rank",
    hint=[
        "A LoRA layer on nn.Linear(in, out) trains A (r x in) and B (out x r): r * (in + out) parameters. Over the "
        "targets the count is r * S, S the sum of (in + out), plus the targeted biases with bias='lora_only'.",
        "Pick the targets by PEFT's rule: a module is targeted when its full name equals a target or ends in "
        "'.' + target, so 'self_attn.q_proj' picks every q_proj; comparing with the last name part alone misses "
        "dotted targets.",
        "r = (budget - biases) // S, biases counted only for bias='lora_only'; 0 when even rank 1 does not fit.",
    ],
    solution=_RANK_SOLUTION,
    reference="course.practice:largest_lora_rank",
)
def largest_lora_rank(answer):
    """``answer(model, target_modules, budget, bias) -> int``: the largest rank whose LoRA fits the budget."""
    expect(callable(answer), f"Expected a function f(model, target_modules, budget, bias), got "
           f"{type(answer).__name__}. Pass the function itself: check.largest_lora_rank(largest_lora_rank).")
    for label, model, targets, budget, bias in _rank_cases():
        where = f"For {label} (budget {budget:,})"
        try:
            got = answer(model, list(targets), budget, bias)
        except ZeroDivisionError:
            dotted = [t for t in targets if "." in t]
            raise Failure(f"{where}: your function divided by zero: it found no parameters per rank"
                          + (f", so it matched none of the dotted targets {dotted}. PEFT's rule: a module is "
                             "targeted when its full name equals a target or ends in '.' + target (name == t or "
                             "name.endswith('.' + t)), not when its last name part equals it." if dotted else
                             ". Check how you match module names to the targets.")) from None
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if isinstance(got, float) and got.is_integer():
            got = int(got)
        expect(isinstance(got, int) and not isinstance(got, bool),
               f"{where}: return the rank as a whole number (int), got {got!r}.")
        right = practice.largest_lora_rank(model, targets, budget, bias)
        if got == right:
            continue
        for wrong, message in _rank_mistakes(model, targets, budget, bias):
            if got == wrong and wrong != right:
                raise Failure(f"{where}: you return rank {got}, the right one is {right}: {message}")
        if any("." in t for t in targets):
            raise Failure(f"{where}: you return rank {got}, the right one is {right}. The targets are dotted: "
                          "PEFT targets a module when its full name equals a target or ends in '.' + target.")
        raise Failure(f"{where}: you return rank {got}; the largest rank that fits is {right}.")
