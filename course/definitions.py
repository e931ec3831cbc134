"""A learner's top-level definitions, taken from a notebook's code with ``ast`` (the grader).

The grader never trusts what a notebook's kernel printed or logged. It reads the code
instead and keeps only what defines things: imports, functions, classes and constants
(assignments of literals, names and arithmetic, without calls), the way
rasbt/LLMs-from-scratch imports definitions from its notebooks. Statements that do
things (a training loop, a cell that writes a file or patches a module) are left out,
so they never run in the grader's process.

Each kept statement is compiled under the file name ``<cell N>`` with the cell's own line
numbers, so a traceback points the learner at the right place.
"""

from __future__ import annotations

import ast
import linecache
import types
from dataclasses import dataclass, field

DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_CONSTANT_PARTS = (ast.Constant, ast.Name, ast.Attribute, ast.Tuple, ast.List, ast.Set, ast.Dict,
                   ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop, ast.Load, ast.Starred)


def cell_source_for_ast(source: str) -> str:
    """A cell's source with IPython's ``%magic`` and ``!shell`` lines blanked (line numbers kept)."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.split("\n"))


def is_constant(node: ast.AST) -> bool:
    """A value built from literals, names and arithmetic only: nothing is called."""
    return all(isinstance(part, _CONSTANT_PARTS) for part in ast.walk(node))


def _names(target: ast.AST) -> list[str] | None:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        inner = [_names(t) for t in target.elts]
        return None if any(n is None for n in inner) else [n for names in inner for n in names]
    return None


def _is_constant_assignment(targets: list[ast.AST], value: ast.AST) -> bool:
    """``R, ALPHA = 8, 16`` or ``TARGETS = ["q_proj"]``: literals; names and attributes only in the value of
    UPPER_CASE constants (``SCALE = ALPHA / R``), since lower-case names usually hold computed data."""
    names = [_names(t) for t in targets]
    if any(n is None for n in names) or not is_constant(value):
        return False
    refers = any(isinstance(part, (ast.Name, ast.Attribute)) for part in ast.walk(value))
    return not refers or all(n.isupper() for group in names for n in group)


def _keep(node: ast.stmt) -> bool:
    if isinstance(node, DEFINITIONS):
        return True
    if isinstance(node, ast.Assign):
        return _is_constant_assignment(node.targets, node.value)
    if isinstance(node, ast.AnnAssign):
        return node.value is not None and _is_constant_assignment([node.target], node.value)
    return False


@dataclass
class Definitions:
    """The kept statements of a notebook, cell by cell, and the cells that could not be read."""

    cells: list[tuple[int, str]] = field(default_factory=list)  # (cell index, source of its kept statements)
    problems: list[str] = field(default_factory=list)


def extract(nb) -> Definitions:
    """The definitions in the code cells of ``nb`` (an nbformat notebook)."""
    found = Definitions()
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        text = cell_source_for_ast(cell.source)
        try:
            tree = ast.parse(text)
        except SyntaxError as exc:
            found.problems.append(f"cell {index}: SyntaxError: {exc.msg} (line {exc.lineno}); "
                                  "its definitions were not graded")
            continue
        lines = text.split("\n")
        kept = []
        for node in tree.body:
            if _keep(node):
                start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
                # Blank lines keep the line numbers those of the cell.
                kept.append((start, node.end_lineno))
        if kept:
            out = [""] * len(lines)
            for start, end in kept:
                out[start - 1:end] = lines[start - 1:end]
            found.cells.append((index, "\n".join(out)))
    return found


def load(definitions: Definitions, module_name: str = "__learner__") -> tuple[types.ModuleType, list[str]]:
    """Execute the definitions, statement by statement, in a new module; return it and the errors.

    A definition that fails (an import of a missing package, say) is reported and skipped: the
    rest is still defined. A constant that fails (it named a variable computed elsewhere) is
    skipped silently: it was data, not a definition.
    """
    import sys

    module = types.ModuleType(module_name)
    module.__dict__["__builtins__"] = __builtins__
    sys.modules[module_name] = module
    errors = list(definitions.problems)
    for index, source in definitions.cells:
        filename = f"<cell {index}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        tree = ast.parse(source, filename)
        for node in tree.body:
            code = compile(ast.Module([node], type_ignores=[]), filename, "exec")
            try:
                exec(code, module.__dict__)
            except Exception as exc:
                if not isinstance(node, (ast.Assign, ast.AnnAssign)):  # a constant that fails is just left out
                    errors.append(f"cell {index}, line {node.lineno}: {type(exc).__name__}: {exc}")
    return module, errors
