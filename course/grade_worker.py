"""The grader's own processes: ``python -m course.grade_worker execute|check ...`` (see ``course.grade``).

Both run inside the submission's sandbox (``course.grade_sandbox``).

``execute NOTEBOOK REPORT`` runs a notebook in a fresh kernel only to collect its cell errors,
writing them to REPORT.

``check FD`` judges one exercise (the token, then the spec as one JSON line, on stdin): it loads the learner's definitions (``course.definitions``)
into a fresh module, evaluates the answer expression among them and runs the check on it. The
verdict goes to the pipe FD the grader opened, tagged with a token the grader sent on stdin
before any learner code ran; whatever the learner's code prints or writes elsewhere is ignored.
Before the learner's code runs, the course's reference answer is replaced by a guard that
refuses calls from the learner's code, and every name bound in the course's modules, the check
machinery and torch's comparison functions are noted (``course.grade_integrity``), to verify after
the definitions ran and after the check that nothing was rebound: a change is "tampered", and the
submission scores 0. (A definition that sets out to defeat a grader in its own process, say by
walking the interpreter's frames, is beyond what any in-process check can rule out: the grader
flags such code for a human, see ``course.grade_flags``.)
"""

from __future__ import annotations

import json
import os
import sys
import time

#: Course functions an answer may not call, besides the check's own ``reference`` (which for
#: ``inject_lora`` is a copy of the exercise's solution inside the check).
ALSO_REFUSED = {"inject_lora": ("course.lora:inject_lora",)}


class UsedTheReference(BaseException):
    """Raised when the learner's code calls the course's own answer (a BaseException: not swallowable)."""


def _execute(notebook: str, report: str) -> int:
    import nbformat
    from nbclient.exceptions import CellExecutionError, DeadKernelError

    from course.notebook_client import NotebookClient

    nb = nbformat.read(notebook, as_version=4)
    client = NotebookClient(nb, timeout=None, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": os.path.dirname(os.path.abspath(notebook))}})

    start, errors = time.perf_counter(), []
    try:
        client.execute()
    except DeadKernelError as exc:
        errors.append(f"the kernel died: {exc}")
    except CellExecutionError as exc:  # pragma: no cover - allow_errors collects these instead
        errors.append(str(exc).strip().splitlines()[-1])
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                errors.append(f"cell {index}: {output.get('ename')}: {output.get('evalue')}")
    with open(report, "w", encoding="utf-8") as f:
        json.dump({"errors": errors, "seconds": time.perf_counter() - start}, f)
    return 0


def _course_object(value) -> bool:
    """Whether ``value`` (or the function, class or partial behind it) was defined by the course."""
    seen = [value, getattr(value, "__self__", None), getattr(value, "__func__", None), getattr(value, "func", None)]
    return any((getattr(v, "__module__", "") or "").split(".")[0] == "course" for v in seen if v is not None)


def _guard_reference(spec: str | None):
    """Replace a reference function by a guard; return (the reference, the guard or None).

    ``spec`` is "module:attribute", the attribute possibly dotted ("course.nola:GenerateParams.apply").
    """
    if not spec:
        return None, None
    import functools
    import importlib

    module_name, _, attribute = spec.partition(":")
    *path, last = attribute.split(".")
    owner = importlib.import_module(module_name)
    for part in path:
        owner = getattr(owner, part)
    reference = getattr(owner, last)
    if isinstance(reference, type):  # a class: its construction from the learner's code is refused
        _guard_construction(reference, spec)
        return reference, None
    if not callable(reference):
        return reference, None

    @functools.wraps(reference)
    def guard(*args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
        if "/course/" not in caller:
            raise UsedTheReference(f"{spec.replace(':', '.')}")
        return reference(*args, **kwargs)

    if path:  # an attribute of a course class (an autograd Function's ``apply``): guard it there
        setattr(owner, last, guard)
    for name, loaded in list(sys.modules.items()):  # every name it is known by (packages re-export it)
        if name == "course" or name.startswith("course."):
            for key, value in list(vars(loaded).items()):
                if value is reference:
                    setattr(loaded, key, guard)
    return reference, guard


def _guard_construction(cls: type, spec: str) -> None:
    import functools

    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
        if "/course/" not in caller:
            raise UsedTheReference(spec.replace(":", "."))
        original(self, *args, **kwargs)

    cls.__init__ = __init__


def _load_references() -> None:
    """Import every module a check names as its reference, so that the snapshot covers them."""
    import importlib

    from course import check as checks

    for check in checks.ALL.values():
        if check.reference:
            importlib.import_module(check.reference.partition(":")[0])


def _tampered(before: dict, when: str, errors: list) -> dict | None:
    from course.grade_integrity import changes

    changed = changes(before)
    if not changed:
        return None
    shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
    return {"status": "tampered", "errors": errors, "message": (
        f"Tampering: {when}, the grading code was changed ({shown}). The submission scores 0.")}


def _judge(spec: dict) -> dict:
    from course import check as checks
    from course.definitions import Definitions, load

    name = spec["check"]
    check = checks.ALL.get(name)
    if check is None:
        return {"status": "failed", "message": f"The grader has no check called {name!r}: update the course."}
    from course.grade_integrity import snapshot

    _load_references()
    reference, guard = _guard_reference(check.reference)
    for other in ALSO_REFUSED.get(name, ()):
        _guard_reference(other)
    before = snapshot()
    definitions = Definitions([tuple(c) for c in spec["cells"]], list(spec["problems"]))
    module, errors = load(definitions)
    tampered = _tampered(before, "while your definitions were loaded", errors)
    if tampered:
        return tampered
    try:
        answer = eval(compile(spec["answer"], "<answer>", "eval"), module.__dict__)
    except NameError as exc:
        return {"status": "missing", "errors": errors, "message": (
            f"{exc}. The grader runs your notebook's imports, functions, classes and constants only; "
            f"define `{spec['answer']}` at the top level of a cell (and everything it needs inside it).")}
    except Exception as exc:
        return {"status": "failed", "errors": errors, "message": f"Evaluating `{spec['answer']}` raised "
                f"{type(exc).__name__}: {exc}"}
    if _course_object(answer) or answer is reference or (guard is not None and answer is guard):
        return {"status": "failed", "errors": errors, "message": (
            f"`{spec['answer']}` is the course's own reference implementation, not yours: write your own "
            "answer in the exercise cell.")}
    if isinstance(reference, type) and isinstance(answer, type) and issubclass(answer, reference):
        return {"status": "failed", "errors": errors, "message": (
            f"`{spec['answer']}` subclasses the course's reference {reference.__name__}: write your own class.")}
    try:
        result = check.run(answer)
    except UsedTheReference as exc:
        return {"status": "failed", "errors": errors, "message": (
            f"Your answer calls the course's reference `{exc}`, so it is not graded as yours: write the code.")}
    tampered = _tampered(before, "while your answer was checked", errors)
    if tampered:
        return tampered
    return {"status": result.status, "message": result.message, "errors": errors}


def _check(fd: int) -> int:
    token = sys.stdin.readline().strip()  # before any learner code runs
    spec = json.loads(sys.stdin.readline())
    verdict = _judge(spec)
    verdict["token"] = token
    del token
    os.write(fd, (json.dumps(verdict) + "\n").encode("utf-8"))
    os.close(fd)
    sys.stdout.flush()
    os._exit(0)  # no atexit handler or thread of the learner's gets a last word


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["execute"] and len(argv) == 3:
        return _execute(*argv[1:])
    if argv[:1] == ["check"] and len(argv) == 2:
        return _check(int(argv[1]))
    print("usage: python -m course.grade_worker execute NOTEBOOK REPORT | check FD", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
