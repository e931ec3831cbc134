"""`make gpu-check` (course.gpu_check): the refusal without a GPU, and the table, with a fake runner.

No notebook runs here: the runner and the device are stand-ins, so what is tested is the
plumbing a real GPU run goes through (environment, budget, table, files).
"""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from course import gpu_check
from course.gpu_check import NoCudaDevice, Row

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = [Path("solutions/00_setup.ipynb"), Path("solutions/02_lora_from_scratch.ipynb"),
             Path("solutions/03_dora.ipynb")]


class FakeRunner:
    """Takes ``seconds[i]`` per notebook on a fake clock; the notebook named in ``fails`` fails."""

    def __init__(self, clock, seconds, fails=None):
        self.clock, self.seconds, self.fails, self.calls = clock, list(seconds), fails, []

    def __call__(self, path, env, timeout):
        self.calls.append((path.name, dict(env), timeout))
        took = self.seconds.pop(0)
        self.clock.now += took
        return took, ("AssertionError: check failed" if path.name == self.fails else None)


class FakeClock:
    now = 1000.0

    def __call__(self):
        return self.now


def fake_gpu():
    return "NVIDIA H200", "bfloat16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_cuda_it_refuses_at_once_and_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "OUTPUTS", tmp_path / "outputs")
    monkeypatch.setattr(gpu_check, "run_notebook", lambda *a: pytest.fail("a notebook ran without a GPU"))
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err
    assert "there is none here" in err and "torch.cuda.is_available() is False" in err and "make run" in err
    assert not (tmp_path / "outputs").exists(), "nothing is claimed when nothing will run"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_make_gpu_check_is_the_same_command():
    out = subprocess.run(["make", "-n", "gpu-check"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "-m course gpu-check" in out


def test_check_refuses_before_running_anything():
    def no_gpu():
        raise NoCudaDevice("no CUDA device")

    runner = FakeRunner(FakeClock(), [1.0])
    with pytest.raises(NoCudaDevice):
        gpu_check.check(NOTEBOOKS, runner=runner, device=no_gpu)
    assert runner.calls == []


def test_each_notebook_runs_at_the_full_budget_on_cuda_in_the_dtype_recorded():
    clock = FakeClock()
    runner = FakeRunner(clock, [12.34, 200.0, 95.0], fails="02_lora_from_scratch.ipynb")
    gpu, rows = gpu_check.check(NOTEBOOKS, runner=runner, device=fake_gpu, clock=clock, report=lambda line: None)
    assert gpu == "NVIDIA H200"
    assert [r.notebook for r in rows] == [p.name for p in NOTEBOOKS]
    assert [r.seconds for r in rows] == [12.3, 200.0, 95.0]
    assert {r.dtype for r in rows} == {"bfloat16"}
    assert [r.status for r in rows] == ["ok", "FAILED: AssertionError: check failed", "ok"]
    for _, env, _ in runner.calls:  # the full budget (COURSE_QUICK removed), on the GPU, in the recorded dtype
        assert env == {"COURSE_QUICK": None, "COURSE_STRICT_CHECKS": "1", "COURSE_DEVICE": "cuda",
                       "COURSE_DTYPE": "bfloat16"}


def test_notebooks_left_when_the_budget_is_spent_are_listed_as_not_run():
    clock = FakeClock()
    runner = FakeRunner(clock, [300.0, 280.0, 5.0])
    _, rows = gpu_check.check(NOTEBOOKS, budget=570, timeout=600, runner=runner, device=fake_gpu, clock=clock,
                              report=lambda line: None)
    assert [timeout for _, _, timeout in runner.calls] == [570, 270]  # a notebook gets what is left at most
    assert rows[2].status.startswith("not run: the 570 s budget was spent") and rows[2].seconds == 0


def test_the_table_and_its_files(tmp_path):
    rows = [Row("00_setup.ipynb", 12.3, "float16", "ok"), Row("03_dora.ipynb", 95.0, "float16", "FAILED: x | y")]
    text = gpu_check.table("Tesla T4", rows)
    assert text.splitlines()[0] == "GPU check on Tesla T4: 1 of 2 notebooks ok, 107 s in all"
    assert "| 00_setup.ipynb | 12.3 | float16 | ok |" in text
    assert "| 03_dora.ipynb | 95.0 | float16 | FAILED: x / y |" in text  # a | would break the table
    stamp = lambda: (2026, 12, 3, 14, 0, 0, 3, 337, 0)  # noqa: E731
    md, js = gpu_check.claim(tmp_path, now=stamp)
    md2, js2 = gpu_check.claim(tmp_path, now=stamp)  # the same second: a new name, the first kept
    assert md.name == "gpu-check-20261203-140000.md" and md2.name == "gpu-check-20261203-140000-1.md"
    assert md.read_text() == md2.read_text() == "GPU check running...\n"  # claimed before the work starts
    gpu_check.save("Tesla T4", rows, md, js)
    assert md.read_text() == text and md2.read_text() == "GPU check running...\n"
    assert json.loads(js.read_text()) == {"gpu": "Tesla T4", "notebooks": [
        {"notebook": "00_setup.ipynb", "seconds": 12.3, "dtype": "float16", "status": "ok"},
        {"notebook": "03_dora.ipynb", "seconds": 95.0, "dtype": "float16", "status": "FAILED: x | y"}]}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([md.name, md2.name, js.name])  # no temp files left


def test_main_writes_the_table_with_a_fake_gpu(tmp_path, monkeypatch, capsys):
    clock = FakeClock()
    runner = FakeRunner(clock, [10.0, 20.0])
    monkeypatch.setattr(gpu_check, "OUTPUTS", tmp_path)
    monkeypatch.setattr(gpu_check, "cuda_device", fake_gpu)
    monkeypatch.setattr(gpu_check, "run_notebook", runner)
    assert gpu_check.main([str(p) for p in NOTEBOOKS[:2]]) == 0
    written = list(tmp_path.glob("gpu-check-*.md"))
    assert len(written) == 1 and "2 of 2 notebooks ok" in written[0].read_text()
    assert "| 02_lora_from_scratch.ipynb | 20.0 | bfloat16 | ok |" in capsys.readouterr().out
