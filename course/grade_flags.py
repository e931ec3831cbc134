"""Flags for a human reader of the gradebook (``python -m course grade``, the ``flagged`` column).

Read from the learner's definitions with ``ast``, never by running them:

- the answer's code (the answer expression and every top-level definition it reaches, transitively)
  names the course's reference modules (``course.lora``, ``course.check``, ...) beyond what the
  course's own solutions of that chapter's exercises use (``course.nola.basis_chunks`` is part of
  chapter 05's exercises, reached by its NOLA layer through the learner's ``GenerateParams``;
  ``course.lora.LoRALinear`` is not part of chapter 02's);
- any definition (they all run in the judging process) names stack frames (``sys._getframe``,
  ``inspect``, ``f_back``), ``gc``, ``ctypes``, ``sys.modules``, dynamic imports or execution
  (``importlib``, ``__import__``, ``eval``, ``exec``), or an object's insides (``__globals__``,
  ``__code__``, ``__subclasses__``, ``__builtins__``).

A flag does not change the score: it says where to look.
"""

from __future__ import annotations

import ast

from course.definitions import cell_source_for_ast

REFERENCE_MODULES = ("course.lora", "course.dora", "course.olora", "course.nola", "course.nola_basis", "course.merging", "course.rlhf", "course.distributed",
                     "course.adapters", "course.check", "course.grade", "course.definitions")
#: Names that are suspicious where they start a dotted name (after the imports are resolved) ...
SUSPICIOUS = {"sys._getframe": "stack frames", "inspect": "stack frames (inspect)", "gc": "the garbage collector (gc)",
              "ctypes": "ctypes", "sys.modules": "sys.modules", "importlib": "dynamic imports (importlib)",
              "__import__": "dynamic imports (__import__)", "eval": "eval", "exec": "exec", "builtins": "builtins"}
#: ... and attributes that are suspicious anywhere.
INSIDES = {"_getframe": "stack frames", "f_back": "stack frames", "f_globals": "stack frames", "f_locals": "stack frames",
           "__globals__": "a function's globals", "__code__": "a function's code object",
           "__subclasses__": "__subclasses__", "__builtins__": "__builtins__"}


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


class _Module:
    """The top-level statements of the learner's definitions: who defines which name, and the imports."""

    def __init__(self, sources: list[str]):
        self.defines: dict[str, list[ast.AST]] = {}
        self.aliases: dict[str, str] = {}
        self.statements: list[ast.AST] = []
        for source in sources:
            try:
                tree = ast.parse(cell_source_for_ast(source))
            except SyntaxError:
                continue
            for node in tree.body:
                self.statements.append(node)
                for name in _bound_names(node):
                    self.defines.setdefault(name, []).append(node)
        for node in self.statements:
            for sub in ast.walk(node):
                self.aliases.update(_import_aliases(sub))

    def names_in(self, node: ast.AST) -> set[str]:
        """Dotted names used in ``node``, their first part resolved through the imports."""
        found = set()
        for sub in ast.walk(node):
            if isinstance(sub, (ast.Attribute, ast.Name)):
                dotted = _dotted(sub)
                if dotted:
                    head, _, rest = dotted.partition(".")
                    full = self.aliases.get(head, head)
                    found.add(f"{full}.{rest}" if rest else full)
            elif isinstance(sub, (ast.Import, ast.ImportFrom)):
                found.update(_import_aliases(sub).values())
        return found

    def reached(self, expression: str) -> set[str]:
        """Every dotted name the answer's code reaches, following top-level definitions."""
        try:
            start = ast.parse(expression, mode="eval")
        except SyntaxError:
            return set()
        names, todo, done = set(), [start], set()
        while todo:
            node = todo.pop()
            if id(node) in done:
                continue
            done.add(id(node))
            for name in self.names_in(node):
                names.add(name)
                todo += self.defines.get(name.split(".")[0], [])
        return names


def _bound_names(node: ast.AST) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return list(_import_aliases(node))
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    return []


def _import_aliases(node: ast.AST) -> dict[str, str]:
    if isinstance(node, ast.Import):
        return {(a.asname or a.name.split(".")[0]): (a.name if a.asname else a.name.split(".")[0]) for a in node.names}
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
        return {(a.asname or a.name): f"{node.module}.{a.name}" for a in node.names}
    return {}


def _free_names(source: str) -> set[str]:
    """Names ``source`` uses but does not define itself (what its notebook imported for it)."""
    try:
        tree = ast.parse(cell_source_for_ast(source or ""))
    except SyntaxError:
        return set()
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return used - {name for node in tree.body for name in _bound_names(node)}


def _given(name: str, given: set[str]) -> bool:
    """``course.lora.LoRALinear`` (or one of its attributes) where the course's solution uses ``LoRALinear``."""
    parts = name.split(".")
    return any(parts[i] in given for i in range(2, len(parts)))


def _reference(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in REFERENCE_MODULES)


def _suspicious(name: str) -> list[str]:
    found = [what for head, what in SUSPICIOUS.items() if name == head or name.startswith(head + ".")]
    return found + [what for part, what in INSIDES.items() if part in name.split(".")[1:] or name == part]


def flags(sources: list[str], answer: str, solution: str = "") -> list[str]:
    """Why a human should read this answer (an empty list: nothing to flag).

    ``sources``: the learner's kept definitions, cell by cell; ``answer``: the expression graded;
    ``solution``: the course's own answer cells of the chapter (their use of the course is not flagged).
    """
    learner = _Module(sources)
    given = _free_names(solution)  # names the exercise's own code takes from the course (03: LoRALinear)
    out = []
    reached = sorted(n for n in learner.reached(answer) if _reference(n) and not _given(n, given))
    reached = [n for n in reached if not any(other.startswith(n + ".") for other in reached)]
    if reached:
        out.append(f"`{answer}` reaches the course's reference code: {', '.join(reached)}")
    used = [node for node in learner.statements if not isinstance(node, (ast.Import, ast.ImportFrom))]
    everything = set().union(*map(learner.names_in, used)) if used else set()
    seen = []
    for name in sorted(everything):
        seen += [what for what in _suspicious(name) if what not in seen]
    if seen:
        out.append(f"the definitions use {', '.join(seen)}")
    return out
