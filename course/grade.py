"""Grading student notebooks: ``python -m course grade PATH... [--json] [--csv FILE] [--timeout S] [--quick]
[--assignment NN_name]``.

Nothing a notebook's kernel says is trusted, and every submission is sealed off. At start the
grader reads every submission into memory, picks the strongest sandbox the machine offers
(``course.grade_sandbox``: an unprivileged user, bubblewrap, or plainly off) and fingerprints the
installed package and the environment's start-up hooks (``course.grade_integrity``). For each
submission:

1. The package is verified against the fingerprint; a mismatch stops grading, naming the file.
2. The chapter: ``--assignment`` when given (a notebook that says it is another chapter gets an
   error row); else the notebook's metadata (``notebooks build`` writes it), its Colab badge and
   the checks its cells call, which must agree, else its file name. The exercises expected are that
   chapter's, from the manifest shipped in the package (``course/exercises.json``, read once at
   start). A chapter without exercises, a malformed notebook, metadata of the wrong type: an error
   row, no score.
3. A private copy of the notebook runs in a kernel inside the sandbox, under a time limit for the
   whole notebook (``--timeout``), only to report its cell errors. Every process it started is
   ended before anything else happens.
4. Each expected exercise is judged in a fresh process of the grader's inside the sandbox
   (``course.grade_worker``): the learner's imports, functions, classes and constants are taken
   from the notebook's code with ``ast``, the answer is evaluated among them and the check runs on
   it. The verdict comes back over a pipe, tagged with a token; its status is compared with the
   grader's own constants. A rebound name in the course's modules is tampering: the submission
   scores 0. An answer that is the course's own reference, or calls it, does not pass; code that
   reaches the course's reference modules, stack frames, ``gc``, ``ctypes`` or ``sys.modules`` is
   flagged for a human (``course.grade_flags``).

Every submission gets a row, also when it hangs, crashes, or is not a notebook at all. The
gradebook (``--csv``) and the JSON lines are written once, after every sandbox is gone.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from course.check.core import FAILED, NOT_ATTEMPTED, PASSED

#: Seconds a check's process may take on top of the check's own limit (starting Python, imports).
STARTUP_ALLOWANCE = 90.0
#: The largest notebook file read (bytes): a bigger one gets an error row (clear its outputs).
MAX_NOTEBOOK_BYTES = 64 << 20
PACKAGE = Path(__file__).resolve().parent
TAMPERED, MISSING = "tampered", "missing"
STATUSES = (PASSED, FAILED, NOT_ATTEMPTED, MISSING, TAMPERED)
_BADGE = re.compile(r"/blob/[^/]+/(?:notebooks|solutions)/([A-Za-z0-9_.\-]+)\.ipynb")
_CHECK_CALL = re.compile(r"\bcheck\.(\w+)")


@dataclass
class Report:
    """One submission's row: ``score`` is None when it could not be graded (see ``errors``);
    ``flagged``: why a human should read it ("" when nothing)."""

    notebook: str
    chapter: str | None
    score: float | None
    passed: int
    expected: int
    checks: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    flagged: str = ""


class GradeError(ValueError):
    """A submission that cannot be graded; the message says why and what to do."""


class PackageChanged(RuntimeError):
    """The installed course package (or a start-up hook) changed during grading: grading stops."""


def _manifest() -> dict[str, dict]:
    from course.notebooks import load_manifest

    return load_manifest()


def _claims(nb, manifest: dict) -> dict[str, str]:
    """What the notebook says it is: ``{"metadata": ch, "Colab badge": ch, "its cells": ch...}``."""
    course_meta = nb.metadata.get("course")
    if course_meta is not None and not isinstance(course_meta, dict):
        raise GradeError(f"its metadata `course` is a {type(course_meta).__name__}, not a mapping like "
                         '{"chapter": "02_lora_from_scratch"}: hand in the notebook the course gave you.')
    claimed = (course_meta or {}).get("chapter")
    if claimed is not None and not isinstance(claimed, str):
        raise GradeError(f"its metadata `course.chapter` is a {type(claimed).__name__}, not a chapter name: "
                         "hand in the notebook the course gave you.")
    claims = {"metadata": claimed} if claimed in manifest else {}
    for cell in nb.cells[:2]:
        match = _BADGE.search(cell.source)
        if match and match.group(1) in manifest:
            claims["Colab badge"] = match.group(1)
            break
    owner = {e["check"]: chapter for chapter, entry in manifest.items() for e in entry["exercises"]}
    called = sorted({owner[name] for cell in nb.cells if cell.cell_type == "code"
                     for name in _CHECK_CALL.findall(cell.source) if name in owner})
    if called:
        claims["its cells"] = " and ".join(called)
    return claims


def find_chapter(nb, path: Path, manifest: dict, assignment: str | None = None) -> str:
    """The chapter a notebook is graded as (see the module's docstring); a GradeError when it cannot be told."""
    claims = _claims(nb, manifest)
    said = ", ".join(f"its cells call checks of {chapter}" if where == "its cells" else f"its {where} says {chapter}"
                     for where, chapter in claims.items())
    if assignment is not None:
        if any(chapter != assignment for chapter in claims.values()):
            raise GradeError(f"{path.name} is not the assignment {assignment}: {said}. Hand in the {assignment} notebook.")
        return assignment
    if len(set(claims.values())) > 1:
        raise GradeError(f"{path.name} disagrees with itself: {said}. Hand in the notebook the course gave you, "
                         "or grade with --assignment NN_name.")
    if claims:
        return next(iter(claims.values()))
    if path.stem in manifest:
        return path.stem
    raise GradeError(
        f"Cannot tell which chapter {path.name} is: neither its metadata, its Colab badge, its checks nor its "
        f"file name names a chapter ({', '.join(sorted(manifest))}). Hand in the notebook the course gave you "
        "(its metadata says which chapter it is), name the file after it, or grade with --assignment NN_name."
    )


def resolve_assignment(assignment: str, manifest: dict | None = None) -> str:
    """The chapter with exercises that ``assignment`` names: its full name ("02_lora_from_scratch") or
    its number ("02"); else a GradeError listing the choices."""
    manifest = _manifest() if manifest is None else manifest
    graded = sorted(c for c in manifest if manifest[c].get("exercises"))
    found = [c for c in graded if assignment in (c, c.split("_", 1)[0])]
    if len(found) != 1:
        raise GradeError(f"--assignment {assignment!r} is not a chapter with exercises: use one of "
                         f"{', '.join(graded)} (or its number, such as 02).")
    return found[0]


def read_notebook(path: Path):
    """The notebook at ``path``, validated enough to grade; else a GradeError saying what is wrong."""
    return _parse(path, _load(path))


def _parse(path: Path, data: bytes):
    """The notebook in ``data`` (read from ``path``), validated enough to grade; else a GradeError."""
    import nbformat

    if len(data) > MAX_NOTEBOOK_BYTES:
        raise GradeError(f"{path.name} is {len(data) >> 20} MiB, more than the {MAX_NOTEBOOK_BYTES >> 20} MiB the "
                         "grader reads: clear its outputs (Edit > Clear Outputs of All Cells) and hand it in again.")
    if b"\0" in data:
        raise GradeError(f"{path.name} is not a readable notebook: it holds NUL bytes (a binary file?).")
    try:
        nb = nbformat.reads(data.decode("utf-8"), as_version=4)
        if not isinstance(nb.get("metadata"), dict) or not isinstance(nb.get("cells"), list):
            raise ValueError("no metadata or cells")
        for cell in nb.cells:
            if not isinstance(cell, dict) or not isinstance(cell.get("source"), str) or "cell_type" not in cell:
                raise ValueError("a cell without a text source")
    except Exception as exc:  # not JSON, not a notebook, wrong encoding, wrong types: one row, no crash
        detail = str(exc).splitlines()[0] if str(exc) else "no detail"
        raise GradeError(f"{path.name} is not a readable notebook ({type(exc).__name__}: {detail[:200]}).") from None
    return nb


def _load(path: Path) -> bytes:
    if not path.is_file():
        raise GradeError(f"{path}: no such file")
    if path.stat().st_size > MAX_NOTEBOOK_BYTES:
        return b" " * (MAX_NOTEBOOK_BYTES + 1)  # _parse reports it; never read a huge file
    return path.read_bytes()


def _environment(quick: bool) -> dict:
    from course.models import cache_dir

    env = {k: v for k, v in os.environ.items() if k not in ("COURSE_CHECK_LOG", "COURSE_STRICT_CHECKS")}
    env.update({"MPLBACKEND": "agg", "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
                "COURSE_CACHE": str(cache_dir()),  # HOME changes in the sandbox; the model stays where it is
                "HF_HOME": env.get("HF_HOME", str(Path.home() / ".cache" / "huggingface")),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE.parent), env.get("PYTHONPATH")]))})
    if quick:
        env["COURSE_QUICK"] = "1"
    return env


def _share_model_cache() -> None:
    """Older conversions left ``model.safetensors`` 0600: the sandbox user must read it."""
    from course.models import _readable_by_all, embedded_model_dir

    if embedded_model_dir().is_dir():
        _readable_by_all(embedded_model_dir())


def _sandbox(timeout: float):
    from course.grade_sandbox import Limits, Sandbox, detect

    return Sandbox(detect(str(PACKAGE.parent)), Limits.for_timeout(timeout))


def execute(path: Path, timeout: float, quick: bool, sandbox=None, data: bytes | None = None) -> tuple[list[str], float]:
    """Run a private copy of the notebook in a kernel inside ``sandbox`` within ``timeout`` seconds;
    its cell errors and seconds. Every process it started is gone when this returns."""
    own = sandbox is None
    sandbox = sandbox or _sandbox(timeout)
    try:
        copy, report = sandbox.work / "submission.ipynb", sandbox.work / "report.json"
        copy.write_bytes(Path(path).read_bytes() if data is None else data)
        if sandbox.mode.kind == "user":
            os.chown(copy, sandbox.uid, sandbox.gid)
        start = time.perf_counter()
        process = sandbox.popen([sys.executable, "-m", "course.grade_worker", "execute", str(copy), str(report)],
                                env=sandbox.environment(_environment(quick)), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            sandbox.stop(process)
            return [f"the notebook did not finish within {timeout:g} s: its kernel was stopped"], timeout
        sandbox.stop(process)
        try:
            result = json.loads(report.read_text())
            return [str(e) for e in result["errors"]][:50], float(result["seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            last = stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            return [f"the notebook could not be run: {last[0]}"], time.perf_counter() - start
    finally:
        if own:
            sandbox.close()


def judge(definitions, exercise: dict, *, quick: bool = False, limit: float | None = None, sandbox=None) -> dict:
    """Run one exercise's check on the learner's definitions in a fresh process inside ``sandbox``; the verdict.

    ``limit``: seconds before the process is killed (default: the check's own limit plus
    ``STARTUP_ALLOWANCE``). Every process it started is gone when this returns.
    """
    from course import check as checks

    name = exercise["check"]
    if limit is None:
        limit = (checks.ALL[name].timeout if name in checks.ALL else 120.0) + STARTUP_ALLOWANCE
    spec = {"check": name, "answer": exercise["answer"], "cells": definitions.cells,
            "problems": definitions.problems}
    token = secrets.token_hex(16)
    own = sandbox is None
    sandbox = sandbox or _sandbox(limit)
    read_end, write_end = os.pipe()
    try:
        process = sandbox.popen([sys.executable, "-m", "course.grade_worker", "check", str(write_end)],
                                env=sandbox.environment(_environment(quick)), stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(write_end,))
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            try:
                _, stderr = process.communicate(input=(token + "\n" + json.dumps(spec) + "\n").encode(), timeout=limit)
            except subprocess.TimeoutExpired:
                sandbox.stop(process)
                return {"check": name, "status": FAILED,
                        "message": f"Your answer ran for more than {limit:g} s, too slow: look for a loop that never ends."}
            sandbox.stop(process)
            lines = pipe.read().decode("utf-8", errors="replace").splitlines()
    finally:
        if own:
            sandbox.close()
    verdicts = [v for v in map(_json_or_none, lines) if isinstance(v, dict) and v.get("token") == token]
    if not verdicts:
        tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit code {process.returncode}"]
        return {"check": name, "status": FAILED, "message": f"The check's process ended without a verdict: {tail[0]}"}
    verdict = verdicts[-1]
    status = next((s for s in STATUSES if s == verdict.get("status")), None)  # the grader's own constants
    if status is None:
        return {"check": name, "status": FAILED, "message": f"The check's process sent an unknown status "
                f"{str(verdict.get('status'))[:40]!r}: not graded."}
    return {"check": name, "status": status, "message": str(verdict.get("message", "")),
            "definition_errors": [str(e) for e in verdict.get("errors", [])]}


def _json_or_none(line: str):
    try:
        return json.loads(line)
    except ValueError:
        return None


def grade(path, *, quick: bool = False, timeout: float = 900, run: bool = True, assignment: str | None = None,
          data: bytes | None = None, manifest: dict | None = None) -> Report:
    """Grade one submission in a sandbox of its own; never raises for a bad submission (the report says
    what went wrong). ``data``: the file's bytes, read before grading started (default: read now)."""
    path = Path(path)
    start = time.perf_counter()
    manifest = _manifest() if manifest is None else manifest
    try:
        nb = _parse(path, _load(path) if data is None else data)
        if assignment is not None:
            assignment = resolve_assignment(assignment, manifest)
        chapter = find_chapter(nb, path, manifest, assignment)
        expected = manifest[chapter]["exercises"]
        if not expected:
            raise GradeError(f"chapter {chapter} has no exercises: there is nothing to grade in {path.name}.")
    except GradeError as exc:
        return Report(str(path), None, None, 0, 0, [], [str(exc)], round(time.perf_counter() - start, 1))
    sandbox = _sandbox(timeout)
    try:
        return _grade_in(sandbox, path, nb, chapter, expected, quick=quick, timeout=timeout, run=run, start=start,
                         data=data)
    finally:
        sandbox.close()


def _grade_in(sandbox, path, nb, chapter, expected, *, quick, timeout, run, start, data) -> Report:
    from course.definitions import extract
    from course.grade_flags import flags

    errors = execute(path, timeout, quick, sandbox, data)[0] if run else []
    definitions = extract(nb)
    checks = [judge(definitions, exercise, quick=quick, sandbox=sandbox) for exercise in expected]
    for verdict in checks:
        for problem in verdict.pop("definition_errors", []):
            line = f"while loading your definitions: {problem}"
            if line not in errors:
                errors.append(line)
    sources = [source for _, source in definitions.cells]
    # An answer may build on the chapter's other exercises (05's layer on its GenerateParams): what any of the
    # chapter's own solutions takes from the course is part of the chapter, not a reach into its internals.
    given = "\n\n\n".join(e.get("solution", "") for e in expected)
    flagged = [f for e in expected for f in flags(sources, e["answer"], given)]
    tampered = [c for c in checks if c["status"] == TAMPERED]
    if tampered:
        flagged.insert(0, "tampering: " + tampered[0]["message"])
    passed = 0 if tampered else sum(c["status"] == PASSED for c in checks)
    return Report(str(path), chapter, round(passed / len(expected), 4), passed, len(expected), checks, errors,
                  round(time.perf_counter() - start, 1), " | ".join(dict.fromkeys(flagged)))


def submissions(paths) -> list[Path]:
    """Notebook files from files and folders (a folder: every ``*.ipynb`` below it, sorted)."""
    found: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
        else:
            found.append(item)
    return found


def grade_many(paths, *, as_json: bool = False, csv_path=None, quick: bool = False, timeout: float = 900,
               run: bool = True, assignment: str | None = None) -> int:
    """Grade every submission with a progress bar; print a report each, then (once every sandbox is gone)
    the JSON lines (``as_json``) and the gradebook (``csv_path``), written atomically. Exit 0; 2 when some
    submission could not be graded; 3 when grading stopped (the package changed), with no gradebook."""
    from tqdm.auto import tqdm

    from course.files import atomic_write
    from course.grade_integrity import changed_file, fingerprint
    from course.grade_report import gradebook, print_report
    from course.grade_sandbox import Limits, SandboxError, detect

    manifest = _manifest()
    if assignment is not None:
        try:
            assignment = resolve_assignment(assignment, manifest)
        except GradeError as exc:
            print(exc, file=sys.stderr)
            return 2
    found = submissions(paths)
    contents = {}
    for path in found:  # read every hand-in before any runs: none can change another's
        try:
            contents[path] = _load(path)
        except (GradeError, OSError):
            contents[path] = None
    mode = detect(str(PACKAGE.parent))
    if mode.kind == "user":
        _share_model_cache()
    print(mode.describe(Limits.for_timeout(timeout)), file=sys.stderr)
    before, reports = fingerprint(PACKAGE), []
    try:
        for path in tqdm(found, desc="grading", unit="notebook", file=sys.stderr):
            changed = changed_file(before, PACKAGE)
            if changed:
                raise PackageChanged(f"{changed} since grading started (before grading {path}).")
            try:
                report = grade(path, quick=quick, timeout=timeout, run=run, assignment=assignment,
                               data=contents[path], manifest=manifest)
            except (PackageChanged, SandboxError):
                raise
            except Exception as exc:  # a bug of the grader's on one strange file: that file's row, the rest goes on
                report = Report(str(path), None, None, 0, 0, [], [f"the grader failed on this file: "
                                                                 f"{type(exc).__name__}: {exc}"])
            reports.append(report)
            if not as_json:
                tqdm.write("", file=sys.stdout)
                print_report(report, sys.stdout)
        changed = changed_file(before, PACKAGE)
        if changed:
            raise PackageChanged(f"{changed} since grading started (after the last submission).")
    except PackageChanged as exc:
        print(f"Grading stopped, no gradebook written: {exc} Reinstall the course package and grade again.",
              file=sys.stderr)
        return 3
    except SandboxError as exc:
        print(f"Grading stopped, no gradebook written: {exc} End them (or restart the machine) and grade again.",
              file=sys.stderr)
        return 3
    if as_json:
        sys.stdout.write("".join(json.dumps(asdict(r)) + "\n" for r in reports))
        sys.stdout.flush()
    if csv_path:
        atomic_write(csv_path, gradebook(reports, manifest))
        print(f"gradebook: {csv_path} ({len(reports)} rows)", file=sys.stderr)
    return 2 if any(r.score is None for r in reports) or not reports else 0
