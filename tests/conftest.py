"""Shared fixtures. Everything here runs offline: the hub is never asked."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "agg")

# `make test` runs the suite in two pytest-xdist workers (``-n 2``): a test that waits on a kernel,
# a subprocess or Python code leaves its core to the other. Each worker, and every notebook kernel
# and subprocess it starts, gets its share of the cores as torch threads (set before torch is
# imported), so two workers never oversubscribe the machine.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, str(_threads))


@pytest.fixture(scope="session")
def base_model():
    """The real base model (embedded SmolLM2-135M-Instruct offline), float32 on the CPU.

    Shared by the whole session: tests must not change it, or must undo what they change.
    """
    from course.models import load_base_model

    return load_base_model(device="cpu", dtype=__import__("torch").float32, progress=False)


@pytest.fixture(scope="session")
def tokenizer():
    from course.models import load_tokenizer

    return load_tokenizer()


def make_tiny_model(out, *, seed: int = 0):
    """A random LlamaForCausalLM of SmolLM2's architecture with tiny layers, saved to ``out``.

    Same class, vocabulary, tokenizer and chat template as the base model, same module names
    (``model.layers.N.self_attn.q_proj`` ...) and all 30 blocks, but hidden size 64 (4.4 M
    parameters instead of 134.5 M, most of them the 49,152-token embedding): code that runs on it runs on the real model's code path.
    For exercising code only, never for results. ``COURSE_MODEL=out`` points the notebooks at it.
    """
    import shutil
    from pathlib import Path

    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    from course.models import model_path

    source, out = Path(model_path(progress=False)), Path(out)
    config = AutoConfig.from_pretrained(source)
    config.update({"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
                   "num_key_value_heads": 2, "head_dim": 32})
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``make_tiny_model`` once per session."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-smollm2"))


# Under xdist (`make test`: ``-n 2``) work is handed out in collection order, so the suite is sorted
# longest first, so that no long test starts last: the modules whose fixtures cost minutes, then the
# notebook runs by their time limit, then the rest as collected. (A module-scoped fixture is built
# once in each worker that runs one of the module's tests.)
SLOW_FIXTURES = ("test_grade_sandbox", "test_classroom_nbgrader", "test_classroom_exports", "test_finetune",
                 "test_rlhf", "test_site", "test_wheel")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in SLOW_FIXTURES:
            return (0, SLOW_FIXTURES.index(module), 0.0)
        if module == "test_notebooks_execute":
            return (1, 0, -_limit(item))
        return (2, 0, 0.0)

    items.sort(key=rank)  # stable: the order within each rank is the collection's
    for item in items:
        shared = sorted(f"{item.module.__name__.rsplit('.', 1)[-1]}:{name}" for name in item.fixturenames
                        if name in SHARED_FIXTURES)
        if shared:
            item.add_marker(pytest.mark.xdist_group("+".join(shared)))


# Module-scoped fixtures that cost tens of seconds: every test using one goes to the same worker
# (``--dist loadgroup``), so that the fixture is built once, not once in each worker.
SHARED_FIXTURES = {"batch", "judged", "course_dir", "autograder", "github_repo", "tiny_model", "dpo_trainer",
                   "grpo_run", "built", "installed"}


class _GroupIds:
    """``--dist loadgroup`` with pytest 9: pytest-xdist 3.8 appends ``@group`` to ``item._nodeid``, which
    pytest 9 no longer reads (the id lives in ``item._id``), so marked tests were spread over both
    workers. This puts the suffix where pytest 9 reads it; it does nothing where xdist's own did."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        if not getattr(config.option, "loadgroup", False):
            return
        from _pytest.nodeid import NodeId

        for item in items:
            names = {str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                     for m in item.iter_markers("xdist_group")}
            if names and "@" not in item.nodeid:
                item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(sorted(names))}")


def pytest_configure(config):
    config.pluginmanager.register(_GroupIds(), "course-xdist-group-ids")


def _limit(item) -> float:
    from test_notebooks_execute import time_limit

    return time_limit(item.callspec.params["kind"], item.callspec.params["path"].stem)[0]


# The test output says which processor ran it and how long each pass took (CI prints both).
PASSES = {"[solution-bf16-": "half precision solutions", "[solution-": "float32 solutions",
          "[student-": "student notebooks"}
_pass_seconds: dict[str, float] = {}


def pytest_report_header(config):
    import torch
    from test_notebooks_execute import half_precision_plan

    from course.device import cpu_model

    return [f"processor: {cpu_model()}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}",
            f"half-precision pass: {half_precision_plan()}"]


def pytest_runtest_logreport(report):
    name = next((label for key, label in PASSES.items() if key in report.nodeid), "the rest")
    _pass_seconds[name] = _pass_seconds.get(name, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter, config):
    if not _pass_seconds:
        return
    workers = getattr(config.option, "numprocesses", None)
    terminalreporter.section("time per pass")
    if workers:
        terminalreporter.write_line(f"(seconds summed over the tests; {workers} workers ran them side by side)")
    for name in ("the rest", *PASSES.values()):
        if name in _pass_seconds:
            terminalreporter.write_line(f"{name:28s}{_pass_seconds[name]:8.0f} s")


@pytest.fixture(scope="session")
def tiny_adapters_dir(tiny_model_dir, tmp_path_factory):
    """The course's adapters (same recipes: targets, rank, alpha) rebuilt for ``tiny_model_dir`` with one
    training step, as ``python -m course adapters build --out`` does; ``COURSE_ADAPTERS`` points at it."""
    from course.adapters import build_all

    out = tmp_path_factory.mktemp("tiny-adapters")
    before = os.environ.get("COURSE_MODEL")
    os.environ["COURSE_MODEL"] = str(tiny_model_dir)
    try:
        build_all(steps=1, progress=False, out_dir=out, overrides={"n_eval": 2, "examples": ()})
    finally:
        if before is None:
            del os.environ["COURSE_MODEL"]
        else:
            os.environ["COURSE_MODEL"] = before
    return out
