"""The course as an nbgrader course directory (``classroom export --format nbgrader DIR``).

``DIR/nbgrader_config.py`` and ``DIR/source/<chapter>/<chapter>.ipynb``, made from the solution
notebooks. In each one:

- an exercise's answer cell (it holds ``### BEGIN SOLUTION`` / ``### END SOLUTION``, nbgrader's own
  markers) is an nbgrader *solution* cell: ``nbgrader generate_assignment`` replaces each region by
  the same stub the course's student notebooks have;
- the cell that calls ``check.<name>(answer)`` is followed by a read-only, autograded *test* cell
  worth ``POINTS`` that runs the check again (``require``) and raises an ``AssertionError``
  carrying the check's message unless it passed, so the message reaches nbgrader's feedback;
- every other cell is locked (read-only; ``nbgrader autograde`` restores it from the source).

nbgrader runs the whole notebook in the learner's kernel, so the verdict is as trustworthy as that
kernel; ``python -m course grade`` judges in processes of its own (see ``course.grade``).
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat

from course.notebooks import BEGIN, SOLUTIONS, STUB, _require_sources, normalised_solution

#: Points per exercise.
POINTS = 1

CONFIG = f'''\
# nbgrader's configuration for the PEFT course (written by `python -m course classroom export`).
# Run nbgrader from this folder: nbgrader generate_assignment 02_lora_from_scratch, then
# nbgrader autograde 02_lora_from_scratch and nbgrader generate_feedback 02_lora_from_scratch.
c = get_config()  # noqa: F821 (nbgrader provides it)

c.CourseDirectory.course_id = "peft-course"
# The stub the course's own student notebooks have, at the region's indentation.
c.ClearSolutions.code_stub = {{"python": {json.dumps(chr(10).join(STUB))}}}
# Chapters load a model and train for a few minutes: seconds each cell may take while grading.
c.Execute.timeout = 1800
# nbclient waits for a cell's reply in one poll that can miss its wake-up and then sleeps until the
# limit above; the course's Execute polls again every few seconds (course/classroom/nbgrader_execute.py).
try:
    from course.classroom.nbgrader_execute import autograde_preprocessors
except ImportError:  # the course is not importable where nbgrader runs: nbgrader's own Execute
    pass
else:
    c.Autograde.autograde_preprocessors = autograde_preprocessors()
'''


def require(name: str, answer) -> None:
    """The autograded test cell: run ``check.<name>`` on ``answer``; raise ``AssertionError`` with
    the check's message unless it passed."""
    from course import check

    result = check.ALL[name].run(answer)
    if not result.passed:
        raise AssertionError(f"check.{name}: {result.status.replace('_', ' ')}. {result.message}")
    print(f"check.{name}: passed ({POINTS} point{'s' if POINTS != 1 else ''})")


def _meta(grade_id: str, *, solution=False, grade=False, locked=False, points=None) -> dict:
    meta = {"grade": grade, "grade_id": grade_id, "locked": locked, "schema_version": 3,
            "solution": solution, "task": False}
    if grade:
        meta["points"] = points
    return meta


def source_notebook(chapter: str) -> nbformat.NotebookNode:
    """The nbgrader source of one chapter: its solution notebook, outputs cleared, cells marked."""
    from course.notebooks import exercises

    _require_sources()
    nb = normalised_solution(nbformat.read(SOLUTIONS / f"{chapter}.ipynb", as_version=4), f"{chapter}.ipynb")
    expected = {e["check"]: e["answer"] for e in exercises(nb, chapter)}
    out = nbformat.v4.new_notebook(metadata=dict(nb.metadata))
    out.metadata["course"] = {"chapter": chapter}
    for key in ("widgets", "execution"):
        out.metadata.pop(key, None)
    seen: set[str] = set()
    for index, cell in enumerate(nb.cells):
        cell = nbformat.from_dict(json.loads(json.dumps(cell)))
        tags = cell.get("metadata", {}).get("tags")
        cell.metadata = {"tags": tags} if tags else {}
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.id = f"cell-{index:03d}"
        answer_cell = cell.cell_type == "code" and BEGIN in cell.source
        cell.metadata["nbgrader"] = _meta(f"{'answer' if answer_cell else 'cell'}-{index:03d}", solution=answer_cell,
                                          locked=not answer_cell)
        out.cells.append(cell)
        if cell.cell_type != "code":
            continue
        for name in [n for n in expected if n not in seen and f"check.{n}(" in cell.source]:
            seen.add(name)
            test = nbformat.v4.new_code_cell(
                f"# Autograded by nbgrader ({POINTS} point{'s' if POINTS != 1 else ''}, read-only): "
                f"check.{name} must pass.\nfrom course.classroom.nbgrader import require\n\n"
                f"require({name!r}, {expected[name]})")
            test.id = f"test-{name}".replace("_", "-")
            test.metadata["nbgrader"] = _meta(f"test_{name}", grade=True, locked=True, points=POINTS)
            out.cells.append(test)
    missing = [n for n in expected if n not in seen]
    if missing:  # pragma: no cover - exercises() found the calls in these very cells
        raise ValueError(f"{chapter}: no cell calls check.{missing[0]}")
    return out


def write(dest: Path, chapters: list[str]) -> list[Path]:
    """Write the course directory into the (new, empty) folder ``dest``; the files written."""
    written = [dest / "nbgrader_config.py"]
    written[0].write_text(CONFIG, encoding="utf-8")
    for chapter in chapters:
        path = dest / "source" / chapter / f"{chapter}.ipynb"
        path.parent.mkdir(parents=True)
        nbformat.write(source_notebook(chapter), path)
        written.append(path)
    return written
