"""What the grader verifies is unchanged (see ``course.grade``).

``snapshot()`` / ``changes(before)``: in the judging process (``course.grade_worker``), every
name bound in the course's loaded modules (``course.check`` and the reference modules, constants
included), every attribute of their classes and of their ``Check`` objects, and torch's comparison
functions; taken before the learner's definitions run, compared after they ran and after the
check. A difference is tampering.

``fingerprint(root)`` / ``changed_file(before, root)``: in the grader, a hash of every file of the
installed package and of the start-up hooks Python would run (``*.pth``, ``sitecustomize.py`` and
``usercustomize.py`` in the site-packages folders; the latter two also beside the package and on
``sys.path``), taken at start and compared before every submission.
"""

from __future__ import annotations

import hashlib
import site
import sys
from pathlib import Path


def _course_modules() -> dict:
    return {name: module for name, module in list(sys.modules.items())
            if module is not None and (name == "course" or name.startswith("course."))}


def _ours(value) -> bool:
    return (getattr(value, "__module__", "") or "").split(".")[0] == "course"


def snapshot() -> dict:
    """``{"module.name": object}`` for everything a learner could rebind to change a verdict."""
    import torch

    seen: dict[str, object] = {"torch.allclose": torch.allclose, "torch.equal": torch.equal,
                               "torch.testing.assert_close": torch.testing.assert_close,
                               "Tensor.__eq__": torch.Tensor.__eq__, "builtins.isinstance": isinstance}
    for module_name, module in _course_modules().items():
        for name, value in list(vars(module).items()):
            where = f"{module_name}.{name}"
            seen[where] = value
            if isinstance(value, type) and value.__module__ == module_name:
                seen.update({f"{where}.{key}": item for key, item in list(vars(value).items())
                             if key not in ("__dict__", "__weakref__", "__doc__")})
            elif _ours(type(value)) and hasattr(value, "__dict__"):  # a Check object: its test, its reference
                seen.update({f"{where}.{key}": item for key, item in list(vars(value).items()) if key != "last"})
            if isinstance(value, dict) and module_name.startswith("course.check"):  # check.ALL
                seen.update({f"{where}[{key!r}]": item for key, item in list(value.items())})
    return seen


def changes(before: dict) -> list[str]:
    """The names whose object is not the one ``before`` recorded (rebound, replaced or deleted)."""
    after = snapshot()
    missing = object()
    return [name for name, value in before.items() if after.get(name, missing) is not value]


_STARTUP = ("sitecustomize.py", "usercustomize.py")


def _hooks(root: Path) -> list[Path]:
    """``*.pth`` files and start-up modules in the site-packages folders, and start-up modules in the
    folder holding the package (first on the path of the grader's processes) and on ``sys.path``."""
    found = []
    for folder in map(Path, [*site.getsitepackages(), site.getusersitepackages()]):
        if folder.is_dir():
            found += sorted(p for p in folder.iterdir() if p.suffix == ".pth" or p.name in _STARTUP)
    for folder in dict.fromkeys([Path(root).resolve().parent, *(Path(p) for p in sys.path if p)]):
        found += [folder / name for name in _STARTUP if (folder / name).is_file()]
    return list(dict.fromkeys(found))


def fingerprint(root: Path) -> dict[str, str]:
    """``{path: sha256}`` of every file of the package at ``root`` and of the start-up hooks Python would run."""
    files = [p for p in sorted(Path(root).rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files + _hooks(root)}


def changed_file(before: dict[str, str], root: Path) -> str | None:
    """The first file added, removed or changed since ``before`` was taken, or None."""
    now = fingerprint(root)
    for path in sorted(set(before) | set(now)):
        if before.get(path) != now.get(path):
            state = "appeared" if path not in before else "was removed" if path not in now else "was changed"
            return f"{path} {state}"
    return None
