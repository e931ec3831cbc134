"""course.nola: the basis generator, GenerateParams, NOLALoRALinear, its files and its PEFT export.

Tolerances:
- The basis is integer arithmetic plus exact conversions: compared with ``torch.equal``.
- ``GenerateParams`` against the explicit sum ``einsum("k,kij->ij", c, basis)`` in float64: the
  two add K products in a different order, so they differ by a few ulp of the sum (~1e-15 for
  sums of order 10); ``atol=1e-12``. In float32, for different chunk sizes: ~K * eps * |sum|,
  ``atol=1e-5`` for K = 64.
- Layer outputs against the explicit ``base(x) + scaling * B A x``: float32, same operations on
  the same numbers up to the order of two matmuls, ``atol=1e-6``.
- Merge then unmerge computes (W + D) - D: one rounding of W + D, at most eps * |W + D| ~ 1e-7
  here; ``atol=1e-6``.
- PEFT export: PEFT runs base(x) + B(A(x)) * scaling with the exported A and B, the very
  operations of LoRALinear, so the logits agree to ~1e-6; ``atol=1e-5``.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from torch import nn

from course.lora import LoRALinear, inject_lora, mark_only_lora_as_trainable, save_peft_adapter
from course.nola import (
    GENERATOR,
    GenerateParams,
    NOLALoRALinear,
    basis_chunks,
    derive_seed,
    generate_params,
    load_nola,
    nola_layer,
    nola_layers,
    random_basis,
    save_nola,
)

# ---------------------------------------------------------------------------
# random_basis
# ---------------------------------------------------------------------------

# Pinned numbers: if this test fails, the generator changed and every saved NOLA adapter with it.
# Then GENERATOR must get a new name, so that load_nola refuses old adapters.
PINNED = {(0, 0, 0): 0.9951496720314026, (3, 2, 4): 0.8715316653251648, (7, 4, 5): -0.7352377772331238}


def test_pinned_values_and_the_generator_name():
    basis = random_basis(8, 5, 6, 42)
    for index, value in PINNED.items():
        assert basis[index].item() == value, (index, basis[index].item())
    assert GENERATOR.endswith("-v1")


def test_values_are_odd_multiples_of_2_to_the_minus_24_in_the_open_interval():
    basis = random_basis(16, 32, 32, 7, dtype=torch.float64)
    scaled = basis * 2**24
    assert torch.equal(scaled, scaled.round()) and bool(((scaled.long() % 2) == 1).all())
    assert basis.abs().max() < 1
    # Uniform on (-1, 1): mean 0, variance 1/3 (16,384 numbers: standard errors 0.0045 and 0.0023).
    assert abs(basis.mean().item()) < 0.02 and abs(basis.var().item() - 1 / 3) < 0.01


def test_the_same_numbers_in_another_process():
    code = ("import torch; from course.nola import random_basis; "
            "print(random_basis(4, 3, 5, 2024).double().sum().item().hex())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == random_basis(4, 3, 5, 2024).double().sum().item().hex()


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 100])
def test_every_chunking_gives_the_same_basis(chunk_size):
    full = random_basis(7, 4, 9, 5)
    parts = list(basis_chunks(7, 4, 9, 5, chunk_size=chunk_size))
    assert [w.start for w, _ in parts] == list(range(0, 7, chunk_size))
    assert torch.equal(torch.cat([block for _, block in parts]), full)


def test_other_dtypes_are_the_float32_numbers_cast():
    b32 = random_basis(5, 6, 7, 11, dtype=torch.float32)
    assert torch.equal(random_basis(5, 6, 7, 11, dtype=torch.float64), b32.double())
    assert torch.equal(random_basis(5, 6, 7, 11, dtype=torch.bfloat16), b32.bfloat16())
    with torch.device("cpu"):
        torch.set_default_dtype(torch.float64)
        try:
            assert random_basis(5, 6, 7, 11).dtype == torch.float64
        finally:
            torch.set_default_dtype(torch.float32)


def test_the_global_random_state_is_untouched():
    torch.manual_seed(3)
    state = torch.random.get_rng_state()
    random_basis(10, 8, 8, 1)
    c = torch.randn(10, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert torch.equal(torch.random.get_rng_state(), state)
    GenerateParams.apply(c, 8, 8, 1).sum().backward()
    assert torch.equal(torch.random.get_rng_state(), state)


def test_seeds_and_shapes_give_unrelated_bases():
    a, b = random_basis(4, 16, 16, 0).flatten(1), random_basis(4, 16, 16, 1).flatten(1)
    # Two independent uniform vectors of 256 numbers: cosine about N(0, 1/256), 0.3 is ~5 sigma.
    cosine = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    assert cosine.abs().max() < 0.3
    within = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(a, dim=1).T
    assert (within - torch.eye(4)).abs().max() < 0.3


@pytest.mark.parametrize(("args", "message"), [
    ((0, 3, 3, 1), "num_basis must be a positive int"),
    ((2, 3, 3, -1), "seed must be an int"),
    ((2, 3, 3, 2**63), "seed must be an int"),
    ((2, 3, 3, torch.tensor(5)), "Pass int"),
    ((2**20, 2**10, 2**10, 1), "Use fewer basis matrices"),
])
def test_bad_arguments_say_what_to_do(args, message):
    with pytest.raises(ValueError, match=message):
        random_basis(*args)


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        next(basis_chunks(3, 2, 2, 0, chunk_size=0))


# ---------------------------------------------------------------------------
# GenerateParams
# ---------------------------------------------------------------------------


def test_gradcheck_in_float64():
    c = torch.randn(9, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: GenerateParams.apply(c, 5, 4, 99, 2), (c,))
    assert torch.autograd.gradcheck(lambda c: GenerateParams.apply(c, 5, 4, 99), (c,))


def test_equals_the_explicit_sum_and_its_gradient():
    generator = torch.Generator().manual_seed(1)
    c = torch.randn(12, dtype=torch.float64, generator=generator, requires_grad=True)
    upstream = torch.randn(6, 10, dtype=torch.float64, generator=generator)
    basis = random_basis(12, 6, 10, 5, dtype=torch.float64)
    out = GenerateParams.apply(c, 6, 10, 5)
    torch.testing.assert_close(out, torch.einsum("k,kij->ij", c.detach(), basis), rtol=0, atol=1e-12)
    (out * upstream).sum().backward()
    torch.testing.assert_close(c.grad, basis.flatten(1) @ upstream.flatten(), rtol=0, atol=1e-12)


def test_chunk_size_changes_only_rounding():
    c = torch.randn(64, generator=torch.Generator().manual_seed(2))
    outs = [generate_params(c, 8, 12, 3, chunk_size=size) for size in (1, 5, 64)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=1e-5)


def test_keeps_the_dtype_and_works_for_bfloat16_coefficients():
    c = torch.randn(8, generator=torch.Generator().manual_seed(3))
    out = GenerateParams.apply(c.bfloat16(), 4, 4, 0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), GenerateParams.apply(c.bfloat16().float(), 4, 4, 0), rtol=1e-2, atol=1e-2)


def _saved_numbers(rows, cols):
    c = torch.randn(16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = GenerateParams.apply(c, rows, cols, 0)
    tensors_on_ctx = [v for v in vars(out.grad_fn).values() if isinstance(v, torch.Tensor)]
    return sum(saved), tensors_on_ctx


def test_what_autograd_keeps_does_not_grow_with_rows_times_cols():
    small, small_ctx = _saved_numbers(4, 4)
    big, big_ctx = _saved_numbers(64, 256)
    assert small == big == 16  # the coefficients, nothing else
    assert small_ctx == big_ctx == []


def test_a_matrix_of_coefficients_is_refused():
    with pytest.raises(ValueError, match="must be a vector"):
        GenerateParams.apply(torch.zeros(2, 3), 4, 4, 0)


# ---------------------------------------------------------------------------
# NOLALoRALinear
# ---------------------------------------------------------------------------

R, ALPHA, K_A, K_B = 4, 8.0, 32, 48


def _layer(n_in=12, n_out=7, seed=5, **options):
    torch.manual_seed(0)
    base = nn.Linear(n_in, n_out)
    return base, NOLALoRALinear(copy.deepcopy(base), R, ALPHA, num_basis_A=K_A, num_basis_B=K_B, seed=seed, **options)


def _randomise(layer):
    with torch.no_grad():
        generator = torch.Generator().manual_seed(4)
        layer.lora_B_coefficients.copy_(torch.randn(K_B, generator=generator))


def test_starts_as_the_base_layer_and_trains_only_coefficients():
    base, layer = _layer()
    x = torch.randn(2, 3, 12)
    assert torch.equal(layer(x), base(x))
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A_coefficients",
                                                                           "lora_B_coefficients"}
    assert layer.lora_A_coefficients.abs().sum() > 0 and layer.lora_B_coefficients.abs().sum() == 0
    A, B = layer.lora_factors()
    assert A.shape == (R, 12) and B.shape == (7, R) and B.abs().sum() == 0
    # A has the variance of LoRA's Kaiming-uniform A, 1 / (3 in) (48 numbers: within a factor 2).
    assert 0.5 < A.var().item() * 3 * 12 < 2


def test_the_initial_coefficients_come_from_the_seed_not_the_global_generator():
    base = nn.Linear(12, 7)
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    a = NOLALoRALinear(copy.deepcopy(base), R, ALPHA, num_basis_A=K_A, num_basis_B=K_B, seed=5).lora_A_coefficients
    assert torch.equal(torch.random.get_rng_state(), state)  # nothing drawn from the global generator
    torch.manual_seed(1)
    b = NOLALoRALinear(copy.deepcopy(base), R, ALPHA, num_basis_A=K_A, num_basis_B=K_B, seed=5).lora_A_coefficients
    c = NOLALoRALinear(copy.deepcopy(base), R, ALPHA, num_basis_A=K_A, num_basis_B=K_B, seed=6).lora_A_coefficients
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_forward_and_gradients_equal_the_explicit_formula():
    base, layer = _layer()
    _randomise(layer)
    x = torch.randn(2, 3, 12, requires_grad=True)
    A = random_basis(K_A, R, 12, layer.seed_A).flatten(1).T @ layer.lora_A_coefficients / K_A**0.5
    B = random_basis(K_B, 7, R, layer.seed_B).flatten(1).T @ layer.lora_B_coefficients / K_B**0.5
    want = base(x) + layer.scaling * x @ A.view(R, 12).T @ B.view(7, R).T
    got = layer(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    upstream = torch.randn_like(got)
    grads = torch.autograd.grad((got * upstream).sum(), [layer.lora_A_coefficients, layer.lora_B_coefficients])
    want_grads = torch.autograd.grad((want * upstream).sum(), [layer.lora_A_coefficients,
                                                              layer.lora_B_coefficients])
    for g, w in zip(grads, want_grads, strict=True):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_merge_uses_the_coefficients_and_unmerge_restores_the_base():
    base, layer = _layer()
    _randomise(layer)
    x = torch.randn(5, 12)
    before = layer(x).detach()
    delta = layer.get_delta_weight()
    A, B = layer.lora_factors()
    torch.testing.assert_close(delta, layer.scaling * B @ A, rtol=0, atol=1e-7)
    assert delta.abs().max() > 1e-3
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, base.weight + delta, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, base.weight, rtol=0, atol=1e-6)


def test_the_factor_cache_follows_the_coefficients():
    _, layer = _layer()
    with torch.no_grad():
        A1, B1 = layer.lora_factors()
        assert layer.lora_factors()[1] is B1  # cached without gradients
        layer.lora_B_coefficients.add_(1.0)  # an optimiser step changes the version
        A2, B2 = layer.lora_factors()
    assert B2 is not B1 and B2.abs().sum() > 0
    A3, _ = layer.lora_factors()  # with gradients: always fresh, part of the graph
    assert A3.requires_grad and A3 is not A2


def test_half_precision_base_keeps_float32_coefficients():
    torch.manual_seed(0)
    base = nn.Linear(12, 7).to(torch.bfloat16)
    layer = NOLALoRALinear(base, R, ALPHA, num_basis_A=K_A, num_basis_B=K_B, seed=1)
    assert layer.lora_A_coefficients.dtype == torch.float32
    out = layer(torch.randn(3, 12, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_bad_options_say_what_to_do():
    with pytest.raises(ValueError, match="num_basis_A must be a positive int"):
        NOLALoRALinear(nn.Linear(4, 4), 2, 4.0, num_basis_A=0, num_basis_B=8, seed=0)
    with pytest.raises(ValueError, match="seed must be an int"):
        NOLALoRALinear(nn.Linear(4, 4), 2, 4.0, num_basis_A=8, num_basis_B=8, seed=-3)


# ---------------------------------------------------------------------------
# In a model: seeds, files, PEFT
# ---------------------------------------------------------------------------


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config)


def _nola_model(seed=0, targets=("q_proj", "v_proj")):
    model = _tiny_llama()
    inject_lora(model, list(targets), r=R, alpha=ALPHA, layer=nola_layer(model, seed), num_basis_A=K_A,
                num_basis_B=K_B)
    mark_only_lora_as_trainable(model)
    return model


def _train_a_little(model, ids):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


IDS = torch.arange(1, 17).view(2, 8)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_each_layer_gets_its_own_seed_from_its_name():
    model = _nola_model(seed=3)
    layers = nola_layers(model)
    assert len(layers) == 4
    assert {name: layer.seed for name, layer in layers.items()} == {name: derive_seed(3, name) for name in layers}
    assert len({layer.seed for layer in layers.values()}) == 4
    # Targeting fewer modules does not change the seeds of the others.
    only_q = nola_layers(_nola_model(seed=3, targets=("q_proj",)))
    assert all(layers[name].seed == layer.seed for name, layer in only_q.items())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{name}.lora_{f}_coefficients" for name in layers for f in "AB"}


def test_derive_seed_is_stable():
    assert derive_seed(0, "model.layers.0.self_attn.q_proj") == derive_seed(0, "model.layers.0.self_attn.q_proj")
    assert derive_seed(0, "a") != derive_seed(1, "a") and derive_seed(0, "a") != derive_seed(0, "b")
    assert 0 <= derive_seed(2**62, "x") < 2**63


def test_nola_layer_refuses_a_seed_twice_and_another_model():
    model = _tiny_llama()
    with pytest.raises(TypeError, match="do not pass seed"):
        inject_lora(model, ["q_proj"], r=2, alpha=4, layer=nola_layer(model, 0), num_basis_A=4, num_basis_B=4,
                    seed=1)
    with pytest.raises(ValueError, match="not in the model"):
        inject_lora(_tiny_llama(), ["q_proj"], r=2, alpha=4, layer=nola_layer(model, 0), num_basis_A=4,
                    num_basis_B=4)


def test_save_and_load_round_trip_with_coefficients_seeds_and_shapes_only(tmp_path):
    model = _nola_model()
    _train_a_little(model, IDS)
    want = _logits(model)
    assert (want - _logits(_tiny_llama())).abs().max() > 1e-3  # the adapter matters
    directory = save_nola(model, tmp_path / "adapter")
    assert sorted(p.name for p in directory.iterdir()) == ["nola_coefficients.safetensors", "nola_config.json"]
    # One name, one file: NOLA's own constants name these files, never PEFT's CONFIG_NAME / WEIGHTS_NAME.
    from course import nola, peft_format

    assert sorted(p.name for p in directory.iterdir()) == sorted([nola.NOLA_CONFIG_NAME, nola.NOLA_WEIGHTS_NAME])
    assert not {peft_format.CONFIG_NAME, peft_format.WEIGHTS_NAME} & {p.name for p in directory.iterdir()}
    assert not hasattr(nola, "CONFIG_NAME") and not hasattr(nola, "WEIGHTS_NAME")
    config = json.loads((directory / "nola_config.json").read_text())
    assert config["generator"] == GENERATOR
    assert {k: config[k] for k in ("r", "alpha", "num_basis_A", "num_basis_B")} == {
        "r": R, "alpha": ALPHA, "num_basis_A": K_A, "num_basis_B": K_B}  # shared by every layer
    name = "model.layers.0.self_attn.v_proj"
    assert config["layers"][name] == {"in_features": 32, "out_features": 16, "seed": nola_layers(model)[name].seed}
    from safetensors.torch import load_file

    tensors = load_file(directory / "nola_coefficients.safetensors")
    assert sum(t.numel() for t in tensors.values()) == 4 * (K_A + K_B)

    loaded = load_nola(_tiny_llama(), directory)
    torch.testing.assert_close(_logits(loaded), want, rtol=0, atol=1e-6)
    save_nola(loaded, directory)  # saving again replaces the directory atomically
    torch.testing.assert_close(_logits(load_nola(_tiny_llama(), directory)), want, rtol=0, atol=1e-6)


def test_layers_with_their_own_settings_round_trip(tmp_path):
    model = _tiny_llama()
    inject_lora(model, ["q_proj"], r=R, alpha=ALPHA, layer=nola_layer(model, 0), num_basis_A=K_A, num_basis_B=K_B)
    inject_lora(model, ["v_proj"], r=2, alpha=3.0, layer=nola_layer(model, 0), num_basis_A=5, num_basis_B=7)
    mark_only_lora_as_trainable(model)
    _train_a_little(model, IDS)
    directory = save_nola(model, tmp_path / "mixed")
    config = json.loads((directory / "nola_config.json").read_text())
    v = config["layers"]["model.layers.1.self_attn.v_proj"]
    assert (v["r"], v["alpha"], v["num_basis_A"], v["num_basis_B"]) == (2, 3.0, 5, 7)
    loaded = load_nola(_tiny_llama(), directory)
    assert {n: (m.r, m.num_basis_A) for n, m in nola_layers(loaded).items()} == {
        n: (m.r, m.num_basis_A) for n, m in nola_layers(model).items()}
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=1e-6)


def test_load_refuses_another_model_or_generator_and_changes_nothing(tmp_path):
    directory = save_nola(_nola_model(), tmp_path / "adapter")
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    flags = {n: p.requires_grad for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match="another base model"):
        load_nola(other, directory)
    assert flags == {n: p.requires_grad for n, p in other.named_parameters()}
    assert not nola_layers(other)
    config = json.loads((directory / "nola_config.json").read_text())
    config["generator"] = "torch.manual_seed"
    (directory / "nola_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="other random matrices"):
        load_nola(_tiny_llama(), directory)
    with pytest.raises(FileNotFoundError, match="not a NOLA adapter"):
        load_nola(_tiny_llama(), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no NOLALoRALinear layers"):
        save_nola(_tiny_llama(), tmp_path / "empty")


def test_exported_as_plain_peft_lora_gives_the_same_logits(tmp_path):
    model = _nola_model()
    _train_a_little(model, IDS)
    want = _logits(model)
    directory = save_peft_adapter(model, tmp_path / "peft")
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == R and config["lora_alpha"] == ALPHA
    peft_model = PeftModel.from_pretrained(_tiny_llama(), directory)
    torch.testing.assert_close(_logits(peft_model), want, rtol=0, atol=1e-5)
    # ... and it loads into the course's plain LoRALinear too.
    from course.lora import load_peft_adapter

    plain = load_peft_adapter(_tiny_llama(), directory)
    assert all(type(m) is LoRALinear for n, m in plain.named_modules() if n.endswith(("q_proj", "v_proj")))
    torch.testing.assert_close(_logits(plain), want, rtol=0, atol=1e-5)


def test_merged_model_equals_the_unmerged_one():
    model = _nola_model()
    _train_a_little(model, IDS)
    want = _logits(model)
    for layer in nola_layers(model).values():
        layer.merge()
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=1e-5)
