"""What a Colab user gets from ``pip install``: the wheel works away from the checkout.

The wheel is built from this checkout, installed into a fresh folder outside it, and used from
yet another folder: a shipped adapter loads onto the base model, and a copied student notebook is
graded against the exercise manifest that ships inside the package (no solutions/ beside it).
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.notebook

USE = """
import json, sys
import course, course.grade
from peft import PeftModel
from course.adapters import adapter_path
from course.generate import generate
from course.models import load_base_model, load_tokenizer

model = PeftModel.from_pretrained(load_base_model(device="cpu"), adapter_path("addition"))
reply = generate(model, load_tokenizer(), "What is 12+30? Reply with the number only.", max_new_tokens=4)
print(json.dumps({"course": course.__file__, "adapter": str(adapter_path("addition")), "reply": reply}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    dist, site = tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("site")
    # Built from a copy: setuptools builds inside the source tree (build/, *.egg-info), and two builds of
    # one tree at once (two test runs) collide there ("File exists: build/bdist...").
    source = tmp_path_factory.mktemp("source") / "course-source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                                                 ".pytest_cache", "_build", "dist", "site"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--disable-pip-version-check", "-q", "-w", str(dist), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("course-*.whl")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
                              "-q", "--target", str(site), str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    return wheel, site


def run_outside(site: Path, cwd: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900, **kwargs)


def test_the_wheel_carries_the_package_data(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert "course/exercises.json" in names
    assert "course/adapters/addition/adapter_model.safetensors" in names
    assert not any(n.startswith(("solutions/", "notebooks/", "tests/")) for n in names)


def test_installed_course_loads_a_shipped_adapter_from_elsewhere(installed, tmp_path):
    _, site = installed
    result = run_outside(site, tmp_path, "-c", USE)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["course"].startswith(str(site)) and report["adapter"].startswith(str(site))
    assert report["reply"].strip().startswith("42")


def test_installed_course_grades_a_copied_student_notebook(installed, tmp_path):
    _, site = installed
    for name in ("00_welcome.ipynb",):
        shutil.copy(ROOT / "notebooks" / name, tmp_path / f"homework-{name}")
    result = run_outside(site, tmp_path, "-m", "course", "grade", "--json", "--no-execute", ".")
    assert result.returncode == 0, result.stderr[-3000:]
    (report,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert report["chapter"] == "00_welcome" and report["score"] == 0.0
    assert [c["status"] for c in report["checks"]] == ["not_attempted"]
