"""The machinery behind ``check.<name>(answer)``: results, hints, solutions, time limits.

A check runs a test function on the learner's answer and turns what happens into
a ``CheckResult``: ``passed``; ``failed`` with a message (a ``Failure`` raised by
the test, or anything the answer raised, or a time-out); or ``not_attempted``
(the answer raised ``NotImplementedError``, as every stub does). A check never
crashes the notebook, with one deliberate exception: with ``COURSE_STRICT_CHECKS=1``
(the test suite runs the solution notebooks so) a failed check raises.

``COURSE_CHECK_LOG=path`` appends one JSON line per check; the grader and the
tests read it.
"""

from __future__ import annotations

import html
import inspect
import json
import os
import signal
import textwrap
import threading
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field

PASSED, FAILED, NOT_ATTEMPTED = "passed", "failed", "not_attempted"


class Failure(AssertionError):
    """Raised by a check's test with a message for the learner."""


class CheckTimeout(BaseException):
    """Raised inside the answer when its time is up.

    A ``BaseException``, like ``KeyboardInterrupt``, so that a learner's ``try: ...
    except Exception:`` cannot swallow it.
    """


class StrictCheckFailure(AssertionError):
    """Raised after a failed check when ``COURSE_STRICT_CHECKS=1``."""


@contextmanager
def time_limit(seconds: float):
    """Interrupt the block after ``seconds`` (Unix main thread only; elsewhere no limit).

    The alarm raises ``CheckTimeout`` and, should the answer swallow it anyway (a bare
    ``except:``), fires again every 0.2 s until the block is left. The grader adds a
    process-level limit on top, which no code in the process can catch.
    """
    usable = hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if not usable or not seconds:
        yield
        return

    def on_alarm(signum, frame):
        raise CheckTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.2)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def preserved_random_state():
    """Run the block and put every global random generator back as it was.

    torch (CPU and every initialised CUDA device), Python's ``random`` and NumPy's
    global generator: a check seeds what it needs and must not change the learner's
    random stream, whatever the answer draws.
    """
    import random
    import sys

    import torch

    numpy = sys.modules.get("numpy")
    python_state = random.getstate()
    numpy_state = numpy.random.get_state() if numpy is not None else None
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        if numpy_state is not None:
            numpy.random.set_state(numpy_state)


_ICONS = {PASSED: ("✅", "#1a7f37"), FAILED: ("❌", "#cf222e"), NOT_ATTEMPTED: ("⏳", "#6e7781")}


@dataclass
class CheckResult:
    """The outcome of one check: ``status``, ``message`` and ``passed``."""

    name: str
    status: str
    message: str = ""
    _shown: bool = field(default=False, repr=False, compare=False)

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    def _headline(self) -> str:
        return {
            PASSED: f"check.{self.name}: passed",
            FAILED: f"check.{self.name}: not yet",
            NOT_ATTEMPTED: f"check.{self.name}: not attempted",
        }[self.status]

    def __str__(self) -> str:
        icon = _ICONS[self.status][0]
        body = f"\n{textwrap.indent(self.message, '   ')}" if self.message else ""
        return f"{icon} {self._headline()}{body}"

    def _repr_html_(self) -> str:
        icon, colour = _ICONS[self.status]
        body = f"<pre style='white-space:pre-wrap;margin:4px 0 0 0'>{html.escape(self.message)}</pre>" if self.message else ""
        return (
            f"<div style='border-left:4px solid {colour};padding:4px 10px'>"
            f"<b style='color:{colour}'>{icon} {html.escape(self._headline())}</b>{body}</div>"
        )

    def _ipython_display_(self) -> None:
        # Shown once: by the check itself, and not again when it is a cell's last value.
        if self._shown:
            return
        self._shown = True
        from IPython.display import display

        display({"text/plain": str(self), "text/html": self._repr_html_()}, raw=True)


def _in_ipython() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None


def _show(result: CheckResult) -> None:
    if _in_ipython():
        result._ipython_display_()
    else:
        print(result)


def _log(result: CheckResult) -> None:
    path = os.environ.get("COURSE_CHECK_LOG")
    if path:
        line = json.dumps({"check": result.name, "status": result.status, "message": result.message})
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def _is_library(filename: str) -> bool:
    path = filename.replace("\\", "/")
    return "/course/" in path or "site-packages" in path or "/lib/python" in path


def _answer_frames(exc: BaseException) -> str:
    """The part of a traceback that is in the learner's code, not in the check."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if "course/check" not in f.filename.replace("\\", "/")]
    return "".join(traceback.format_list(own[-3:]))


def _stub_that_raised(exc: NotImplementedError, answer, test) -> str | None:
    """The name of the learner's method that raised ``NotImplementedError``, if it is not the entry point.

    ``None`` when the stub is where the answer starts (its ``__init__``, or the function
    itself): nothing of it has been written yet. Otherwise, e.g. ``"LoRALinear.merge"``:
    the rest ran, and that method is still a stub. Only frames below the check's own
    ``test`` function count: those are the answer's.
    """
    tb, frame, inside = exc.__traceback__, None, False
    while tb is not None:
        code = tb.tb_frame.f_code
        if code is getattr(test, "__code__", None):
            inside = True
        elif inside and not _is_library(code.co_filename):
            frame = tb.tb_frame
        tb = tb.tb_next
    if frame is None:
        return None
    code = frame.f_code
    name = getattr(code, "co_qualname", code.co_name)
    entry = {getattr(answer, "__qualname__", None), getattr(getattr(answer, "__func__", None), "__qualname__", None)}
    if name in entry or code.co_name in ("__init__", "__new__", "<module>") or code.co_name == getattr(answer, "__name__", None):
        return None
    return name


class Check:
    """One exercise check: call it with the answer; ``.hint()`` and ``.solution()`` help."""

    def __init__(self, name: str, test, *, hint, solution, timeout: float = 120.0, reference=None):
        self.name = name
        self._test = test
        self._hint = [hint] if isinstance(hint, str) else list(hint)
        self._solution = solution
        self.timeout = timeout
        #: "module:attribute" of the course's own answer: the grader refuses it as a learner's.
        self.reference = reference
        self.last: CheckResult | None = None
        self.__doc__ = test.__doc__

    def reference_object(self):
        """The course's own answer (from ``reference``, "module:attribute"), or None."""
        if not self.reference:
            return None
        import importlib

        module, _, attribute = self.reference.partition(":")
        value = importlib.import_module(module)
        for part in attribute.split("."):
            value = getattr(value, part)
        return value

    def run(self, answer) -> CheckResult:
        """Judge ``answer`` without showing or logging anything; the global random state is kept."""
        try:
            with preserved_random_state(), time_limit(self.timeout):
                self._test(answer)
        except NotImplementedError as exc:
            stub = _stub_that_raised(exc, answer, self._test)
            if stub is None:
                return CheckResult(self.name, NOT_ATTEMPTED, "Replace `raise NotImplementedError` with your code, then run this cell again.")
            return CheckResult(self.name, FAILED, f"`{stub}` still raises NotImplementedError: the rest of your "
                               "answer ran, but this part is a stub. Write it, then run this cell again.")
        except Failure as exc:
            return CheckResult(self.name, FAILED, str(exc))
        except CheckTimeout:
            return CheckResult(
                self.name,
                FAILED,
                f"Your answer ran for more than {self.timeout:g} s, too slow: look for a loop that never ends.",
            )
        except Exception as exc:  # the learner's code raised: report it, never crash the notebook
            where = _answer_frames(exc)
            return CheckResult(
                self.name,
                FAILED,
                f"Your answer raised {type(exc).__name__}: {exc}\n" + (f"\n{where}" if where else ""),
            )
        return CheckResult(self.name, PASSED, "")

    def __call__(self, answer) -> CheckResult:
        result = self.run(answer)
        self.last = result
        _log(result)
        _show(result)
        if result.status == FAILED and os.environ.get("COURSE_STRICT_CHECKS") == "1":
            raise StrictCheckFailure(str(result))
        return result

    @property
    def passed(self) -> bool:
        """Whether the last answer checked passed."""
        return self.last is not None and self.last.passed

    def hint(self, level: int = 1):
        """Show hint ``level`` (1, 2, ...): each says a little more than the one before."""
        levels = len(self._hint)
        level = min(max(int(level), 1), levels)
        more = f" (`check.{self.name}.hint({level + 1})` says more.)" if level < levels else ""
        title = f"Hint {level} of {levels}" if levels > 1 else "Hint"
        return _show_text(f"**{title} for `check.{self.name}`.** {self._hint[level - 1]}{more}", markdown=True)

    def solution_source(self) -> str:
        """The reference solution's code: the solution notebook's own answer when the exercise
        manifest has it (one copy of the truth), else the check's ``solution``."""
        from_notebook = _solutions_in_manifest().get(self.name)
        if from_notebook:
            return from_notebook
        if self._solution is None:
            return "# No solution is recorded for this check."
        code = self._solution if isinstance(self._solution, str) else inspect.getsource(self._solution)
        return textwrap.dedent(code).strip()

    def solution(self):
        """Show the reference solution."""
        return _show_text(f"```python\n{self.solution_source()}\n```", markdown=True)

    def __repr__(self) -> str:
        return f"<check {self.name}: call it with your answer; .hint(), .solution()>"


def _solutions_in_manifest() -> dict[str, str]:
    """check name -> the solution notebook's answer cell, from ``course/exercises.json``."""
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "exercises.json"
    if not path.is_file():
        return {}
    chapters = json.loads(path.read_text(encoding="utf-8"))
    return {e["check"]: e.get("solution", "") for chapter in chapters.values() for e in chapter["exercises"]}


def _show_text(text: str, markdown: bool):
    if _in_ipython():
        from IPython.display import Markdown, display

        display(Markdown(text))
        return None
    print(text)
    return None


def check(name: str, *, hint, solution, timeout: float = 120.0, reference: str | None = None):
    """Decorator: turn a test function into a ``Check`` called ``name``.

    ``hint`` is a string or a list of hints, each more explicit than the last;
    ``reference`` names the course's own answer ("course.lora:LoRALinear").
    """

    def wrap(test):
        return Check(name, test, hint=hint, solution=solution, timeout=timeout, reference=reference)

    return wrap


def close(got, want, *, rtol: float, atol: float, equal_nan: bool = False) -> bool:
    """The checks' one test of "the same numbers": the same shape, and ``torch.allclose`` in float64.

    Both sides are compared in float64 (exact for float32, bfloat16 and float16 values), so an answer
    that computes in another dtype is judged on its numbers. Each check passes the tolerances its
    rounding allows, next to the reason for them.
    """
    import torch

    return tuple(got.shape) == tuple(want.shape) and torch.allclose(
        got.detach().to(torch.float64), want.detach().to(torch.float64).to(got.device), rtol=rtol, atol=atol,
        equal_nan=equal_nan)


def expect(condition: bool, message: str) -> None:
    """Fail the check with ``message`` unless ``condition`` holds."""
    if not condition:
        raise Failure(message)
