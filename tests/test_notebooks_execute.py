"""Every notebook runs top to bottom, offline, under nbval (lax mode).

Solution notebooks run with the real CPU budget and ``COURSE_STRICT_CHECKS=1``: a failed
check fails the run, and every check they call must pass. Student notebooks run as a learner
first opens them, with ``COURSE_QUICK=1`` (smaller training budgets): every check must report
"not attempted", so a stub can never pass. Cells marked ``# NBVAL_CHECK_OUTPUT`` are compared
with the stored outputs of the solution notebooks.
"""

import json
import os
import subprocess
import sys

import nbformat
import pytest

from course import notebooks

pytestmark = pytest.mark.notebook

CASES = [("solution", p) for p in notebooks.solution_paths()] + [
    ("student", notebooks.NOTEBOOKS / p.name) for p in notebooks.solution_paths()
]


def run_nbval(path, env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax", "--nbval-current-env",
         "--nbval-cell-timeout=900", str(path)],
        cwd=notebooks.ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )


@pytest.mark.parametrize(("kind", "path"), CASES, ids=[f"{k}-{p.name}" for k, p in CASES])
def test_notebook_runs(kind, path, tmp_path):
    log = tmp_path / "checks.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COURSE_CHECK_LOG": str(log), "MPLBACKEND": "agg",
           "COURSE_STRICT_CHECKS": "1" if kind == "solution" else "0", "COURSE_QUICK": "1" if kind == "student" else "0"}
    result = run_nbval(path, env)
    assert result.returncode == 0, f"{path.name} failed under nbval:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"

    expected = notebooks.checks_called(nbformat.read(path, as_version=4))
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    assert sorted({r["check"] for r in records}) == sorted(expected), "every check the notebook calls must run"
    statuses = {r["check"]: r["status"] for r in records}
    wanted = "passed" if kind == "solution" else "not_attempted"
    wrong = {name: status for name, status in statuses.items() if status != wanted}
    assert not wrong, f"{path.name}: checks that are not {wanted}: {wrong}"
