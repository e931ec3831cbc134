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


def test_a_timeout_cannot_be_swallowed_by_the_answer():
    def judge(answer):
        answer()

    def swallows_everything_it_can():
        while True:
            try:
                while True:
                    pass
            except Exception:  # a learner's guard around the forward
                pass

    result = make(judge, timeout=0.5)(swallows_everything_it_can)
    assert result.status == FAILED and "more than 0.5 s" in result.message and "too slow" in result.message


def test_a_class_with_one_stub_method_is_told_which():
    class Layer:
        def __init__(self):
            self.ready = True

        def forward(self):
            return 1

        def merge(self):
            raise NotImplementedError()

    class Untouched:
        def __init__(self):
            raise NotImplementedError()

    def judge(answer):
        layer = answer()
        layer.forward()
        layer.merge()

    partly = make(judge)(Layer)
    assert partly.status == FAILED and "Layer.merge" in partly.message and "stub" in partly.message
    assert make(judge)(Untouched).status == NOT_ATTEMPTED

    def stub_function(x):
        raise NotImplementedError()

    assert make(lambda answer: answer(1))(stub_function).status == NOT_ATTEMPTED


def test_tiered_hints(capsys):
    demo = Check("demo", _passing, hint=["look at the shapes", "A is (r, in)", "B @ A"], solution="x = 1")
    demo.hint()
    first = capsys.readouterr().out
    assert "look at the shapes" in first and "hint(2)" in first and "A is (r, in)" not in first
    demo.hint(3)
    assert "B @ A" in capsys.readouterr().out
    demo.hint(99)  # past the last: the last one
    assert "B @ A" in capsys.readouterr().out


def _random_states():
    import random

    import numpy

    return torch.get_rng_state(), random.getstate(), numpy.random.get_state()


def _same_states(a, b) -> bool:
    import numpy

    return torch.equal(a[0], b[0]) and a[1] == b[1] and all(
        numpy.array_equal(x, y) if isinstance(x, numpy.ndarray) else x == y for x, y in zip(a[2], b[2], strict=True))


@pytest.mark.parametrize("name", sorted(check.ALL))
def test_no_check_changes_the_global_random_states(name):
    import random

    import numpy

    chk = check.ALL[name]
    reference = chk.reference_object()
    assert reference is not None, f"check.{name} names no reference (the grader needs it)"

    def stub(*args, **kwargs):
        raise NotImplementedError()

    torch.manual_seed(7)
    random.seed(7)
    numpy.random.seed(7)
    before = _random_states()
    assert chk.run(reference).status == PASSED, f"the course's reference fails check.{name}"
    assert chk.run(stub).status == NOT_ATTEMPTED
    assert _same_states(before, _random_states()), f"check.{name} changed a global random state"


@pytest.mark.parametrize("name", sorted(check.ALL))
def test_every_reference_is_library_code_outside_the_checks(name):
    """A check's reference is what the course teaches (course.lora, course.merging, ...), not a copy
    kept inside course.check; it passes its check (test above)."""
    chk = check.ALL[name]
    module = chk.reference.partition(":")[0]
    assert module.startswith("course.") and not module.startswith("course.check"), chk.reference
    assert not chk.reference_object().__module__.startswith("course.check"), chk.reference


def test_random_states_are_restored_even_when_the_answer_draws():
    def judge(answer):
        answer()

    def draws():
        import random

        import numpy

        torch.rand(5)
        random.random()
        numpy.random.rand(3)

    before = _random_states()
    make(judge)(draws)
    assert _same_states(before, _random_states())


def test_close_is_the_checks_one_test_of_the_same_numbers():
    """course.check.core.close: the shape, then the numbers in float64, at the tolerances a check gives."""
    from course.check.core import close

    want = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert close(want.clone(), want, rtol=0, atol=0)
    assert close(want.double() + 1e-7, want, rtol=0, atol=1e-6)  # an answer in float64 is judged on its numbers
    assert close(want.to(torch.bfloat16), want, rtol=0, atol=0)  # these values are exact in bfloat16
    assert not close(want + 1e-3, want, rtol=1e-5, atol=1e-6)
    assert not close(want.T.contiguous(), want, rtol=0, atol=0.5)  # a transpose is not the layer
    assert not close(want.flatten(), want, rtol=1, atol=1)  # nor another shape
    nan = torch.tensor([float("nan"), 1.0])
    assert close(nan, nan.clone(), rtol=0, atol=0, equal_nan=True) and not close(nan, nan.clone(), rtol=0, atol=0)
    grad = want.clone().requires_grad_()
    assert close(grad * 1, want, rtol=0, atol=0)  # a result still in the autograd graph


@pytest.mark.parametrize("module", ["adapters", "distributed", "inject", "lora", "merging", "nola", "nola_linear", "olora",
                                    "rlhf"])
def test_every_check_module_compares_with_the_shared_close(module):
    import importlib
    import inspect

    from course.check import core

    source = inspect.getsource(importlib.import_module(f"course.check.{module}"))
    assert "allclose(" not in source, f"course.check.{module} compares numbers itself: use course.check.core.close"
    assert importlib.import_module(f"course.check.{module}").close is core.close
