"""Grading student notebooks: ``python -m course grade PATH... [--json]``.

Each notebook is executed headless in its own folder (errors do not stop the run,
so one broken cell costs only the checks that depend on it). Every check call is
recorded through ``COURSE_CHECK_LOG``; the checks expected are those the matching
solution notebook calls (by file name), or, without one, those the notebook calls.
A check that never ran counts as ``missing``. The score is passed / expected.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat

from course import notebooks


@dataclass
class Report:
    notebook: str
    score: float
    passed: int
    expected: int
    checks: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _expected_checks(path: Path, nb) -> list[str]:
    solution = notebooks.SOLUTIONS / path.name
    if solution.is_file():
        return notebooks.checks_called(nbformat.read(solution, as_version=4))
    return notebooks.checks_called(nb)


def _cell_errors(nb) -> list[str]:
    errors = []
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                errors.append(f"cell {index}: {output.get('ename')}: {output.get('evalue')}")
    return errors


def grade(path, *, quick: bool = False, timeout: int = 900) -> Report:
    """Execute one student notebook and report its checks."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".ipynb":
        raise FileNotFoundError(f"{path}: not a notebook file (expected an existing .ipynb)")
    expected = _expected_checks(path, nbformat.read(path, as_version=4))
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "checks.jsonl"
        env = {"COURSE_CHECK_LOG": str(log), "COURSE_STRICT_CHECKS": None, "COURSE_QUICK": "1" if quick else None}
        nb, seconds, _ = notebooks.execute(path, timeout=timeout, allow_errors=True, env=env)
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    latest = {r["check"]: r for r in records}  # a check run twice counts as its last result
    checks = []
    for name in expected:
        record = latest.get(name, {"check": name, "status": "missing", "message": "this check never ran"})
        checks.append(record)
    checks += [r for name, r in latest.items() if name not in expected]
    passed = sum(1 for c in checks if c["check"] in expected and c["status"] == "passed")
    score = passed / len(expected) if expected else 1.0
    return Report(str(path), round(score, 4), passed, len(expected), checks, _cell_errors(nb), round(seconds, 1))


def grade_many(paths, *, as_json: bool = False, quick: bool = False) -> int:
    """Grade each notebook; print one report each (JSON lines with ``as_json``). Exit 0, or 2 on a bad path."""
    status = 0
    for path in paths:
        try:
            report = grade(path, quick=quick)
        except FileNotFoundError as exc:
            print(exc)
            status = 2
            continue
        if as_json:
            print(json.dumps(asdict(report)))
            continue
        print(f"{report.notebook}: {report.passed}/{report.expected} checks passed ({report.seconds} s)")
        for c in report.checks:
            first = c["message"].splitlines()[0] if c["message"] else ""
            print(f"  {c['status']:14s} {c['check']:24s} {first}")
        for error in report.errors:
            print(f"  error in {error}")
    return status
