"""Student notebooks from solution notebooks, and headless execution.

``solutions/`` is the source of truth. ``build`` writes ``notebooks/`` from it:
each region between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` (nbgrader's
markers, kept in the source text because Colab rewrites cell metadata) becomes
``# YOUR CODE HERE`` and ``raise NotImplementedError()`` at the same indentation;
outputs are cleared, ``# NBVAL_CHECK_OUTPUT`` test markers dropped, metadata
normalised (kernelspec ``python3``, no local paths) and cell ids made stable, so
that building twice writes the same bytes. ``check`` reports what ``build``
would change.
"""

from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

import nbformat

from course.files import atomic_write

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = ROOT / "solutions"
NOTEBOOKS = ROOT / "notebooks"

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
STUB = ["# YOUR CODE HERE", "raise NotImplementedError()"]
CHECK_OUTPUT = "# NBVAL_CHECK_OUTPUT"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
_CHECK_CALL = re.compile(r"\bcheck\.([a-z_][a-z0-9_]*)\(")


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


def student_version(nb: nbformat.NotebookNode, name: str = "notebook") -> nbformat.NotebookNode:
    """The student copy of a solution notebook (a new object; ``nb`` is not changed)."""
    student = nbformat.v4.new_notebook()
    student.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    for index, cell in enumerate(nb.cells):
        source = cell.source
        if cell.cell_type == "code":
            source = strip_solutions(source, f"{name} cell {index}")
            source = "\n".join(line for line in source.split("\n") if line.strip() != CHECK_OUTPUT)
            new = nbformat.v4.new_code_cell(source)
        elif cell.cell_type == "markdown":
            new = nbformat.v4.new_markdown_cell(source.replace("/blob/main/solutions/", "/blob/main/notebooks/"))
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


def expected_student_notebooks() -> dict[Path, str]:
    """What ``build`` writes: path in ``notebooks/`` -> text."""
    return {
        NOTEBOOKS / path.name: dumps(student_version(nbformat.read(path, as_version=4), path.name))
        for path in solution_paths()
    }


def build() -> list[Path]:
    """Write ``notebooks/`` from ``solutions/``; remove stale copies; return what changed."""
    expected = expected_student_notebooks()
    changed = []
    for path, text in expected.items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            atomic_write(path, text)
            changed.append(path)
    for path in NOTEBOOKS.glob("*.ipynb"):
        if path not in expected:
            path.unlink()
            changed.append(path)
    return changed


def check() -> list[str]:
    """Problems that ``build`` would fix, one line each (empty when in sync)."""
    expected = expected_student_notebooks()
    problems = []
    for path, text in expected.items():
        if not path.exists():
            problems.append(f"{path.relative_to(ROOT)}: missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{path.relative_to(ROOT)}: differs from what `build` writes")
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        if path not in expected:
            problems.append(f"{path.relative_to(ROOT)}: has no solution notebook")
    return problems


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
    """Run a notebook headless in its own folder; return (notebook, seconds, error or None)."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

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
    return nb, time.perf_counter() - start, error


def run_solutions(paths=None, *, write_back: bool = True) -> list[tuple[str, float, str]]:
    """Execute solution notebooks, write their outputs back; rows of (name, seconds, status)."""
    rows = []
    for path in paths or solution_paths():
        path = Path(path)
        nb, seconds, error = execute(path, env={"COURSE_STRICT_CHECKS": "1"})
        if write_back and error is None:
            nb.metadata["kernelspec"] = dict(KERNELSPEC)
            nb.metadata["language_info"] = {"name": "python"}
            atomic_write(path, dumps(nb))
        rows.append((path.name, seconds, "ok" if error is None else f"FAILED: {error}"))
        print(f"{path.name:40s} {seconds:7.1f} s  {rows[-1][2]}", flush=True)
    return rows
