"""The suite's own scheduling (``tests/conftest.py``): under ``make test``'s two workers, every test
using one of ``SHARED_FIXTURES`` runs in one worker, so the fixture is built once. (pytest-xdist 3.8's
``--dist loadgroup`` did not group at all under pytest 9: the 65 s sandbox batch was built twice.)"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent

MODULE = textwrap.dedent("""
    import os, time
    import pytest

    @pytest.fixture(scope="module")
    def batch():
        with open(os.environ["BUILT"], "a") as f:
            f.write(os.environ.get("PYTEST_XDIST_WORKER", "-") + "\\n")
        time.sleep(0.5)
        return os.environ.get("PYTEST_XDIST_WORKER")

    @pytest.mark.parametrize("i", range(6))
    def test_uses_the_shared_fixture(batch, i):
        assert batch == os.environ.get("PYTEST_XDIST_WORKER")

    @pytest.mark.parametrize("i", range(6))
    def test_needs_nothing(i):
        time.sleep(0.2)
""")


def test_tests_sharing_a_slow_fixture_run_in_one_worker(tmp_path):
    (tmp_path / "test_grouped.py").write_text(MODULE)
    built = tmp_path / "built.txt"
    env = {**os.environ, "BUILT": str(built), "PYTHONPATH": str(TESTS)}
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_XDIST_WORKER_COUNT", None)
    done = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-p", "conftest",
                           "-p", "no:cacheprovider", "-q", "-rA", "--rootdir", str(tmp_path), str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "12 passed" in done.stdout
    assert built.read_text().split() in (["gw0"], ["gw1"]), (
        f"the module fixture was built by {built.read_text().split()}: its tests were spread over the workers")
