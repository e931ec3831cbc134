"""NOLA's random basis: a counter-based generator, and the coefficients' mix generated chunk by chunk (notebook 05).

``random_basis(K, rows, cols, seed)`` is a pure function of (seed, element index), the same on every
device, that leaves torch's random state alone; ``GenerateParams`` computes ``sum_k c_k basis_k``
a chunk of basis matrices at a time and regenerates the chunks in backward, so no basis is kept
for it (the paper's method section; ``course.nola`` tells the whole story and re-exports these).
"""

from __future__ import annotations

import hashlib

import torch

# ---------------------------------------------------------------------------
# The basis: a counter-based generator
# ---------------------------------------------------------------------------

#: The name of the generator below, written into saved adapters. Changing a single
#: operation of it changes every basis, so a new version would need a new name.
GENERATOR = "course.nola.random_basis/mueller32-v1"

_M32 = 0xFFFFFFFF
_MUL = 0x045D9F3B  # Thomas Mueller's multiplier for his 32-bit integer hash
_HALF = 1 << 24
_SCALE = 2.0**-24
_LIMIT = 1 << 32  # element indices are 32-bit
_SEED_LIMIT = 1 << 63
#: Default chunk, in numbers: 2**16 int64 numbers (512 KB) stay in a CPU core's cache;
#: a GPU prefers fewer, bigger chunks (fewer kernel launches).
CHUNK_NUMBERS = {"cpu": 1 << 16}
_OTHER_DEVICES = 1 << 22


def _splitmix64(x: int) -> int:
    """Steele et al.'s SplitMix64 finaliser on a Python int: 64 well-mixed bits from any 64."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _keys(seed: int) -> tuple[int, int]:
    """(stride, offset) for ``seed``: an odd 31-bit multiplier and a 32-bit offset."""
    mixed = _splitmix64(seed)
    return (mixed >> 33) | 1, mixed & _M32


def _check_shape(num_basis, rows, cols, seed) -> None:
    for name, value in (("num_basis", num_basis), ("rows", rows), ("cols", cols)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}. (A tensor seed? Pass int(seed).)")
    if num_basis * rows * cols > _LIMIT:
        raise ValueError(
            f"A basis of {num_basis} x {rows} x {cols} = {num_basis * rows * cols:,} numbers is more than the "
            f"generator's 2**32 element indices. Use fewer basis matrices (num_basis)."
        )


def _mix32(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """Mueller's 32-bit hash, in place, on int64 numbers below 2**32.

    ``x ^= x >> 16; x *= 0x45d9f3b`` twice, then ``x ^= x >> 16``, each product masked back
    to 32 bits. A product of a number below 2**32 and the 27-bit multiplier stays below
    2**59, so int64 never overflows: every step is exact integer arithmetic, the same on
    every device.
    """
    for _ in range(2):
        torch.bitwise_right_shift(x, 16, out=tmp)
        x.bitwise_xor_(tmp)
        x.mul_(_MUL).bitwise_and_(_M32)
    torch.bitwise_right_shift(x, 16, out=tmp)
    return x.bitwise_xor_(tmp)


def _chunk_size(rows: int, cols: int, device: torch.device) -> int:
    numbers = CHUNK_NUMBERS.get(device.type, _OTHER_DEVICES)
    return max(1, numbers // (rows * cols))


def basis_chunks(num_basis: int, rows: int, cols: int, seed: int, *, chunk_size: int | None = None,
                 device=None, dtype=None):
    """Yield ``(slice, block)``: ``block == random_basis(num_basis, rows, cols, seed)[slice]``.

    ``chunk_size`` basis matrices at a time (default: about 2**16 numbers a chunk on the CPU,
    2**22 elsewhere; at least one matrix). Only one chunk lives at a time, so memory is
    ``chunk_size * rows * cols`` numbers however large ``num_basis`` is (notebook 05).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype or torch.get_default_dtype()
    for where, block in _chunks(num_basis, rows, cols, seed, chunk_size, device, reuse=False):
        yield where, block.to(dtype)


def _chunks(num_basis, rows, cols, seed, chunk_size, device, *, float64=False, reuse=True):
    """``basis_chunks`` in float32 (or float64); with ``reuse`` every block is the same buffer,
    overwritten by the next chunk, so that a whole pass allocates nothing per chunk."""
    _check_shape(num_basis, rows, cols, seed)
    if chunk_size is None:
        chunk_size = _chunk_size(rows, cols, device)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size is a number of basis matrices per chunk (1, 2, ...), got {chunk_size!r}.")
    chunk_size = min(chunk_size, num_basis)
    numel = rows * cols
    stride, offset = _keys(seed)
    # Element i of the flattened basis (i = k * rows * cols + position) starts as
    # stride * i + offset (mod 2**32), a bijection of the index chosen by the seed. Split as
    # (stride * k * numel + offset) + stride * position: the second part is the same in every chunk.
    within = torch.arange(numel, dtype=torch.int64, device=device).mul_(stride).bitwise_and_(_M32)
    x_buffer = torch.empty(chunk_size, numel, dtype=torch.int64, device=device)
    tmp_buffer = torch.empty_like(x_buffer)
    float_type = torch.float64 if float64 else torch.float32
    values = torch.empty(chunk_size, numel, dtype=float_type, device=device) if reuse else None
    for start in range(0, num_basis, chunk_size):
        stop = min(start + chunk_size, num_basis)
        x, tmp = x_buffer[: stop - start], tmp_buffer[: stop - start]
        first = torch.arange(start, stop, dtype=torch.int64, device=device).mul_(numel)
        first.mul_(stride).add_(offset).bitwise_and_(_M32)  # k * numel < 2**32, times stride < 2**31
        torch.add(first[:, None], within[None, :], out=x)
        _mix32(x.bitwise_and_(_M32), tmp)
        # The top 25 bits, made odd and centred: an odd integer in (-2**24, 2**24), exact in float32.
        x.bitwise_right_shift_(7).bitwise_or_(1).sub_(_HALF)
        block = values[: stop - start].copy_(x) if reuse else x.to(float_type)
        block.mul_(_SCALE)  # times 2**-24, exact: (2u + 1) / 2**24 - 1 in (-1, 1)
        yield slice(start, stop), block.view(stop - start, rows, cols)


def random_basis(num_basis: int, rows: int, cols: int, seed: int, *, device=None, dtype=None) -> torch.Tensor:
    """``num_basis`` random matrices of shape (rows, cols), uniform in (-1, 1), fixed by ``seed`` (notebook 05).

    A pure function of its arguments: the same numbers in every process, on every device and
    however the basis is cut into chunks (``basis_chunks``); the global random state is never
    touched. Why a counter-based generator rather than ``torch.manual_seed`` + ``uniform_``:

    * torch's generators differ by device (the CPU's Mersenne Twister, CUDA's Philox with
      a launch-dependent layout), so the same seed gives different bases on different devices;
      and reseeding the global generator changes everybody else's random numbers.
    * a counter-based generator (like Philox or Threefry, Salmon et al. 2011) computes element
      i directly as hash(seed, i). Here the hash is Thomas Mueller's 32-bit integer hash (two
      xor-shift-multiply rounds) of ``stride * i + offset``, with stride and offset drawn from
      the seed by SplitMix64. Integer operations are exact, so every device computes the same
      bits, and any chunk of the basis can be made on its own, in any order.

    The top 25 bits of each hash become an odd integer n in (-2**24, 2**24) and the value is
    n / 2**24: uniform on 2**24 evenly spaced points, mean exactly zero, never 0 or ±1. Those
    values are exact in float32; ``dtype=float64`` gives the very same numbers, half precision
    the float32 numbers rounded.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype or torch.get_default_dtype()
    _check_shape(num_basis, rows, cols, seed)
    out = torch.empty(num_basis, rows, cols, device=device, dtype=dtype)
    for where, block in basis_chunks(num_basis, rows, cols, seed, device=device, dtype=dtype):
        out[where] = block
    return out


# ---------------------------------------------------------------------------
# sum_k c_k basis_k without keeping the basis
# ---------------------------------------------------------------------------


class GenerateParams(torch.autograd.Function):
    """``GenerateParams.apply(c, rows, cols, seed[, chunk_size]) = sum_k c[k] * random_basis(K, rows, cols, seed)[k]``.

    Forward generates the basis a chunk at a time and adds each chunk's share; autograd keeps
    only the coefficients (K numbers) and the seed and shape (Python ints), never the basis.
    Backward regenerates the same chunks: the gradient of ``sum_ij G_ij * out_ij`` with
    respect to c[k] is ``sum_ij G_ij * basis_k[ij]``, one dot product per basis matrix.
    Notebook 05; the exercise ``check.generate_params`` asks for this.
    """

    @staticmethod
    def forward(ctx, coefficients, rows, cols, seed, chunk_size=None):
        if coefficients.dim() != 1:
            raise ValueError(f"coefficients must be a vector (one number per basis matrix), got shape "
                             f"{tuple(coefficients.shape)}.")
        ctx.rows, ctx.cols, ctx.seed, ctx.chunk_size = rows, cols, seed, chunk_size
        ctx.save_for_backward(coefficients)
        compute = torch.float64 if coefficients.dtype == torch.float64 else torch.float32
        c = coefficients.to(compute)
        out = torch.zeros(rows * cols, device=c.device, dtype=compute)
        for where, block in _chunks(len(c), rows, cols, seed, chunk_size, c.device, float64=compute == torch.float64):
            out.addmv_(block.view(block.shape[0], -1).T, c[where])  # out += block^T c
        return out.view(rows, cols).to(coefficients.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (coefficients,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        compute = torch.float64 if coefficients.dtype == torch.float64 else torch.float32
        grad = grad_output.reshape(-1).to(compute)
        grad_coefficients = torch.empty(len(coefficients), device=grad.device, dtype=compute)
        for where, block in _chunks(len(coefficients), ctx.rows, ctx.cols, ctx.seed, ctx.chunk_size, grad.device,
                                    float64=compute == torch.float64):
            torch.mv(block.view(block.shape[0], -1), grad, out=grad_coefficients[where])
        return grad_coefficients.to(coefficients.dtype), None, None, None, None


def generate_params(coefficients: torch.Tensor, rows: int, cols: int, seed: int, *,
                    chunk_size: int | None = None) -> torch.Tensor:
    """``GenerateParams.apply`` with a keyword for the chunk size (basis matrices per chunk)."""
    return GenerateParams.apply(coefficients, rows, cols, seed, chunk_size)


def derive_seed(seed: int, *names: str) -> int:
    """A seed in [0, 2**63) for ``names`` under ``seed``, the same in every process (BLAKE2b, not ``hash()``).

    ``derive_seed(0, "model.layers.3.self_attn.q_proj")`` is layer q_proj's seed under seed 0;
    ``derive_seed(s, "lora_A")`` is the seed of its A basis. Different names give unrelated
    seeds, so different layers (and A and B) get unrelated bases.
    """
    text = "/".join([str(int(seed)), *names]).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & (_SEED_LIMIT - 1)
