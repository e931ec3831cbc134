"""``make gpu-check``: every solution notebook on a CUDA device at the full budget, timed.

The CPU runs of the test suite use the smallest budgets; this is the check that the notebooks,
as a learner runs them on a GPU, work: each notebook of ``solutions/`` is executed headless
with ``COURSE_QUICK`` unset (the full budget), ``COURSE_STRICT_CHECKS=1`` (a failed check
fails the notebook), ``COURSE_DEVICE=cuda`` and ``COURSE_DTYPE`` set to the dtype the course
picks for this GPU (``course.device.default_dtype``: bfloat16 from compute capability 8.0,
float16 below), so the dtype recorded is the one every notebook ran in. The notebooks'
saved outputs are not touched (they are the CPU run's).

The result is a table, one row per notebook (name, seconds, dtype, status), printed and
written to ``outputs/gpu-check-<time>.md`` and ``.json`` (a new pair per run, never an old
one overwritten). Notebooks left when ``--budget`` seconds are spent are listed as not run,
so the whole check fits one call of a fixed length. Without a CUDA device it refuses at
once and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = ROOT / "outputs"


class NoCudaDevice(RuntimeError):
    """``make gpu-check`` was asked for on a machine without a CUDA device."""


@dataclass
class Row:
    notebook: str
    seconds: float
    dtype: str
    status: str  # "ok", "FAILED: <last line of the error>", or "not run: ..."


def cuda_device() -> tuple[str, str]:
    """(GPU name, dtype name) of CUDA device 0; ``NoCudaDevice`` with what to do when there is none."""
    import torch

    if not torch.cuda.is_available():
        raise NoCudaDevice(
            "make gpu-check runs the notebooks on a CUDA device, and there is none here "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}; torch.cuda.is_available() is False). "
            "Run it on a machine with an NVIDIA GPU and a CUDA build of torch (a cloud GPU, Colab); "
            "on this machine, `make run` executes the notebooks on the CPU."
        )
    from course.device import default_dtype

    dtype = default_dtype(torch.device("cuda"))
    return torch.cuda.get_device_name(0), str(dtype).removeprefix("torch.")


def run_notebook(path: Path, env: dict, timeout: int) -> tuple[float, str | None]:
    """Execute one notebook headless (outputs not written back): (seconds, error or None)."""
    from course.notebooks import execute

    _, seconds, error = execute(path, timeout=timeout, env=env)
    return seconds, error


def check(paths, *, budget: float = 570.0, timeout: int = 600, runner=None, device=None,
          clock=time.monotonic, report=print) -> tuple[str, list[Row]]:
    """Run ``paths`` one after another on the GPU; (GPU name, rows). Refuses without a CUDA device.

    ``runner(path, env, timeout) -> (seconds, error)`` and ``device() -> (gpu, dtype)`` default to
    ``run_notebook`` and ``cuda_device`` (tests pass their own).
    """
    runner, device = runner or run_notebook, device or cuda_device
    gpu, dtype = device()
    env = {"COURSE_QUICK": None, "COURSE_STRICT_CHECKS": "1", "COURSE_DEVICE": "cuda", "COURSE_DTYPE": dtype}
    rows: list[Row] = []
    start = clock()
    for path in paths:
        path = Path(path)
        left = budget - (clock() - start)
        if left <= 0:
            rows.append(Row(path.name, 0.0, dtype, f"not run: the {budget:.0f} s budget was spent"))
        else:
            seconds, error = runner(path, env, int(min(timeout, left)))
            rows.append(Row(path.name, round(seconds, 1), dtype, "ok" if error is None else f"FAILED: {error}"))
        report(f"{rows[-1].notebook:40s} {rows[-1].seconds:7.1f} s  {rows[-1].dtype:9s} {rows[-1].status}")
    return gpu, rows


def table(gpu: str, rows: list[Row]) -> str:
    """The result as a markdown table, with the GPU and the total time."""
    total = sum(r.seconds for r in rows)
    lines = [f"GPU check on {gpu}: {sum(r.status == 'ok' for r in rows)} of {len(rows)} notebooks ok, "
             f"{total:.0f} s in all", "", "| notebook | seconds | dtype | status |", "| --- | ---: | --- | --- |"]
    lines += [f"| {r.notebook} | {r.seconds:.1f} | {r.dtype} | {r.status.replace('|', '/')} |" for r in rows]
    return "\n".join(lines) + "\n"


def claim(folder: Path, now=time.gmtime) -> tuple[Path, Path]:
    """Claim new result files before the work starts (never an existing one): (markdown, json)."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", now())
    for n in range(100):
        base = folder / (f"gpu-check-{stamp}" + (f"-{n}" if n else ""))
        try:
            with open(base.with_suffix(".md"), "x", encoding="utf-8") as f:
                f.write("GPU check running...\n")
        except FileExistsError:
            continue
        return base.with_suffix(".md"), base.with_suffix(".json")
    raise FileExistsError(f"100 GPU check results from {stamp} already in {folder}.")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # atomic: a reader sees the old content or the new, never half


def save(gpu: str, rows: list[Row], markdown: Path, as_json: Path) -> None:
    _write(as_json, json.dumps({"gpu": gpu, "notebooks": [asdict(r) for r in rows]}, indent=1) + "\n")
    _write(markdown, table(gpu, rows))


def main(argv=None) -> int:
    from course.notebooks import solution_paths

    p = argparse.ArgumentParser(prog="python -m course gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="*", help="solution notebooks (default: all of solutions/)")
    p.add_argument("--budget", type=float, default=570.0,
                   help="seconds for the whole check; notebooks left after it are listed as not run (default 570)")
    p.add_argument("--timeout", type=int, default=600, help="seconds one notebook may run (default 600)")
    o = p.parse_args(argv)
    try:
        cuda_device()
    except NoCudaDevice as exc:
        print(f"gpu-check: {exc}", file=sys.stderr)
        return 2
    markdown, as_json = claim(OUTPUTS)
    gpu, rows = check(o.paths or solution_paths(), budget=o.budget, timeout=o.timeout)
    save(gpu, rows, markdown, as_json)
    print("\n" + table(gpu, rows) + f"\nwritten to {markdown} and {as_json.name}")
    return 0 if all(r.status == "ok" for r in rows) else 1
