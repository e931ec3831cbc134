"""Shared by the check tests (tests/test_check_*.py): answers built from a check's own text."""

from __future__ import annotations


def checks_own_solution(chk, defines: str, **names):
    """What ``chk.solution()`` shows, executed with ``names`` (its imports): the object it ``defines``.

    The solution a check falls back to until a notebook's manifest names one must itself pass the check."""
    exec(chk._solution, names)
    return names[defines]
