"""Exercise checks: ``check.<name>(answer)``, ``check.<name>.hint()``, ``check.<name>.solution()``.

Each check judges behaviour, never spelling, and reports passed, failed (with the
reason) or not attempted. The checks live in one module per chapter
(``course/check/<chapter>.py``); this package gathers every ``Check`` defined in
them under one name, so a new chapter's module needs no registration::

    from course import check
    check.lora_linear(LoRALinear)
"""

import importlib
import pkgutil

from course.check.core import FAILED, NOT_ATTEMPTED, PASSED, Check, CheckResult, Failure

ALL: dict[str, Check] = {}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name == "core":
        continue
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _value in vars(_module).values():
        if isinstance(_value, Check):
            if _value.name in ALL and ALL[_value.name] is not _value:
                raise RuntimeError(f"Two checks are called {_value.name!r}: in {ALL[_value.name]._test.__module__} "
                                   f"and {_module.__name__}.")
            ALL[_value.name] = _value
globals().update(ALL)

__all__ = ["ALL", "Check", "CheckResult", "Failure", "PASSED", "FAILED", "NOT_ATTEMPTED", *ALL]
