"""Device and dtype policy, with GPUs simulated by patching ``torch.cuda``."""

import pytest
import torch

from course import device


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("COURSE_DEVICE", raising=False)
    monkeypatch.delenv("COURSE_DTYPE", raising=False)
    return monkeypatch


def simulate(monkeypatch, name: str, capability: tuple[int, int]):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    # Emulated bfloat16 counts as "supported" on a T4: the policy must not ask this.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


@pytest.mark.parametrize(("name", "capability", "dtype"), [
    ("Tesla T4", (7, 5), torch.float16),
    ("Tesla V100", (7, 0), torch.float16),
    ("NVIDIA A100", (8, 0), torch.bfloat16),
    ("NVIDIA L4", (8, 9), torch.bfloat16),
    ("NVIDIA H100", (9, 0), torch.bfloat16),
])
def test_simulated_cards_get_their_half_precision(clean_env, name, capability, dtype):
    simulate(clean_env, name, capability)
    assert device.default_device().type == "cuda"
    assert device.default_dtype() == dtype
    assert name in device.describe() and str(dtype).removeprefix("torch.") in device.describe()


def test_cpu_keeps_float32(clean_env):
    clean_env.setattr(torch.cuda, "is_available", lambda: False)
    assert device.default_dtype("cpu") == torch.float32


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_course_dtype_overrides_every_device(clean_env, name):
    clean_env.setenv("COURSE_DTYPE", name)
    assert device.default_dtype("cpu") == getattr(torch, name)
    simulate(clean_env, "Tesla T4", (7, 5))
    assert device.default_dtype() == getattr(torch, name)


def test_course_device_overrides_and_bad_values_say_what_to_use(clean_env):
    simulate(clean_env, "Tesla T4", (7, 5))
    clean_env.setenv("COURSE_DEVICE", "cpu")
    assert device.default_device() == torch.device("cpu")
    assert device.default_dtype() == torch.float32
    clean_env.setenv("COURSE_DEVICE", "gpu0")
    with pytest.raises(ValueError, match="cpu, cuda or mps"):
        device.default_device()
    clean_env.setenv("COURSE_DEVICE", "cpu")
    clean_env.setenv("COURSE_DTYPE", "half")
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        device.default_dtype()


@pytest.fixture
def unforced(monkeypatch):
    monkeypatch.delenv("COURSE_CPU_BFLOAT16", raising=False)
    device.cpu_bfloat16.cache_clear()
    yield monkeypatch
    device.cpu_bfloat16.cache_clear()


@pytest.mark.parametrize(("ratio", "native"), [(0.4, True), (1.5, True), (30.0, False), (120.0, False)])
def test_cpu_bfloat16_is_decided_by_the_measured_ratio(unforced, ratio, native):
    unforced.setattr(device, "_matmul_ratio", lambda: ratio)
    found = device.cpu_bfloat16()
    assert found.native is native
    assert f"{ratio:.2g}x" in found.how and ("native" if native else "emulated") in str(found)


@pytest.mark.parametrize("value", ["native", "emulated"])
def test_cpu_bfloat16_can_be_forced_either_way(unforced, value):
    unforced.setattr(device, "_matmul_ratio", lambda: pytest.fail("a forced answer must not measure"))
    unforced.setenv("COURSE_CPU_BFLOAT16", value)
    assert device.cpu_bfloat16().native is (value == "native")
    assert "COURSE_CPU_BFLOAT16" in device.cpu_bfloat16().how


def test_cpu_bfloat16_bad_value_says_what_to_use(unforced):
    unforced.setenv("COURSE_CPU_BFLOAT16", "yes")
    with pytest.raises(ValueError, match="native or emulated"):
        device.cpu_bfloat16()


def test_the_measurement_itself_is_quick_and_positive(unforced):
    import time

    start = time.perf_counter()
    ratio = device._matmul_ratio()
    assert ratio > 0 and time.perf_counter() - start < 10


def test_cpu_description_names_the_processor(clean_env):
    clean_env.setattr(torch.cuda, "is_available", lambda: False)
    clean_env.setenv("COURSE_DEVICE", "cpu")
    assert device.cpu_model() in device.describe()
    assert torch.backends.cpu.get_cpu_capability() in device.describe()


def test_base_dtype_is_read_from_the_loaded_model(clean_env):
    # A half-precision base with float32 adapters beside it: the base's dtype, whatever the policy says.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    model.to(torch.bfloat16).requires_grad_(False)
    model.append(torch.nn.Linear(4, 64))  # "an adapter": float32, trains, more elements than the last layer
    assert device.default_dtype("cpu") == torch.float32
    assert device.base_dtype(model) == torch.bfloat16
    model.half()[-1].float()  # float16 base now (an embedding and two layers), the float32 part trains
    assert device.base_dtype(model) == torch.float16
    # A frozen float32 part smaller than the base does not decide it; a 4-bit-like integer weight is ignored.
    model.append(torch.nn.Linear(2, 2).requires_grad_(False))
    model.register_parameter("codes", torch.nn.Parameter(torch.zeros(10_000, dtype=torch.uint8), requires_grad=False))
    assert device.base_dtype(model) == torch.float16
    # Everything trains (a full fine-tune) or nothing is floating point: float32, no autocast.
    assert device.base_dtype(torch.nn.Linear(4, 4).to(torch.bfloat16)) == torch.float32
    assert device.base_dtype(torch.nn.Module()) == torch.float32
