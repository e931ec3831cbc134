"""``classroom export --format nbgrader``, tried with the real nbgrader (0.9): chapters 01-03 are
exported, and for chapter 02 ``nbgrader generate_assignment`` makes the release copy and ``nbgrader
autograde`` gives a solution full marks and the untouched release copy zero, with the check's message
in the feedback ``nbgrader generate_feedback`` writes.

The chapter's notebook runs in full, twice, with ``COURSE_QUICK=1`` budgets on the tiny Llama of
``conftest.make_tiny_model`` (and the course's adapters rebuilt for it), as the student-notebook runs
do: what is tested is the plumbing, and the checks judge the answers on models of their own.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys

import nbformat
import pytest

from course import notebooks
from course.__main__ import main

pytestmark = pytest.mark.notebook
nbgrader_api = pytest.importorskip("nbgrader.api", reason="nbgrader is in the `classroom` extra")

CHAPTERS = ["01_load_adapters", "02_lora_from_scratch", "03_dora"]


@pytest.fixture(scope="module")
def course_dir(tmp_path_factory):
    dest = tmp_path_factory.mktemp("nbgrader") / "course"
    assert main(["classroom", "export", "--format", "nbgrader", "--chapters", "01,02,03", str(dest)]) == 0
    return dest


def nbgrader(course_dir, *args, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("COURSE_STRICT_CHECKS", "COURSE_CHECK_LOG")}
    env.update({**extra, "COURSE_QUICK": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "agg",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(notebooks.ROOT), env.get("PYTHONPATH")])),
                # nbgrader runs `alembic` (its database migrations) from PATH: the environment's own
                "PATH": os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])})
    done = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course_dir, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"nbgrader {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def test_the_export_marks_answers_tests_and_locks_the_rest(course_dir):
    assert (course_dir / "nbgrader_config.py").is_file()
    assert sorted(p.name for p in (course_dir / "source").iterdir()) == CHAPTERS
    for chapter in CHAPTERS:
        nb = nbformat.read(course_dir / "source" / chapter / f"{chapter}.ipynb", as_version=4)
        expected = [e["check"] for e in notebooks.load_manifest()[chapter]["exercises"]]
        meta = [c.metadata["nbgrader"] for c in nb.cells]
        tests = [m["grade_id"] for m in meta if m["grade"]]
        assert tests == [f"test_{name}" for name in expected]
        assert all(m["locked"] and m["points"] == 1 for m in meta if m["grade"])
        answers = [c for c in nb.cells if c.metadata["nbgrader"]["solution"]]
        assert answers and all(notebooks.BEGIN in c.source for c in answers)
        assert all(m["locked"] for m in meta if not m["solution"])  # everything else read-only
        for index, cell in enumerate(nb.cells):  # each test follows its check's call
            if cell.metadata["nbgrader"]["grade"]:
                name = cell.metadata["nbgrader"]["grade_id"].removeprefix("test_")
                assert f"check.{name}(" in nb.cells[index - 1].source


def test_an_existing_folder_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    assert main(["classroom", "export", "--format", "nbgrader", str(tmp_path)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    assert main(["classroom", "export", "--format", "nbgrader", "--chapters", "42", str(tmp_path / "new")]) == 2
    assert "'42' is not a chapter with exercises" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_an_installed_package_without_the_notebooks_is_told_to_use_a_clone(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(notebooks, "SOLUTIONS", tmp_path / "no-solutions")
    assert main(["classroom", "export", "--format", "github", str(tmp_path / "out")]) == 2
    assert "from a clone of the course repository" in capsys.readouterr().err and not (tmp_path / "out").exists()


# nbgrader's autograding is the same plumbing for every chapter (each chapter's marks are
# tests/test_grade.py's): one chapter, two notebook runs, keeps this test to about a minute.
@pytest.mark.parametrize("chapter", ["02_lora_from_scratch"])
def test_nbgrader_gives_a_solution_full_marks_and_the_release_copy_zero(course_dir, chapter, tiny_model_dir,
                                                                       tiny_adapters_dir):
    nbgrader(course_dir, "generate_assignment", chapter, "--force")
    release = course_dir / "release" / chapter / f"{chapter}.ipynb"
    # nbgrader's release copy has the very answer stubs of the course's student notebook (as `notebooks build` writes it).
    solution = nbformat.read(notebooks.SOLUTIONS / f"{chapter}.ipynb", as_version=4)
    student = notebooks.student_version(notebooks.normalised_solution(solution, f"{chapter}.ipynb"), f"{chapter}.ipynb")
    released = nbformat.read(release, as_version=4)
    stubs = [c.source for c in student.cells if "raise NotImplementedError()" in c.source]
    assert stubs and stubs == [c.source for c in released.cells if "raise NotImplementedError()" in c.source]

    for who, path in (("solution", course_dir / "source" / chapter / f"{chapter}.ipynb"), ("release", release)):
        (course_dir / "submitted" / who / chapter).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, course_dir / "submitted" / who / chapter / f"{chapter}.ipynb")
    nbgrader(course_dir, "autograde", chapter, "--create", "--force", COURSE_MODEL=str(tiny_model_dir),
             COURSE_ADAPTERS=str(tiny_adapters_dir))

    expected = notebooks.load_manifest()[chapter]["exercises"]
    with nbgrader_api.Gradebook(f"sqlite:///{course_dir / 'gradebook.db'}") as gradebook:
        solution = gradebook.find_submission(chapter, "solution")
        untouched = gradebook.find_submission(chapter, "release")
        assert solution.max_score == untouched.max_score == len(expected)
        assert (solution.score, untouched.score) == (len(expected), 0)

    nbgrader(course_dir, "generate_feedback", chapter, "--force")
    page = (course_dir / "feedback" / "release" / chapter / f"{chapter}.html").read_text(encoding="utf-8")
    feedback = html.unescape(re.sub(r"<[^>]+>", "", page))  # the traceback's text, without its colour spans
    for exercise in expected:
        assert (f"AssertionError: check.{exercise['check']}: not attempted. Replace `raise NotImplementedError` "
                "with your code") in feedback
