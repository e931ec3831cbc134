"""The timing harness that ``lora_vs_peft.py`` and ``dora_vs_peft.py`` share (run by hand).

Each script builds, for one layer size, the course's layer and PEFT's with the same base weight,
factors and input (``pair``); this module times their forward + backward passes interleaved
(course, PEFT, PEFT, course, ...) so that load from other processes hits both alike, and prints
the median of each with the ratio course / PEFT against the script's target.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import peft
import torch
from torch import nn

Pair = Callable[[int, int, int, tuple[int, int]], tuple[nn.Module, nn.Module, torch.Tensor]]


def _step(layer: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    layer(x).sum().backward()
    elapsed = time.perf_counter() - start
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    return elapsed


def interleaved_medians(ours: nn.Module, theirs: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median seconds of a forward + backward pass of each layer on ``x``, after three warm-up rounds."""
    for _ in range(3):
        _step(ours, x), _step(theirs, x)
    times = {"course": [], "peft": []}
    for i in range(repeats):
        order = [("course", ours), ("peft", theirs)]
        for name, layer in order if i % 2 == 0 else order[::-1]:
            times[name].append(_step(layer, x))
    return statistics.median(times["course"]), statistics.median(times["peft"])


def main(doc: str, sizes: list[tuple[int, int]], pair: Pair, target: float) -> None:
    """The command line of a benchmark: ``--repeats``, ``--threads``, ``--r``, ``--quick``; one row per size."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="one small size, few repeats (a smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats, tokens = args.repeats, (8, 128)
    if args.quick:
        sizes, repeats, tokens = [(64, 96)], 3, (2, 16)
    print(f"torch {torch.__version__}, peft {peft.__version__}, threads {args.threads}, r {args.r}, "
          f"tokens {tokens[0]}x{tokens[1]}, {repeats} interleaved repeats, median of forward+backward")
    print(f"{'size (in x out)':>16} {'course ms':>10} {'peft ms':>10} {'course/peft':>12}")
    worst = 0.0
    for n_in, n_out in sizes:
        ours, theirs = interleaved_medians(*pair(n_in, n_out, args.r, tokens), repeats)
        worst = max(worst, ours / theirs)
        print(f"{n_in:>7}x{n_out:<8} {ours * 1e3:>10.2f} {theirs * 1e3:>10.2f} {ours / theirs:>12.3f}")
    print(f"worst ratio {worst:.3f} ({'within' if worst <= target else 'ABOVE'} the {target} target)")
