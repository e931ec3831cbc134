"""Grading student notebooks: ``python -m course grade PATH... [--json] [--csv FILE] [--timeout S] [--quick]
[--assignment NN_name]``.

Nothing a notebook's kernel says is trusted. For each submission:

1. The chapter is found from the notebook's metadata (``notebooks build`` writes it), else from
   its Colab badge, else from its file name; the exercises expected are that chapter's, from the
   manifest shipped in the package (``course/exercises.json``), so grading needs no
   ``solutions/`` folder. A notebook whose chapter cannot be found gets an error row, no score.
   With ``--assignment`` every file is graded as that chapter, and a notebook that says it is
   another chapter gets an error row.
2. The notebook runs in a kernel of its own, under a time limit for the whole notebook
   (``--timeout``; the kernel is killed when it runs out), only to report its cell errors.
3. Each expected exercise is judged in a fresh Python process of the grader's
   (``course.grade_worker``): the learner's imports, functions, classes and constants are taken
   from the notebook's code with ``ast``, the answer is evaluated among them and the check runs
   on it under a process time limit. The verdict comes back over a pipe of the grader's.
   An answer that is the course's own reference, or calls it, does not pass.

Every submission gets a row, also when it hangs, crashes, or is not a notebook at all.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from course.files import atomic_write

#: Seconds a check's process may take on top of the check's own limit (starting Python, imports).
STARTUP_ALLOWANCE = 90.0
_BADGE = re.compile(r"/blob/[^/]+/(?:notebooks|solutions)/([A-Za-z0-9_.\-]+)\.ipynb")


@dataclass
class Report:
    """One submission's row: ``score`` is None when it could not be graded (see ``errors``)."""

    notebook: str
    chapter: str | None
    score: float | None
    passed: int
    expected: int
    checks: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


class GradeError(ValueError):
    """A submission that cannot be graded; the message says why and what to do."""


def _manifest() -> dict[str, dict]:
    from course.notebooks import load_manifest

    return load_manifest()


def find_chapter(nb, path: Path, manifest: dict) -> str:
    """The chapter a notebook belongs to: its metadata, else its Colab badge, else its file name."""
    claimed = (nb.get("metadata", {}).get("course") or {}).get("chapter")
    if claimed in manifest:
        return claimed
    for cell in nb.get("cells", [])[:2]:
        match = _BADGE.search(cell.get("source", ""))
        if match and match.group(1) in manifest:
            return match.group(1)
    if path.stem in manifest:
        return path.stem
    raise GradeError(
        f"Cannot tell which chapter {path.name} is: its metadata names {claimed!r}, and neither its "
        f"Colab badge nor its file name matches a chapter ({', '.join(sorted(manifest))}). Hand in the "
        "notebook the course gave you (its metadata says which chapter it is), or name the file after it."
    )


def resolve_assignment(assignment: str, manifest: dict | None = None) -> str:
    """The chapter ``assignment`` names: its full name ("02_lora_from_scratch") or its number ("02")."""
    manifest = _manifest() if manifest is None else manifest
    if assignment in manifest:
        return assignment
    found = [name for name in manifest if name.split("_", 1)[0] == assignment]
    if len(found) == 1:
        return found[0]
    raise GradeError(f"--assignment {assignment!r} is not a chapter with exercises: use one of "
                     f"{', '.join(sorted(manifest))} (or its number, such as 02).")


def _assigned_chapter(nb, path: Path, manifest: dict, assignment: str) -> str:
    try:
        found = find_chapter(nb, path, manifest)
    except GradeError:  # nothing says which chapter it is: it is the assignment's
        return assignment
    if found != assignment:
        raise GradeError(f"{path.name} is chapter {found}'s notebook, but this assignment is {assignment}: "
                         f"hand in the notebook of {assignment}.")
    return found


def _read(path: Path):
    import nbformat

    if not path.is_file():
        raise GradeError(f"{path}: no such file")
    try:
        return nbformat.read(path, as_version=4)
    except Exception as exc:  # not JSON, not a notebook, wrong encoding: one row, no crash
        raise GradeError(f"{path.name} is not a readable notebook ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}).") from None


def _stop(process: subprocess.Popen, pidfile: Path) -> None:
    """Kill a worker's whole process group, and the kernel it started (a session of its own)."""
    for pid in (pidfile.read_text().strip() if pidfile.is_file() else "", str(process.pid)):
        if pid.isdigit():
            try:
                os.killpg(int(pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    process.wait()


def _environment(quick: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("COURSE_CHECK_LOG", "COURSE_STRICT_CHECKS")}
    env.update({"MPLBACKEND": "agg", "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                            env.get("PYTHONPATH")]))})
    if quick:
        env["COURSE_QUICK"] = "1"
    return env


def execute(path: Path, timeout: float, quick: bool) -> tuple[list[str], float]:
    """Run the notebook in a kernel of its own within ``timeout`` seconds; its cell errors and seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        report, pidfile = Path(tmp) / "report.json", Path(tmp) / "kernel.pid"
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "course.grade_worker", "execute", str(path), str(report),
                                    str(pidfile)], env=_environment(quick), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(process, pidfile)
            return [f"the notebook did not finish within {timeout:g} s: its kernel was stopped"], timeout
        if not report.is_file():
            last = stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            return [f"the notebook could not be run: {last[0]}"], time.perf_counter() - start
        result = json.loads(report.read_text())
        return result["errors"], result["seconds"]


def judge(definitions, exercise: dict, *, quick: bool = False, limit: float | None = None) -> dict:
    """Run one exercise's check on the learner's definitions in a fresh process; the verdict.

    ``limit``: seconds before the process is killed (default: the check's own limit plus
    ``STARTUP_ALLOWANCE``).
    """
    from course import check as checks

    name = exercise["check"]
    if limit is None:
        limit = (checks.ALL[name].timeout if name in checks.ALL else 120.0) + STARTUP_ALLOWANCE
    spec = {"check": name, "answer": exercise["answer"], "cells": definitions.cells,
            "problems": definitions.problems}
    token = secrets.token_hex(16)
    read_end, write_end = os.pipe()
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, pidfile = Path(tmp) / "spec.json", Path(tmp) / "none.pid"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        process = subprocess.Popen([sys.executable, "-m", "course.grade_worker", "check", str(spec_path),
                                    str(write_end)], env=_environment(quick), cwd=tmp, stdin=subprocess.PIPE,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(write_end,),
                                   start_new_session=True)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            try:
                _, stderr = process.communicate(input=(token + "\n").encode(), timeout=limit)
            except subprocess.TimeoutExpired:
                _stop(process, pidfile)
                return {"check": name, "status": "failed",
                        "message": f"Your answer ran for more than {limit:g} s, too slow: look for a loop that never ends."}
            lines = pipe.read().decode("utf-8", errors="replace").splitlines()
    verdicts = [v for v in map(_json_or_none, lines) if isinstance(v, dict) and v.get("token") == token]
    if not verdicts:
        tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit code {process.returncode}"]
        return {"check": name, "status": "failed", "message": f"The check's process ended without a verdict: {tail[0]}"}
    verdict = verdicts[-1]
    return {"check": name, "status": verdict["status"], "message": verdict.get("message", ""),
            "definition_errors": verdict.get("errors", [])}


def _json_or_none(line: str):
    try:
        return json.loads(line)
    except ValueError:
        return None


def grade(path, *, quick: bool = False, timeout: float = 900, run: bool = True,
          assignment: str | None = None) -> Report:
    """Grade one submission; never raises for a bad submission (the report says what went wrong).

    ``assignment``: a chapter (see ``resolve_assignment``) to grade the file as."""
    from course.definitions import extract

    path = Path(path)
    start = time.perf_counter()
    manifest = _manifest()
    try:
        nb = _read(path)
        if assignment is None:
            chapter = find_chapter(nb, path, manifest)
        else:
            chapter = _assigned_chapter(nb, path, manifest, resolve_assignment(assignment, manifest))
    except GradeError as exc:
        return Report(str(path), None, None, 0, 0, [], [str(exc)], round(time.perf_counter() - start, 1))
    expected = manifest[chapter]["exercises"]
    errors = execute(path, timeout, quick)[0] if run else []
    definitions = extract(nb)
    checks = [judge(definitions, exercise, quick=quick) for exercise in expected]
    for verdict in checks:
        for problem in verdict.pop("definition_errors", []):
            line = f"while loading your definitions: {problem}"
            if line not in errors:
                errors.append(line)
    passed = sum(c["status"] == "passed" for c in checks)
    score = passed / len(expected) if expected else 1.0
    return Report(str(path), chapter, round(score, 4), passed, len(expected), checks, errors,
                  round(time.perf_counter() - start, 1))


def submissions(paths) -> list[Path]:
    """Notebook files from files and folders (a folder: every ``*.ipynb`` below it, sorted)."""
    found: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
        else:
            found.append(item)
    return found


def gradebook(reports: list[Report]) -> str:
    """CSV text: one row per submission, one column per exercise (its status), in the manifest's order."""
    manifest = _manifest()
    order = [e["check"] for chapter in manifest.values() for e in chapter["exercises"]]
    seen = {c["check"] for r in reports for c in r.checks}
    columns = [name for name in order if name in seen]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["notebook", "chapter", "score", "passed", "expected", *columns, "errors"])
    for r in reports:
        statuses = {c["check"]: c["status"] for c in r.checks}
        writer.writerow([r.notebook, r.chapter or "", "" if r.score is None else f"{r.score:.4g}", r.passed,
                         r.expected, *[statuses.get(name, "") for name in columns], " | ".join(r.errors)])
    return out.getvalue()


def _print_report(report: Report, out) -> None:
    score = "not graded" if report.score is None else f"{report.passed}/{report.expected} ({report.score:.0%})"
    print(f"{report.notebook}  [{report.chapter or '?'}]  {score}  {report.seconds:.0f} s", file=out)
    for c in report.checks:
        first = c["message"].splitlines()[0] if c["message"] else ""
        print(f"  {c['status']:14s} {c['check']:24s} {first}", file=out)
    for error in report.errors:
        print(f"  error: {error}", file=out)


def grade_many(paths, *, as_json: bool = False, csv_path=None, quick: bool = False, timeout: float = 900,
               run: bool = True, assignment: str | None = None) -> int:
    """Grade every submission with a progress bar; print a report each (JSON lines with ``as_json``),
    write the gradebook to ``csv_path``. Exit 0, or 2 when some submission could not be graded."""
    from tqdm.auto import tqdm

    if assignment is not None:
        try:
            assignment = resolve_assignment(assignment)
        except GradeError as exc:
            print(exc, file=sys.stderr)
            return 2
    reports = []
    for path in tqdm(submissions(paths), desc="grading", unit="notebook", file=sys.stderr):
        report = grade(path, quick=quick, timeout=timeout, run=run, assignment=assignment)
        reports.append(report)
        if as_json:
            print(json.dumps(asdict(report)), flush=True)
        else:
            tqdm.write("", file=sys.stdout)
            _print_report(report, sys.stdout)
    if csv_path:
        atomic_write(csv_path, gradebook(reports))
        print(f"gradebook: {csv_path} ({len(reports)} rows)", file=sys.stderr)
    return 2 if any(r.score is None for r in reports) or not reports else 0
