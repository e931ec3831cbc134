"""The grader's own processes: ``python -m course.grade_worker execute|check ...`` (see ``course.grade``).

``execute NOTEBOOK REPORT PIDFILE`` runs a notebook in a fresh kernel only to collect its cell
errors, writing them to REPORT (the kernel's pid goes to PIDFILE, so that the grader can stop
it on time-out).

``check SPEC FD`` judges one exercise: it loads the learner's definitions (``course.definitions``)
into a fresh module, evaluates the answer expression among them and runs the check on it. The
verdict goes to the pipe FD the grader opened, tagged with a token the grader sent on stdin
before any learner code ran; whatever the learner's code prints or writes elsewhere is ignored.
Before the learner's code runs, the course's reference answer is replaced by a guard that
refuses calls from the learner's code, and the check machinery and torch's comparison functions
are noted, to verify afterwards that nothing patched them. (A definition that sets out to
defeat a grader in its own process, say by walking the interpreter's frames, is beyond what a
grader without a sandbox can rule out; the statements that do things never run here at all.)
"""

from __future__ import annotations

import json
import os
import sys
import time


class UsedTheReference(BaseException):
    """Raised when the learner's code calls the course's own answer (a BaseException: not swallowable)."""


def _execute(notebook: str, report: str, pidfile: str) -> int:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, DeadKernelError

    nb = nbformat.read(notebook, as_version=4)
    client = NotebookClient(nb, timeout=None, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": os.path.dirname(os.path.abspath(notebook))}})

    def note_pid(**kwargs):
        pid = getattr(getattr(client.km, "provisioner", None), "pid", None)
        if pid:
            with open(pidfile, "w") as f:
                f.write(str(pid))

    client.on_notebook_start = note_pid
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
    if isinstance(reference, type) or not callable(reference):
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


def _sentinels(check) -> dict:
    import torch

    from course.check import core

    return {"Check.run": core.Check.run, "check test": check._test, "CheckResult": core.CheckResult,
            "Failure": core.Failure, "expect": core.expect, "time_limit": core.time_limit,
            "torch.allclose": torch.allclose, "torch.equal": torch.equal,
            "torch.testing.assert_close": torch.testing.assert_close, "Tensor.__eq__": torch.Tensor.__eq__}


def _judge(spec: dict) -> dict:
    from course import check as checks
    from course.definitions import Definitions, load

    name = spec["check"]
    check = checks.ALL.get(name)
    if check is None:
        return {"status": "failed", "message": f"The grader has no check called {name!r}: update the course."}
    before = _sentinels(check)
    reference, guard = _guard_reference(check.reference)
    definitions = Definitions([tuple(c) for c in spec["cells"]], list(spec["problems"]))
    module, errors = load(definitions)
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
    changed = [key for key, value in _sentinels(check).items() if value is not before[key]]
    if changed:
        return {"status": "failed", "errors": errors, "message": (
            f"The grading machinery was changed while your answer ran ({', '.join(changed)}): not graded.")}
    return {"status": result.status, "message": result.message, "errors": errors}


def _check(spec_path: str, fd: int) -> int:
    token = sys.stdin.readline().strip()  # before any learner code runs
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    verdict = _judge(spec)
    verdict["token"] = token
    del token
    os.write(fd, (json.dumps(verdict) + "\n").encode("utf-8"))
    os.close(fd)
    sys.stdout.flush()
    os._exit(0)  # no atexit handler or thread of the learner's gets a last word


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["execute"] and len(argv) == 4:
        return _execute(*argv[1:])
    if argv[:1] == ["check"] and len(argv) == 3:
        return _check(argv[1], int(argv[2]))
    print("usage: python -m course.grade_worker execute NOTEBOOK REPORT PIDFILE | check SPEC FD", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
