"""The notebook runs' time limits: sized from measured times, and a run past its limit is stopped
with every process it started, naming the notebook and the cell (``test_notebooks_execute``)."""

import json
import time

import nbformat
import psutil
import pytest
import test_notebooks_execute as runs


def test_limits_come_from_the_measured_times_and_name_the_processor():
    stem, measured = next(iter(runs.TIMES["seconds"]["solution"].items()))
    limit, why = runs.time_limit("solution", stem)
    assert limit == runs.LIMIT_FACTOR * measured + runs.LIMIT_SLACK
    assert runs.TIMES["processor"] in why and f"{measured:.0f} s" in why


def test_every_notebook_has_a_measured_time_for_each_pass_it_can_take():
    stems = [p.stem for p in runs.SOLUTIONS]
    for kind in ("solution", "solution-bf16", "student", "solution-bf16-tiny"):
        missing = [s for s in stems if s not in runs.TIMES["seconds"].get(kind, {})]
        assert not missing, f"tests/notebook_times.json has no {kind} time for {missing}: measure them"


def test_no_limit_is_the_old_flat_fifteen_minutes():
    # Each from its own measured time (the emulated path's may pass 900 s: it is measured, not flat).
    limits = [runs.time_limit(kind, path.stem)[0] for kind, path in runs.CASES]
    assert 900 not in limits and runs.UNMEASURED_LIMIT not in limits and len(set(limits)) > 3


@pytest.mark.parametrize("native", [True, False])
def test_the_half_precision_plan_is_named_for_both_paths(monkeypatch, native):
    monkeypatch.setattr(runs, "BF16", runs.BF16.__class__(native, "test"))
    plan = runs.half_precision_plan()
    assert ("native" if native else "emulated") in plan
    assert ("small random Llama" in plan) is (not native) and f"once in {runs.ROTATION} days" in plan
    assert runs.timing_key("solution-bf16", "02_lora_from_scratch") == (
        "solution-bf16" if native else "solution-bf16-tiny")
    assert runs.timing_key("solution", "02_lora_from_scratch") == "solution"


def test_a_run_past_its_limit_is_stopped_naming_the_cell_and_leaves_no_process(tmp_path):
    marker = tmp_path / "child.pid"
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell(
            "import subprocess, sys, time\n"
            f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
            f"open({str(marker)!r}, 'w').write(str(p.pid))\n"
            "time.sleep(600)"),
    ])
    path = tmp_path / "slow.ipynb"
    nbformat.write(nb, path)
    start = time.perf_counter()
    with pytest.raises(pytest.fail.Exception) as stopped:
        runs.run_nbval(path, {**__import__("os").environ}, 25, "25 s for this test")
    assert time.perf_counter() - start < 60
    message = str(stopped.value)
    assert "slow.ipynb" in message and "stopped in cell 1" in message and "25 s for this test" in message
    assert marker.exists(), "the slow cell did not start"
    child = int(marker.read_text())
    deadline = time.time() + 5
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.time() < deadline, "a process the notebook started outlived its limit"
        time.sleep(0.1)


def test_recording_writes_the_processor_beside_the_seconds(tmp_path, monkeypatch):
    target = tmp_path / "times.jsonl"
    monkeypatch.setenv("COURSE_RECORD_TIMES", str(target))
    runs._record("student", "00_welcome", 12.34)
    row = json.loads(target.read_text())
    assert row["seconds"] == 12.3 and row["processor"] and row["kind"] == "student"


def test_the_bf16_rotation_covers_every_notebook_in_rotation_days(monkeypatch):
    import datetime

    monkeypatch.delenv("COURSE_BF16_NOTEBOOKS", raising=False)
    day = datetime.date(2026, 12, 3)
    shares = [runs.bf16_share(day + datetime.timedelta(days=k)) for k in range(runs.ROTATION)]
    assert set().union(*shares) == {p.stem for p in runs.SOLUTIONS}
    assert all(shares) and sum(map(len, shares)) == len(runs.SOLUTIONS), "each notebook once per rotation"


def test_the_bf16_share_can_be_chosen(monkeypatch):
    monkeypatch.setenv("COURSE_BF16_NOTEBOOKS", "all")
    assert len(runs.bf16_share()) == len(runs.SOLUTIONS)
    monkeypatch.setenv("COURSE_BF16_NOTEBOOKS", "02, 05")
    assert {s[:2] for s in runs.bf16_share()} == {"02", "05"}
    monkeypatch.setenv("COURSE_BF16_NOTEBOOKS", "99")
    with pytest.raises(ValueError, match="names no notebook"):
        runs.bf16_share()
