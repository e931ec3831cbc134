"""Student notebooks from solution notebooks, and headless execution.

``solutions/`` is the source of truth. ``build`` writes ``notebooks/`` from it:
each region between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` (nbgrader's
markers, kept in the source text because Colab rewrites cell metadata) becomes
``# YOUR CODE HERE`` and ``raise NotImplementedError()`` at the same indentation;
outputs are cleared, ``# NBVAL_CHECK_OUTPUT`` test markers dropped, metadata
normalised (kernelspec ``python3``, no local paths, the chapter's name) and cell ids
made stable, so that building twice writes the same bytes. ``build`` also brings the
solutions' shared cells up to date (badge and set-up cell from ``course.REPO``, images
embedded as attachments) and writes the exercise manifest ``course/exercises.json``.
``check`` reports what ``build`` would change.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

import nbformat

import course
from course.files import atomic_write
from course.notebook_outputs import output_problems, static_widget_text  # noqa: F401  (re-exported)

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = ROOT / "solutions"
NOTEBOOKS = ROOT / "notebooks"
IMAGES = ROOT / "images"
#: The exercises of every chapter, generated from solutions/ by ``build``: the grader reads it,
#: so grading works from an installed package with no solutions/ beside it.
MANIFEST = Path(__file__).resolve().parent / "exercises.json"

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
STUB = ["# YOUR CODE HERE", "raise NotImplementedError()"]
CHECK_OUTPUT = "# NBVAL_CHECK_OUTPUT"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
_CHECK_CALL = re.compile(r"\bcheck\.([a-z_][a-z0-9_]*)\(")


_ATTACHMENT = re.compile(r"\(attachment:([A-Za-z0-9_.\-]+)\)")


def badge(name: str, folder: str = "solutions") -> str:
    """The "Open in Colab" badge of a notebook, for the repository in ``course.REPO``."""
    return ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"(https://colab.research.google.com/github/{course.REPO}/blob/main/{folder}/{name})")


def setup_source() -> str:
    """The set-up cell (cell 1) of every notebook, for the repository in ``course.REPO``."""
    return f"""\
# Set-up. On Colab this installs the course; elsewhere `make lab` already did.
# `import course` comes first: it quiets library warnings that a learner cannot act on.
import sys

if "google.colab" in sys.modules:
    import subprocess

    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "git+https://github.com/{course.REPO}"], check=True)

import course"""


class NotebookError(ValueError):
    """A solution notebook is malformed (unbalanced solution markers, say)."""


def _require_sources() -> None:
    if not SOLUTIONS.is_dir():
        raise NotebookError(
            f"{SOLUTIONS} not found: run this from a clone of the course repository "
            "(an installed `course` package carries no notebooks)."
        )


def strip_solutions(source: str, where: str = "") -> str:
    """Replace each solution region by a stub at the region's indentation."""
    out: list[str] = []
    inside = False
    for number, line in enumerate(source.split("\n"), 1):
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise NotebookError(f"{where} line {number}: {BEGIN} inside another solution region")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out += [indent + s for s in STUB]
        elif stripped == END:
            if not inside:
                raise NotebookError(f"{where} line {number}: {END} without {BEGIN}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise NotebookError(f"{where}: {BEGIN} is never closed by {END}")
    return "\n".join(out)


def chapter_of(path) -> str:
    """A chapter's name: its solution notebook's file name without ``.ipynb`` ("02_lora_from_scratch")."""
    return Path(path).stem


def _attachments(source: str, where: str) -> dict:
    """The images a markdown cell shows as ``attachment:NAME``, read from ``images/NAME``."""
    found = {}
    for name in _ATTACHMENT.findall(source):
        path = IMAGES / name
        if not path.is_file():
            raise NotebookError(f"{where}: attachment:{name} needs the file images/{name}")
        mime = {".png": "image/png", ".jpg": "image/jpeg", ".svg": "image/svg+xml"}.get(path.suffix, "image/png")
        found[name] = {mime: base64.b64encode(path.read_bytes()).decode("ascii")}
    return found


def normalised_solution(nb: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    """A solution notebook with its shared parts brought up to date (a copy; outputs untouched).

    The badge (first line of cell 0) and the set-up cell (cell 1) come from ``course.REPO``,
    so that one setting moves every badge and install command; images referenced as
    ``attachment:NAME`` are embedded from ``images/NAME``, so that they show on Colab,
    GitHub and JupyterLab alike, with the notebook alone.
    """
    nb = nbformat.from_dict(json.loads(json.dumps(nb)))  # a deep copy
    if len(nb.cells) < 2 or nb.cells[0].cell_type != "markdown" or nb.cells[1].cell_type != "code":
        raise NotebookError(f"{name}: cell 0 must be the markdown title with the Colab badge and cell 1 "
                            "the set-up code cell (see CONTRIBUTING.md).")
    first, _, rest = nb.cells[0].source.partition("\n")
    if "colab.research.google.com" not in first:
        raise NotebookError(f"{name}: the first line of cell 0 must be the Colab badge.")
    nb.cells[0].source = badge(name) + ("\n" + rest if rest else "")
    nb.cells[1].source = setup_source()
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            attachments = _attachments(cell.source, f"{name} cell {index}")
            if attachments:
                cell["attachments"] = attachments
            else:
                cell.pop("attachments", None)
    return nb


def student_version(nb: nbformat.NotebookNode, name: str = "notebook") -> nbformat.NotebookNode:
    """The student copy of a solution notebook (a new object; ``nb`` is not changed).

    Its metadata names the chapter (``{"course": {"chapter": ...}}``), so that the grader
    knows which exercises to expect even when the file is renamed.
    """
    student = nbformat.v4.new_notebook()
    student.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"},
                        "course": {"chapter": chapter_of(name)}}
    for index, cell in enumerate(nb.cells):
        source = cell.source
        if cell.cell_type == "code":
            source = strip_solutions(source, f"{name} cell {index}")
            source = "\n".join(line for line in source.split("\n") if line.strip() != CHECK_OUTPUT)
            new = nbformat.v4.new_code_cell(source)
        elif cell.cell_type == "markdown":
            new = nbformat.v4.new_markdown_cell(source.replace("/blob/main/solutions/", "/blob/main/notebooks/"))
            if cell.get("attachments"):
                new["attachments"] = cell["attachments"]
        else:
            new = nbformat.v4.new_raw_cell(source)
        tags = cell.get("metadata", {}).get("tags")
        new.metadata = {"tags": list(tags)} if tags else {}
        new.id = f"cell-{index:03d}"
        student.cells.append(new)
    return student


def dumps(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb, version=4) + "\n"


def solution_paths() -> list[Path]:
    _require_sources()
    return sorted(SOLUTIONS.glob("*.ipynb"))


def _answer_expression(call: ast.Call, where: str) -> str:
    if len(call.args) != 1 or call.keywords:
        raise NotebookError(f"{where}: a check takes exactly one argument, the answer (check.name(answer)).")
    return ast.unparse(call.args[0])


def exercises(nb: nbformat.NotebookNode, name: str = "notebook") -> list[dict]:
    """The exercises a solution notebook checks: ``[{"check", "answer", "solution"}, ...]``.

    ``answer`` is the expression passed to the check (``LoRALinear``, ``GenerateParams.apply``):
    the grader evaluates it among the learner's own definitions. ``solution`` is the code cell
    of the exercise with its markers removed: what ``check.<name>.solution()`` shows.
    """
    found: list[dict] = []
    answer_cell = None  # the last code cell with a solution region: the exercise the next check judges
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and BEGIN in cell.source:
            answer_cell = cell.source
        if cell.cell_type != "code" or not _CHECK_CALL.search(cell.source):
            continue
        try:
            tree = ast.parse(_python_only(cell.source))
        except SyntaxError as exc:
            raise NotebookError(f"{name} cell {index}: {exc}") from None
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "check"):
                answer = _answer_expression(node, f"{name} cell {index}")
                if all(e["check"] != node.func.attr for e in found):
                    solution = "\n".join(line for line in (answer_cell or "").split("\n")
                                         if line.strip() not in (BEGIN, END))
                    found.append({"check": node.func.attr, "answer": answer, "solution": solution})
    return found


def _python_only(source: str) -> str:
    """Cell source with IPython's ``%magic`` and ``!shell`` lines blanked, for ``ast``."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.split("\n"))


def expected_files() -> dict[Path, str]:
    """What ``build`` writes: solutions (normalised), student notebooks and the manifest; path -> text."""
    files: dict[Path, str] = {}
    manifest: dict[str, dict] = {}
    for path in solution_paths():
        solution = normalised_solution(nbformat.read(path, as_version=4), path.name)
        files[path] = dumps(solution)
        files[NOTEBOOKS / path.name] = dumps(student_version(solution, path.name))
        title = next((line.lstrip("# ").strip() for line in solution.cells[0].source.splitlines()
                      if line.startswith("# ")), path.stem)
        manifest[chapter_of(path)] = {"title": title, "exercises": exercises(solution, path.name)}
    files[MANIFEST] = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    return files


def _stale(path: Path, text: str) -> bool:
    return not path.exists() or path.read_text(encoding="utf-8") != text


def build() -> list[Path]:
    """Write what ``expected_files`` says; remove student copies without a solution; return what changed."""
    expected = expected_files()
    changed = []
    for path, text in expected.items():
        if _stale(path, text):
            atomic_write(path, text)
            changed.append(path)
    for path in NOTEBOOKS.glob("*.ipynb"):
        if path not in expected:
            path.unlink()
            changed.append(path)
    return changed


def check() -> list[str]:
    """Problems that ``build`` would fix, one line each (empty when in sync)."""
    expected = expected_files()
    problems = []
    for path, text in expected.items():
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        if not path.exists():
            problems.append(f"{shown}: missing")
        elif _stale(path, text):
            problems.append(f"{shown}: differs from what `build` writes")
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        if path not in expected:
            problems.append(f"{path.relative_to(ROOT)}: has no solution notebook")
    return problems


def load_manifest() -> dict[str, dict]:
    """The exercises of every chapter (``course/exercises.json``), as ``build`` wrote them."""
    return json.loads(MANIFEST.read_text(encoding="utf-8"))


def checks_called(nb: nbformat.NotebookNode) -> list[str]:
    """Names of the checks a notebook calls (``check.<name>(``), in order, without repeats."""
    names: list[str] = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            for name in _CHECK_CALL.findall(cell.source):
                if name not in names:
                    names.append(name)
    return names


@contextmanager
def environment(**overrides: str | None):
    """Set (or with None, unset) environment variables for the block; kernels inherit them."""
    saved = {key: os.environ.get(key) for key in overrides}
    try:
        for key, value in overrides.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def execute(path: Path, *, timeout: int = 900, allow_errors: bool = False, env: dict | None = None):
    """Run a notebook headless in its own folder; return (notebook, seconds, error or None).

    Widget outputs get a static text fallback from their final state (``static_widget_text``).
    """
    from nbclient.exceptions import CellExecutionError

    from course.notebook_client import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        allow_errors=allow_errors,
        resources={"metadata": {"path": str(Path(path).parent)}},
    )
    start = time.perf_counter()
    error = None
    with environment(MPLBACKEND="module://matplotlib_inline.backend_inline", **(env or {})):
        try:
            client.execute()
        except CellExecutionError as exc:
            error = str(exc).strip().splitlines()[-1] if str(exc).strip() else "cell error"
    static_widget_text(nb)
    return nb, time.perf_counter() - start, error


def source_hash(nb: nbformat.NotebookNode) -> str:
    """A fingerprint of a notebook's code (cell 1, the shared set-up cell, left out): outputs saved by
    ``run_solutions`` carry it, so a test can tell when a solution was edited but not run again."""
    import hashlib

    code = [c.source for i, c in enumerate(nb.cells) if c.cell_type == "code" and i != 1]
    return hashlib.sha256(json.dumps(code).encode("utf-8")).hexdigest()


def run_solutions(paths=None, *, write_back: bool = True) -> list[tuple[str, float, str]]:
    """Execute solution notebooks at the full budget, write their outputs back; rows of (name, seconds, status).

    The notebook's metadata records what produced the outputs: the code's ``source_hash``, the
    seconds the run took and the device it ran on.
    """
    from course.device import describe

    rows = []
    for path in paths or solution_paths():
        path = Path(path)
        nb, seconds, error = execute(path, env={"COURSE_STRICT_CHECKS": "1", "COURSE_QUICK": None})
        if write_back and error is None:
            nb.metadata["kernelspec"] = dict(KERNELSPEC)
            nb.metadata["language_info"] = {"name": "python"}
            nb.metadata["course"] = {"chapter": chapter_of(path), "source_sha256": source_hash(nb),
                                     "seconds": round(seconds, 1), "device": describe()}
            atomic_write(path, dumps(nb))
        rows.append((path.name, seconds, "ok" if error is None else f"FAILED: {error}"))
        print(f"{path.name:40s} {seconds:7.1f} s  {rows[-1][2]}", flush=True)
        for problem in output_problems(nb, path.name) if error is None else []:
            print(f"  saved output: {problem}", flush=True)
    return rows
