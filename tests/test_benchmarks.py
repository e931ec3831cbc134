"""The layer benchmarks run (``--quick``) on the one timing harness, benchmarks/layer_timing.py."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("script", "target"), [("lora_vs_peft.py", "1.05"), ("dora_vs_peft.py", "1.0")])
def test_each_layer_benchmark_runs_on_the_shared_harness(script, target):
    source = (ROOT / "benchmarks" / script).read_text()
    assert "from layer_timing import main" in source and "def _step" not in source  # no second copy
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick"], cwd=ROOT / "benchmarks",
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = re.findall(r"^\s+64x96\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", done.stdout, re.M)
    assert len(rows) == 1 and all(float(v) > 0 for v in rows[0]), done.stdout
    assert re.search(rf"worst ratio [\d.]+ \((within|ABOVE) the {re.escape(target)} target\)", done.stdout)


def test_the_nola_memory_benchmark_measures_with_course_memory():
    """One way to measure a peak: the benchmark's workers call course.memory.peak_memory (as notebook 05 does)."""
    source = (ROOT / "benchmarks" / "nola_memory.py").read_text()
    assert "peak_memory(" in source and "ru_maxrss" not in source.split('"""', 2)[2]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "nola_memory.py"), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    peaks = dict(re.findall(r"^\s+(seed|course|autograd)\s+([\d.]+)\s+[\d.]+$", done.stdout, re.M))
    assert set(peaks) == {"seed", "course", "autograd"}, done.stdout
    # autograd keeps the whole basis for backward: its peak is above the chunked course's at any size
    assert float(peaks["autograd"]) > float(peaks["course"]) > 0, done.stdout
