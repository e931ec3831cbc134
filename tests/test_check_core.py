"""The check machinery and the warm-up check, both ways."""

import json

import pytest
import torch

from course import check
from course.check.core import (
    FAILED,
    NOT_ATTEMPTED,
    PASSED,
    Check,
    CheckResult,
    Failure,
    StrictCheckFailure,
)


def _passing(answer):
    pass


def make(test=_passing, timeout=5.0):
    return Check("demo", test, hint="a hint", solution="x = 1", timeout=timeout)


def test_statuses_and_messages(capsys):
    def stub(x):
        raise NotImplementedError

    def judge(answer):
        answer(1)

    demo = make(judge)
    assert demo(lambda x: x).status == PASSED and demo.passed
    assert demo(stub).status == NOT_ATTEMPTED and not demo.passed
    wrong = demo(lambda x: 1 / 0)
    assert wrong.status == FAILED and "ZeroDivisionError" in wrong.message
    assert "<lambda>" in wrong.message  # points at the learner's code

    def judged_wrong(answer):
        raise Failure("B must start at zero")

    failing = make(judged_wrong)(None)
    assert failing.status == FAILED and failing.message == "B must start at zero"
    out = capsys.readouterr().out
    assert "passed" in out and "not attempted" in out and "not yet" in out


def test_a_hanging_answer_fails_instead_of_hanging():
    def forever(answer):
        while True:
            pass

    result = make(forever, timeout=0.5)(None)
    assert result.status == FAILED and "more than" in result.message


def test_strict_mode_raises_on_failure_only(monkeypatch):
    monkeypatch.setenv("COURSE_STRICT_CHECKS", "1")
    assert make()(None).passed
    with pytest.raises(StrictCheckFailure):
        make(lambda a: 1 / 0)(None)

    def stub(a):
        raise NotImplementedError

    assert make(stub)(None).status == NOT_ATTEMPTED


def test_results_are_logged(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv("COURSE_CHECK_LOG", str(log))
    make()(None)
    make(lambda a: 1 / 0)(None)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["status"] for r in records] == [PASSED, FAILED]


def test_hint_and_solution_show_text(capsys):
    demo = make()
    demo.hint()
    demo.solution()
    out = capsys.readouterr().out
    assert "a hint" in out and "x = 1" in out


def test_result_is_shown_once_even_when_it_is_the_cells_last_value(capsys):
    result = CheckResult("demo", PASSED)
    result._ipython_display_()  # the check shows it ...
    first = capsys.readouterr().out
    result._ipython_display_()  # ... and Jupyter's display hook must not show it again
    assert "passed" in first and capsys.readouterr().out == ""
    assert "passed" in result._repr_html_()


# --- the warm-up check, both ways ------------------------------------------------------------


def reference(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def other_correct(model):
    seen, total = set(), 0
    for _, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += int(torch.tensor(p.shape).prod())
    return total


def counts_frozen(model):
    return sum(p.numel() for p in model.parameters())


def counts_tensors(model):
    return len([p for p in model.parameters() if p.requires_grad])


def counts_shared_twice(model):
    return sum(p.numel() for m in model.modules() for p in m.parameters(recurse=False) if p.requires_grad)


def returns_float(model):
    return float(reference(model))


@pytest.mark.parametrize("answer", [reference, other_correct])
def test_count_trainable_passes_correct_answers(answer):
    assert check.count_trainable.run(answer).status == PASSED


@pytest.mark.parametrize(
    ("answer", "phrase"),
    [
        (counts_frozen, "frozen"),
        (counts_tensors, "numel"),
        (counts_shared_twice, "shared"),
        (returns_float, "Python int"),
        ("not a function", "Expected a function"),
    ],
)
def test_count_trainable_fails_typical_mistakes(answer, phrase):
    result = check.count_trainable.run(answer)
    assert result.status == FAILED
    assert phrase in result.message
