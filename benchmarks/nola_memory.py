"""Peak memory and time of NOLA's GenerateParams: the course's against the reference code's (run by hand).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/nola_memory.py [--repeats 3] [--num-basis 1024 --rows 8 --cols 4096]

What is compared, forward + backward of ``sum_k c_k basis_k`` with K = 1024 basis matrices of
8 x 4096 (the A factor of a rank-8 NOLA layer on a 4096-wide model; 33.5 M random numbers):

- ``seed``: the NOLA README's ``GenerateParams``, re-implemented faithfully: it reseeds torch's
  global generator, fills all K matrices at once in forward (``nn.init.uniform_``), and in
  backward fills them again (its permute + reshape is a view, not a copy).
- ``course``: ``course.nola.GenerateParams``: the basis a chunk at a time, regenerated in backward.
- ``autograd`` (shown, not judged): ``einsum`` over ``course.nola.random_basis``, which autograd
  keeps for backward.

How it is measured, each measurement in a fresh process, interleaved over ``--repeats`` rounds:

- memory: ``course.memory.peak_memory`` of one forward + backward (after a small warm-up call
  that maps code and pools), the course's one way to measure a peak (notebook 05 uses it too):
  the high-water mark of the resident set above where it stood, with glibc made to return every
  block of 64 KiB or more when freed, so the peak counts only memory live at the same time.
- time: the median of ``--calls`` forward + backward passes in a process with the default
  allocator, after one warm-up pass.

The script prints both, and the ratios course / seed, which the course promises to keep at
memory <= 1/8 and time <= 1.5 (``--check`` makes it exit 1 otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

TARGETS = {"memory": 1 / 8, "time": 1.5}


class SeedGenerateParams(torch.autograd.Function):
    """The reference code's GenerateParams (seed document), unchanged in substance."""

    @staticmethod
    def forward(ctx, coefficients, out_dim, in_dim, seed):
        num_basis = coefficients.shape[0]
        rand_seed = torch.randint(int(1e10), (1,))
        torch.manual_seed(seed)
        W = torch.zeros(num_basis, out_dim, in_dim, device=coefficients.device, dtype=coefficients.dtype)
        nn.init.uniform_(W, a=-1.0, b=1.0)
        out = torch.einsum("b,boi->oi", coefficients, W)
        params = torch.tensor([out_dim, in_dim, seed])
        ctx.save_for_backward(coefficients, params)
        torch.manual_seed(int(rand_seed))
        return out

    @staticmethod
    def backward(ctx, grad_output):
        coefficients, params = ctx.saved_tensors
        num_basis = coefficients.shape[0]
        out_dim, in_dim, seed = (int(p) for p in params)
        rand_seed = torch.randint(int(1e10), (1,))
        torch.manual_seed(seed)
        W = torch.zeros(num_basis, out_dim, in_dim, device=coefficients.device, dtype=coefficients.dtype)
        nn.init.uniform_(W, a=-1.0, b=1.0)
        W = W.permute(1, 2, 0).reshape(-1, num_basis)
        grad_coefficients = torch.einsum("d,dl->l", grad_output.flatten(), W)
        torch.manual_seed(int(rand_seed))
        return grad_coefficients, None, None, None


def _implementation(name: str):
    from course.nola import GenerateParams, random_basis

    if name == "seed":
        return SeedGenerateParams.apply
    if name == "course":
        return GenerateParams.apply
    if name == "autograd":
        return lambda c, rows, cols, seed: torch.einsum("k,kij->ij", c, random_basis(len(c), rows, cols, seed))
    raise ValueError(name)


def _pass(f, c, rows, cols, upstream) -> None:
    c.grad = None
    (f(c, rows, cols, 7) * upstream).sum().backward()


def worker(args) -> dict:
    """One measurement in this (fresh) process; prints a JSON line."""
    torch.set_num_threads(args.threads)
    f = _implementation(args.worker)
    generator = torch.Generator().manual_seed(0)
    c = torch.randn(args.num_basis, generator=generator).requires_grad_()
    upstream = torch.randn(args.rows, args.cols, generator=generator)
    small = torch.randn(8, requires_grad=True)
    _pass(f, small, 4, 4, torch.ones(4, 4))  # warm-up: loads code and pools, not the function's data
    if args.what == "memory":
        from course.memory import peak_memory

        _, peak = peak_memory(lambda: _pass(f, c, args.rows, args.cols, upstream), torch.device("cpu"))
        if peak is None:
            raise SystemExit("course.memory.peak_memory cannot measure a CPU peak on this system (Linux with glibc "
                             "only): run this benchmark on Linux.")
        return {"peak_bytes": peak}
    _pass(f, c, args.rows, args.cols, upstream)
    seconds = []
    for _ in range(args.calls):
        start = time.perf_counter()
        _pass(f, c, args.rows, args.cols, upstream)
        seconds.append(time.perf_counter() - start)
    return {"seconds": statistics.median(seconds)}


def _measure(name: str, what: str, args) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, __file__, "--worker", name, "--what", what, "--num-basis", str(args.num_basis),
               "--rows", str(args.rows), "--cols", str(args.cols), "--calls", str(args.calls),
               "--threads", str(args.threads)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-basis", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of fresh processes")
    parser.add_argument("--calls", type=int, default=5, help="timed forward+backward passes per process")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="a small size, one round (a smoke test)")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the ratios meet the targets")
    parser.add_argument("--worker", choices=["seed", "course", "autograd"], help=argparse.SUPPRESS)
    parser.add_argument("--what", choices=["memory", "time"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.quick:
        args.num_basis, args.rows, args.cols, args.repeats, args.calls = 64, 8, 512, 1, 2

    names = ["seed", "course", "autograd"]
    results = {name: {"memory": [], "time": []} for name in names}
    for _ in range(args.repeats):
        for what in ("memory", "time"):
            for name in names:
                key = "peak_bytes" if what == "memory" else "seconds"
                results[name][what].append(_measure(name, what, args)[key])
    median = {name: {what: statistics.median(v) for what, v in r.items()} for name, r in results.items()}

    numbers = args.num_basis * args.rows * args.cols
    print(f"torch {torch.__version__}, {args.threads} threads; K={args.num_basis} basis matrices of "
          f"{args.rows} x {args.cols} ({numbers / 1e6:.1f} M numbers, {4 * numbers / 2**20:.0f} MiB in float32); "
          f"median of {args.repeats} fresh processes each")
    print(f"{'implementation':>15} {'peak MiB':>10} {'seconds':>9}   (forward + backward)")
    for name in names:
        print(f"{name:>15} {median[name]['memory'] / 2**20:10.1f} {median[name]['time']:9.3f}")
    ratios = {what: median["course"][what] / median["seed"][what] for what in ("memory", "time")}
    ok = all(ratios[what] <= TARGETS[what] for what in TARGETS)
    print(f"course / seed: memory {ratios['memory']:.4f} (target <= {TARGETS['memory']:.3f}), "
          f"time {ratios['time']:.2f} (target <= {TARGETS['time']}) -> {'OK' if ok else 'MISSED'}")
    if args.check and not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
