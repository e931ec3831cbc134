"""Every notebook runs top to bottom, offline, under nbval (lax mode), three ways.

- ``solution``: float32, ``COURSE_STRICT_CHECKS=1`` (a failed check fails the run, and every check
  it calls must pass), ``COURSE_QUICK=1`` budgets. The full-budget run is ``make run``, whose saved
  outputs the prose cites; ``tests/test_notebooks.py`` fails when they are older than the code.
- ``solution-bf16``: the route a Colab GPU takes, on the CPU: the base model in bfloat16
  (``COURSE_DTYPE=bfloat16``) with float32 adapters, ``COURSE_QUICK=1`` budgets, every check passing.
- ``student``: as a learner first opens it, with ``COURSE_QUICK=1``: every check must report
  "not attempted", so a stub can never pass.

Cells marked ``# NBVAL_CHECK_OUTPUT`` are compared with the stored outputs of the solution
notebooks (in the float32 run only: bfloat16 rounds differently).
"""

import json
import os
import subprocess
import sys

import nbformat
import pytest

from course import notebooks

pytestmark = pytest.mark.notebook

SOLUTIONS = notebooks.solution_paths()
CASES = ([("solution", p) for p in SOLUTIONS] + [("solution-bf16", p) for p in SOLUTIONS]
         + [("student", notebooks.NOTEBOOKS / p.name) for p in SOLUTIONS])
SETTINGS = {  # kind -> (COURSE_STRICT_CHECKS, COURSE_QUICK, COURSE_DTYPE)
    "solution": ("1", "1", "float32"),
    "solution-bf16": ("1", "1", "bfloat16"),
    "student": ("0", "1", "float32"),
}


def run_nbval(path, env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax", "--nbval-current-env",
         "--nbval-cell-timeout=900", str(path)],
        cwd=notebooks.ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )


@pytest.mark.parametrize(("kind", "path"), CASES, ids=[f"{k}-{p.name}" for k, p in CASES])
def test_notebook_runs(kind, path, tmp_path):
    log = tmp_path / "checks.jsonl"
    strict, quick, dtype = SETTINGS[kind]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COURSE_CHECK_LOG": str(log), "MPLBACKEND": "agg",
           "COURSE_STRICT_CHECKS": strict, "COURSE_QUICK": quick, "COURSE_DTYPE": dtype}
    if kind == "solution-bf16":
        path = _without_output_checks(path, tmp_path)
    result = run_nbval(path, env)
    assert result.returncode == 0, f"{path.name} failed under nbval:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"

    expected = notebooks.checks_called(nbformat.read(path, as_version=4))
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    assert sorted({r["check"] for r in records}) == sorted(expected), "every check the notebook calls must run"
    statuses = {r["check"]: r["status"] for r in records}
    wanted = "not_attempted" if kind == "student" else "passed"
    wrong = {name: status for name, status in statuses.items() if status != wanted}
    assert not wrong, f"{path.name}: checks that are not {wanted}: {wrong}"


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
