"""The grader: executes a notebook, collects its checks, scores against the solution's checks."""

import json

import nbformat
import pytest

from course import notebooks
from course.__main__ import main
from course.grade import grade

pytestmark = pytest.mark.notebook

SETUP = "from course import check"


def write(path, *cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, path)
    return path


def test_right_wrong_missing_and_broken(tmp_path):
    # Named like the welcome notebook, so the expected checks are those of solutions/00_welcome.ipynb.
    expected = notebooks.checks_called(nbformat.read(notebooks.SOLUTIONS / "00_welcome.ipynb", as_version=4))
    assert "count_trainable" in expected
    right = write(tmp_path / "00_welcome.ipynb", SETUP,
                  "check.count_trainable(lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad))")
    report = grade(right)
    assert report.passed == report.expected == len(expected) and report.score == 1.0

    wrong = write(right, SETUP, "1/0", "check.count_trainable(lambda m: sum(p.numel() for p in m.parameters()))")
    report = grade(wrong)
    statuses = {c["check"]: c["status"] for c in report.checks}
    assert statuses["count_trainable"] == "failed" and report.score == 0.0
    assert any("ZeroDivisionError" in e for e in report.errors), "a broken cell is reported and does not stop grading"

    missing = write(right, SETUP, "x = 1")
    report = grade(missing)
    assert {c["status"] for c in report.checks} == {"missing"}


def test_cli_grades_the_student_welcome_notebook_as_not_attempted(capsys):
    assert main(["grade", "--json", "--quick", str(notebooks.NOTEBOOKS / "00_welcome.ipynb")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["score"] == 0.0 and report["expected"] >= 1
    assert {c["status"] for c in report["checks"]} == {"not_attempted"}
    assert report["errors"] == []


def test_cli_rejects_a_missing_file(tmp_path, capsys):
    assert main(["grade", str(tmp_path / "nope.ipynb")]) == 2
    assert "not a notebook file" in capsys.readouterr().out
