"""Every notebook runs top to bottom, offline, under nbval (lax mode), three ways.

- ``solution``: float32, ``COURSE_STRICT_CHECKS=1`` (a failed check fails the run, and every check
  it calls must pass), ``COURSE_QUICK=1`` budgets. The full-budget run is ``make run``, whose saved
  outputs the prose cites; ``tests/test_notebooks.py`` fails when they are older than the code.
- ``solution-bf16``: the route a Colab GPU takes, on the CPU: the base model in bfloat16
  (``COURSE_DTYPE=bfloat16``) with float32 adapters, ``COURSE_QUICK=1`` budgets, every check passing.
  How depends on the processor (``course.device.cpu_bfloat16``; ``COURSE_CPU_BFLOAT16=native|emulated``
  forces either path on any machine):

  * bfloat16 native (AVX512-BF16, AMX): every fourth notebook (``ROTATION``, by the day) on the real
    base model, as on a GPU (all nine took 10-11 minutes of the suite's 30; a third, 3-4);
  * bfloat16 emulated (AVX2-only x86: over a hundred times slower than float32, which would take
    hours): the same share on a small random Llama of SmolLM2's architecture, tokenizer and module
    names (``conftest.make_tiny_model``), so every cell still runs its half-precision code path, with
    the course's adapters rebuilt for it (``COURSE_ADAPTERS``, ``conftest.tiny_adapters_dir``).

  The other notebooks are skipped, saying so, and take their turn on the next days: every notebook
  goes through bfloat16 once in ``ROTATION`` days. (The small model is no shortcut where bfloat16 is
  native: its random replies always run to their full length; chapter 01 ran 416 s on it, on a
  loaded machine.) ``COURSE_BF16_NOTEBOOKS=all`` (or a list of prefixes, ``02,05``) chooses the share.
- ``student``: as a learner first opens it, with ``COURSE_QUICK=1``: every check must report
  "not attempted", so a stub can never pass, and every later cell must still run on the
  reference answers the notebook falls back to. What this guards is the notebook's plumbing, not
  the model's numbers (the solution runs have those), so it runs on the tiny Llama below, in
  float32: minutes saved on every processor.

Each run has a time limit sized from its time measured on the processor named in
``tests/notebook_times.json`` (``LIMIT_FACTOR`` times that, plus ``LIMIT_SLACK`` seconds), so a
pathological slowdown fails fast, naming the notebook and the cell it stopped in.
``COURSE_RECORD_TIMES=FILE`` appends each run's seconds to FILE (JSON lines) to re-measure them.

Cells marked ``# NBVAL_CHECK_OUTPUT`` are compared with the stored outputs of the solution
notebooks (in the float32 run only: bfloat16 rounds differently).
"""

import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from course import notebooks
from course.device import cpu_bfloat16, cpu_model

pytestmark = pytest.mark.notebook

TIMES = json.loads((Path(__file__).with_name("notebook_times.json")).read_text())
LIMIT_FACTOR, LIMIT_SLACK, UNMEASURED_LIMIT = 3.0, 60.0, 600.0
BF16 = cpu_bfloat16()

ROTATION = 4  # the bfloat16 pass takes every ROTATION-th notebook the full way, by the day
SOLUTIONS = notebooks.solution_paths()
CASES = ([("solution", p) for p in SOLUTIONS] + [("solution-bf16", p) for p in SOLUTIONS]
         + [("student", notebooks.NOTEBOOKS / p.name) for p in SOLUTIONS])
SETTINGS = {  # kind -> (COURSE_STRICT_CHECKS, COURSE_QUICK, COURSE_DTYPE)
    "solution": ("1", "1", "float32"),
    "solution-bf16": ("1", "1", "bfloat16"),
    "student": ("0", "1", "float32"),
}


def half_precision_plan() -> str:
    """The sentence the test output shows about the bfloat16 pass."""
    share = ", ".join(sorted(s[:2] for s in bf16_share()))
    if BF16.native:
        return (f"{BF16}: running solution notebooks {share} in bfloat16 on the real base model; the others "
                f"take their turn on other days (every notebook once in {ROTATION} days)")
    return (f"{BF16}: running solution notebooks {share} in bfloat16 on a small random Llama of "
            "SmolLM2's architecture, with the course's adapters rebuilt for it; the others take their turn "
            f"on other days (every notebook once in {ROTATION} days)")


def bf16_share(today: datetime.date | None = None) -> set[str]:
    """The notebooks this run takes through bfloat16 (on the real model where bfloat16 is native, on
    the small one where it is emulated): ``COURSE_BF16_NOTEBOOKS`` (``all``, or prefixes such
    as ``02,05``), else every ``ROTATION``-th one, starting by the day."""
    stems = [p.stem for p in SOLUTIONS]
    chosen = os.environ.get("COURSE_BF16_NOTEBOOKS", "").strip()
    if chosen == "all":
        return set(stems)
    if chosen:
        prefixes = [p.strip() for p in chosen.split(",") if p.strip()]
        picked = {s for s in stems if any(s.startswith(p) for p in prefixes)}
        if not picked:
            raise ValueError(f"COURSE_BF16_NOTEBOOKS={chosen!r} names no notebook: use all, or prefixes like 02,05")
        return picked
    turn = (today or datetime.date.today()).toordinal() % ROTATION
    return {s for i, s in enumerate(stems) if i % ROTATION == turn}


def timing_key(kind: str, stem: str) -> str:
    """Which measured time a run is held to, and so which model it runs on: the bfloat16 pass runs on
    the real model where bfloat16 is native (``solution-bf16``), on the small one where it is emulated
    (``solution-bf16-tiny``)."""
    return "solution-bf16-tiny" if kind == "solution-bf16" and not BF16.native else kind


def time_limit(kind: str, stem: str) -> tuple[float, str]:
    """Seconds a run may take, and how that number was made."""
    key = timing_key(kind, stem)
    measured = TIMES["seconds"].get(key, {}).get(stem)
    if measured is None:
        return UNMEASURED_LIMIT, f"{UNMEASURED_LIMIT:.0f} s: no time measured for {key} {stem} yet"
    limit = LIMIT_FACTOR * measured + LIMIT_SLACK
    return limit, (f"{limit:.0f} s = {LIMIT_FACTOR:g} x the {measured:.0f} s measured on "
                   f"{TIMES['processor']} + {LIMIT_SLACK:.0f} s")


def run_nbval(path, env, limit: float, why: str) -> subprocess.CompletedProcess:
    """nbval on ``path`` with a per-cell and a whole-run limit; past it, every process it started is
    killed and the test fails naming the notebook and the cell that was running."""
    command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--nbval-lax",
               "--nbval-current-env", f"--nbval-cell-timeout={limit:.0f}", "-o", "addopts=", "--durations=3",
               str(path)]
    env = {**env, "PYTHONUNBUFFERED": "1"}  # cells reported as they finish, so a stop can name the next
    process = subprocess.Popen(command, cwd=notebooks.ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        _kill_tree(process)
        stdout, stderr = process.communicate()
        finished = [int(n) for n in re.findall(r"::Cell (\d+) (?:PASSED|FAILED|SKIPPED)", stdout)]
        running = max(finished) + 1 if finished else 0
        pytest.fail(f"{Path(path).name} passed its time limit ({why}) and was stopped in cell {running} "
                    f"(cells 0-{running - 1} had finished). A cell this slow is a fault: look at what "
                    f"cell {running} runs on this processor ({cpu_model()}, {BF16}).\n{stdout[-3000:]}",
                    pytrace=False)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _kill_tree(process: subprocess.Popen) -> None:
    """Kill nbval, its kernel and anything they started (the kernel may sit in its own session)."""
    import psutil

    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def _case(kind: str, path: Path):
    """A parameter whose pytest-timeout is the run's own limit plus room to report it."""
    limit, _ = time_limit(kind, path.stem)
    return pytest.param(kind, path, id=f"{kind}-{path.name}", marks=pytest.mark.timeout(limit + 120))


@pytest.mark.parametrize(("kind", "path"), [_case(k, p) for k, p in CASES])
def test_notebook_runs(kind, path, tmp_path, request):
    log = tmp_path / "checks.jsonl"
    strict, quick, dtype = SETTINGS[kind]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COURSE_CHECK_LOG": str(log), "MPLBACKEND": "agg",
           "COURSE_STRICT_CHECKS": strict, "COURSE_QUICK": quick, "COURSE_DTYPE": dtype}
    if kind == "solution-bf16" and path.stem not in bf16_share():
        pytest.skip(f"{BF16}: this run's bfloat16 share is {sorted(bf16_share())}; {path.stem} takes "
                    "its turn on another day (COURSE_BF16_NOTEBOOKS=all runs every one)")
    if kind == "solution-bf16":
        path = _without_output_checks(path, tmp_path)
    if timing_key(kind, path.stem) in ("solution-bf16-tiny", "student"):
        env["COURSE_MODEL"] = str(request.getfixturevalue("tiny_model_dir"))
        env["COURSE_ADAPTERS"] = str(request.getfixturevalue("tiny_adapters_dir"))
    limit, why = time_limit(kind, path.stem)
    start = time.perf_counter()
    result = run_nbval(path, env, limit, why)
    _record(kind, path.stem, time.perf_counter() - start, result.stdout)
    assert result.returncode == 0, f"{path.name} failed under nbval:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"

    expected = notebooks.checks_called(nbformat.read(path, as_version=4))
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    assert sorted({r["check"] for r in records}) == sorted(expected), "every check the notebook calls must run"
    statuses = {r["check"]: r["status"] for r in records}
    wanted = "not_attempted" if kind == "student" else "passed"
    wrong = {name: status for name, status in statuses.items() if status != wanted}
    assert not wrong, f"{path.name}: checks that are not {wanted}: {wrong}"


def _record(kind: str, stem: str, seconds: float, stdout: str = "") -> None:
    target = os.environ.get("COURSE_RECORD_TIMES")
    if target:
        slowest = re.findall(r"([\d.]+)s call .*::(Cell \d+)", stdout)
        with open(target, "a") as out:
            out.write(json.dumps({"kind": timing_key(kind, stem), "notebook": stem,
                                  "seconds": round(seconds, 1), "processor": cpu_model(),
                                  "bfloat16": "native" if BF16.native else "emulated",
                                  "slowest cells": [f"{cell}: {s} s" for s, cell in slowest]}) + "\n")


def _without_output_checks(path, tmp_path):
    """A copy of a solution notebook without ``# NBVAL_CHECK_OUTPUT`` markers: bfloat16 need
    not print float32's digits. (Notebooks find everything through ``course``, not by path.)"""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.source = "\n".join(line for line in cell.source.split("\n")
                                    if line.strip() != notebooks.CHECK_OUTPUT)
    copy = tmp_path / path.name
    nbformat.write(nb, copy)
    return copy
