"""course.loftq against PEFT's own LoftQ code (notebook 09, section 4).

PEFT's ``loftq_init`` computes on "cuda" only; here it runs with every move to "cuda" kept on the
CPU, so that its own loop, quantiser calls and SVD are what ``course.loftq.loftq_init`` is held to.
"""

import contextlib

import pytest
import torch

pytest.importorskip("bitsandbytes")

from peft.utils import loftq_utils  # noqa: E402

from course.loftq import loftq_init, nf4_roundtrip  # noqa: E402


@contextlib.contextmanager
def cuda_is_the_cpu(monkeypatch):
    """Tensor.to("cuda"...) stays on the CPU (PEFT's compute device is a literal "cuda")."""
    original = torch.Tensor.to

    def to(self, *args, **kwargs):
        args = tuple("cpu" if (isinstance(a, str) and a.startswith("cuda")) or
                     (isinstance(a, torch.device) and a.type == "cuda") else a for a in args)
        if "device" in kwargs and str(kwargs["device"]).startswith("cuda"):
            kwargs["device"] = "cpu"
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(loftq_utils, "clear_device_cache", lambda *a, **k: None)
    yield


@pytest.mark.parametrize("num_iter", [1, 3])
def test_loftq_init_equals_peft(monkeypatch, num_iter):
    torch.manual_seed(0)
    weight = torch.randn(96, 128) * 0.05
    with cuda_is_the_cpu(monkeypatch):
        q_peft, a_peft, b_peft = loftq_utils.loftq_init(weight, num_bits=4, reduced_rank=8, num_iter=num_iter)
    q, a, b = loftq_init(weight, rank=8, num_iter=num_iter)
    assert a.shape == (8, 128) and b.shape == (96, 8)
    # Same quantiser on the same residuals: the dequantised bases are identical; the factors agree to
    # float32 SVD rounding (PEFT slices sqrt(diag(S)) where this slices S first: the same numbers).
    assert torch.equal(q, q_peft)
    torch.testing.assert_close(b @ a, b_peft @ a_peft, rtol=0, atol=1e-6)


def test_the_adapter_recovers_part_of_the_quantisation_error():
    torch.manual_seed(1)
    weight = torch.randn(128, 128) * 0.05
    plain = (weight - nf4_roundtrip(weight)).norm()
    q, a, b = loftq_init(weight, rank=16, num_iter=1)
    one = (weight - q - b @ a).norm()
    q5, a5, b5 = loftq_init(weight, rank=16, num_iter=5)
    five = (weight - q5 - b5 @ a5).norm()
    assert one < plain and five <= one * 1.001, (plain, one, five)


def test_bad_arguments_say_what_to_do():
    with pytest.raises(ValueError, match="num_iter must be at least 1"):
        loftq_init(torch.zeros(4, 4), rank=2, num_iter=0)
    with pytest.raises(ValueError, match="rank must be between 1 and 4"):
        loftq_init(torch.zeros(4, 8), rank=5)
