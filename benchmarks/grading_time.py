"""Does the grading sandbox cost more than 10 % of the time to grade one submission? (issue 22, run by hand)

    git worktree add /tmp/grader-before 6e2103f     # the grader before the sandbox (issue 22)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/grading_time.py --before /tmp/grader-before \
        [--runs 5] [--model DIR] [--timeout 900] [--notebooks solution student]

It copies chapter 02's solution notebook and its untouched student notebook into hand-in
folders of their own and times ``python -m course grade FOLDER --quick --json`` (the whole
command: start-up, sandbox, executing the notebook, judging both exercises) with this checkout's
grader ("sandboxed") and with the one in ``--before`` ("before"), interleaved before, sandboxed,
before, sandboxed ... with the same interpreter, so that a shared machine's load falls on both
alike. ``--model``: ``COURSE_MODEL`` for the notebooks (a local model folder, e.g. a tiny random
Llama as ``tests/conftest.py`` makes); by default the course's base model. Each run's score must be
the same with both graders (1 for the solution, 0 for the student notebook), else it stops.
It prints, headed by the processor, every run's seconds, then per notebook the paired
difference sandboxed - before with its 95 % interval (``course.evidence.compare``) and the ratio
of the means; the sandbox holds the issue's budget when that ratio is at most 1.10.

Result, 2026-12-04 (AMD EPYC with AVX512-BF16, 2 cores, machine otherwise idle; sandbox "bwrap";
``--runs 5 --model /tmp/tiny-llama --notebooks solution``, a random Llama with hidden size 64 and
SmolLM2's 30 blocks, so that the notebook's own work is small and the sandbox's share as large as it
gets):

    run  before  sandboxed   (seconds, score 1.0 every time)
      1    27.4       28.5
      2    26.8       27.8
      3    28.4       28.2
      4    29.6       29.3
      5    29.1       28.4
    solution: sandboxed - before = +0.2 s [-0.9, +1.2] over 5 pairs; ratio of means 1.006

The interval's upper end, +1.2 s, is 4 % of a grading: within the 10 % budget. The sandbox's own
steps, timed alone: choosing it once (``detect``, a probe process) 0.37 s; the package fingerprint
0.02 s, three times per hand-in; starting a process under bubblewrap 0.07 to 0.11 s instead of
0.01 s, three processes (the kernel's runner and the two checks); ending and removing a sandbox
0.02 to 0.04 s.

An earlier attempt (2026-12-03, on a machine loaded 6 to 10) had single gradings of 7 to 12 minutes
and could not finish: those were not load but a stall. nbclient awaits each cell's reply in one
``zmq.asyncio`` poll, which can miss its edge-triggered wake-up while the reply sits in the socket
(seen with gdb: kernel idle, shell socket ``zmq.EVENTS`` = POLLIN, the poll still pending) and then
waits for its whole timeout. ``course.notebook_client`` polls again every few seconds; the times
above are with it. The student notebook is not compared: it calls ``course.lora.inject_lora_linear``,
which the grader before the sandbox lacks, so there it fails from cell 18 on and does less work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from course.device import cpu_model
from course.evidence import compare

HERE = Path(__file__).resolve().parent.parent
CHAPTER = "02_lora_from_scratch"
EXPECTED = {"solution": 1.0, "student": 0.0}


def grade_once(tree: Path, folder: Path, *, model: str | None, timeout: float) -> tuple[float, float | None]:
    """Seconds the whole ``grade`` command took with the grader in ``tree``, and the score it gave."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    if model:
        env["COURSE_MODEL"] = model
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "course", "grade", str(folder), "--quick", "--json",
                           "--timeout", f"{timeout:g}"], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if len(rows) != 1:
        raise SystemExit(f"grading {folder} with {tree} gave {len(rows)} rows (exit {done.returncode}):\n"
                         f"{done.stderr[-2000:]}")
    return seconds, rows[0]["score"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="a checkout of the grader before the sandbox")
    parser.add_argument("--runs", type=int, default=5, help="runs of each grader per notebook (default 5)")
    parser.add_argument("--model", help="COURSE_MODEL for the notebooks (default: the course's base model)")
    parser.add_argument("--timeout", type=float, default=900, help="grade's --timeout (default 900)")
    parser.add_argument("--notebooks", nargs="+", choices=sorted(EXPECTED), default=sorted(EXPECTED),
                        help="which hand-ins to time (default both)")
    args = parser.parse_args(argv)
    if not (args.before / "course" / "grade.py").is_file():
        parser.error(f"--before {args.before} holds no course/grade.py: give a checkout of the course, e.g. "
                     "`git worktree add /tmp/grader-before 6e2103f`.")
    if args.runs < 2:
        parser.error("--runs must be at least 2 (an interval needs two pairs)")
    trees = {"before": args.before.resolve(), "sandboxed": HERE}
    work = Path(tempfile.mkdtemp(prefix="grading-time-"))
    work.chmod(0o755)
    folders = {}
    for kind, source in (("solution", HERE / "solutions"), ("student", HERE / "notebooks")):
        if kind not in args.notebooks:
            continue
        folders[kind] = work / kind
        folders[kind].mkdir()
        shutil.copy(source / f"{CHAPTER}.ipynb", folders[kind] / f"{CHAPTER}.ipynb")
        (folders[kind] / f"{CHAPTER}.ipynb").chmod(0o644)
    times: dict[tuple[str, str], list[float]] = {(k, g): [] for k in folders for g in trees}
    print(f"processor: {cpu_model()}, {os.cpu_count()} CPUs; model: {args.model or 'the course base model'}")
    print(f"{'run':>3}  {'notebook':<9} {'grader':<10} {'seconds':>8}  score", flush=True)
    try:
        for run in range(args.runs):
            for kind, folder in folders.items():
                for grader, tree in trees.items():
                    seconds, score = grade_once(tree, folder, model=args.model, timeout=args.timeout)
                    print(f"{run + 1:>3}  {kind:<9} {grader:<10} {seconds:>8.1f}  {score}", flush=True)
                    if score != EXPECTED[kind]:
                        raise SystemExit(f"the {grader} grader gave the {kind} notebook {score}, not {EXPECTED[kind]}")
                    times[kind, grader].append(seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for kind in folders:
        new, old = times[kind, "sandboxed"], times[kind, "before"]
        result = compare(new, old, names=("sandboxed", "before"), paired=True, higher_is_better=False)
        ratio = (sum(new) / len(new)) / (sum(old) / len(old))
        print(f"{kind}: sandboxed - before = {result.difference:+.1f} s [{result.low:+.1f}, {result.high:+.1f}] "
              f"over {len(new)} pairs; ratio of means {ratio:.3f} ({'within' if ratio <= 1.10 else 'OVER'} the 10 % budget)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
