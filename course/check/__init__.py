"""Exercise checks: ``check.<name>(answer)``, ``check.<name>.hint()``, ``check.<name>.solution()``.

Each check judges behaviour, never spelling, and reports passed, failed (with the
reason) or not attempted. The checks live in one module per chapter; this package
gathers them under one name::

    from course import check
    check.lora_linear(LoRALinear)
"""

from course.check import adapters, lora, warmup
from course.check.core import FAILED, NOT_ATTEMPTED, PASSED, Check, CheckResult, Failure

ALL: dict[str, Check] = {}
for _module in (warmup, adapters, lora):
    for _value in vars(_module).values():
        if isinstance(_value, Check):
            ALL[_value.name] = _value
globals().update(ALL)

__all__ = ["ALL", "Check", "CheckResult", "Failure", "PASSED", "FAILED", "NOT_ATTEMPTED", *ALL]
