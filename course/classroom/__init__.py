"""The course in the classroom tools instructors already run:
``python -m course classroom export --format nbgrader|gradescope|github [--chapters 02,03] DIR``.

- ``course.classroom.nbgrader``: an nbgrader course directory (``nbgrader_config.py``,
  ``source/<chapter>/<chapter>.ipynb``), answer cells as solution cells, each followed by a
  read-only autograded test cell that runs the chapter's check;
- ``course.classroom.gradescope``: ``autograder.zip`` (``setup.sh``, ``run_autograder``), which
  grades with ``python -m course grade --assignment NN --json`` and writes Gradescope's
  ``results.json``;
- ``course.classroom.github``: a GitHub Classroom starter repository, its
  ``.github/workflows/classroom.yml`` giving one autograding step per exercise.

Every export is written into a new folder, claimed first and moved into place when complete:
an existing ``DIR`` is never overwritten.
"""

from __future__ import annotations

from pathlib import Path

FORMATS = ("nbgrader", "gradescope", "github")


class ClassroomError(ValueError):
    """An export that cannot be made; the message says what to do."""


def chapters_with_exercises(wanted: str | None = None) -> list[str]:
    """Chapters to export: all with exercises, or those named in ``wanted`` ("02,03" or full names)."""
    from course.grade import GradeError, resolve_assignment
    from course.notebooks import load_manifest

    manifest = {name: entry for name, entry in load_manifest().items() if entry["exercises"]}
    if not wanted:
        return sorted(manifest)
    chosen = []
    for item in (part.strip() for part in wanted.split(",") if part.strip()):
        try:
            name = resolve_assignment(item, manifest)
        except GradeError:
            raise ClassroomError(f"--chapters: {item!r} is not a chapter with exercises; choose among "
                                 f"{', '.join(sorted(manifest))} (or their numbers, such as 02).") from None
        if name not in chosen:
            chosen.append(name)
    return chosen


def claim(dest) -> Path:
    """``dest`` as a new folder's path: refused when something is already there."""
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ClassroomError(f"{dest} already exists and is not empty: export into a new folder "
                             "(nothing is overwritten), or remove it first.")
    return dest


def export(fmt: str, dest, chapters: str | None = None) -> list[Path]:
    """Export ``chapters`` (see ``chapters_with_exercises``) in format ``fmt`` into the new folder ``dest``;
    return the main files written."""
    if fmt not in FORMATS:
        raise ClassroomError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    from course import notebooks

    if not notebooks.SOLUTIONS.is_dir() or not notebooks.NOTEBOOKS.is_dir():
        raise ClassroomError(f"{notebooks.SOLUTIONS} not found: run `classroom export` from a clone of the course "
                             "repository (it reads solutions/ and notebooks/, which an installed package lacks).")
    dest = claim(dest)
    names = chapters_with_exercises(chapters)
    from course.files import atomic_directory

    if fmt == "nbgrader":
        from course.classroom.nbgrader import write
    elif fmt == "gradescope":
        from course.classroom.gradescope import write
    else:
        from course.classroom.github import write
    with atomic_directory(dest) as tmp:
        written = write(tmp, names)
    return [dest / path.relative_to(tmp) for path in written]
