"""LoftQ's start on any device (notebook 09, section 4): a quantised base plus a LoRA adapter that
together approximate the full-precision weight.

LoftQ (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization", Algorithm 1) alternates, for
t = 1..T, starting from A_0 B_0 = 0:

    Q_t = q_N(W - A_{t-1} B_{t-1})        quantise what the adapter does not hold
    A_t, B_t = SVD_r(W - Q_t)            the rank-r approximation of what the quantiser lost

so that Q_T + A_T B_T is closer to W than q_N(W) alone, and fine-tuning starts from (nearly) the
full-precision model instead of a quantised one.

``loftq_init`` is PEFT's ``peft.utils.loftq_utils.loftq_init`` (the 4-bit NF4 branch, with
bitsandbytes' own quantiser, ``bnb.nn.Params4bit`` and ``bnb.functional.dequantize_4bit``) with one
change: PEFT computes on ``"cuda"`` or ``"xpu"`` only (``compute_device`` is hard-coded there), so
``init_lora_weights="loftq"`` cannot run on a CPU; here the computation stays on the weight's own
device. tests/test_loftq.py runs PEFT's function with "cuda" mapped to the CPU and asserts the same
result. Like PEFT, it returns (the dequantised Q_T, lora_A, lora_B) with lora_B @ lora_A = A_T B_T
in the paper's notation, the singular values split evenly between the two factors.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """q_N(W): ``weight`` quantised to 4-bit NF4 by bitsandbytes (blocks of 64) and dequantised again."""
    import bitsandbytes as bnb

    q = bnb.nn.Params4bit(weight.to("cpu"), requires_grad=False, compress_statistics=False, quant_type="nf4")
    q = q.to(weight.device)
    return bnb.functional.dequantize_4bit(q.data, q.quant_state).to(weight.dtype)


def _low_rank(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``_low_rank_decomposition``: L = U_r sqrt(S_r), R = sqrt(S_r) V_r^T."""
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    root = torch.sqrt(S[:rank])
    return U[:, :rank] @ torch.diag(root), torch.diag(root) @ Vh[:rank, :]


@torch.no_grad()
def loftq_init(weight: torch.Tensor, rank: int, num_iter: int = 1):
    """Algorithm 1 of the LoftQ paper with 4-bit NF4: (dequantised base, lora_A, lora_B).

    ``weight`` is (out, in); lora_A is (rank, in), lora_B is (out, rank), as PEFT's LoRA layers hold them.
    """
    if num_iter <= 0:
        raise ValueError(f"num_iter must be at least 1 (got {num_iter})")
    if not 0 < rank <= min(weight.shape):
        raise ValueError(f"rank must be between 1 and {min(weight.shape)} for a {tuple(weight.shape)} weight "
                         f"(got {rank})")
    dtype = weight.dtype
    weight = weight.to(torch.float32)
    residual = weight.clone()
    for i in range(num_iter):
        quantised = nf4_roundtrip(residual)
        L, R = _low_rank(weight - quantised, rank)
        if i + 1 == num_iter:
            break
        residual = weight - L @ R
    return quantised.to(dtype), R, L
