"""course.experiments: the registry, the per-seed store and its provenance, the runner that reuses
finished seeds, stale code fingerprints, the lock, and ``experiments list --json`` against course.evidence.

Most tests use a toy experiment whose arms are cheap seeded functions (no model). One test runs an arm
of each adapter kind of the real experiments at the quick budget on a tiny random Llama.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import tomllib

from course import experiments
from course.__main__ import main as cli
from course.evidence import compare, interval
from course.experiments import Arm, Budget, Experiment, store
from course.experiments.runner import ExperimentBusyError, StaleResultsError

ROOT = Path(__file__).resolve().parent.parent
CONTRACT_KEYS = {"name", "chapter", "metric", "seeds", "arms", "difference", "decided", "better"}


def toy_value(arm: str, seed: int, quick: bool, offset: float, spread: float) -> float:
    """The toy arms' metric: an offset plus seeded noise, different for each arm, seed and budget."""
    return offset + random.Random(f"{arm}/{seed}/{quick}").gauss(0.0, spread)


class Toy:
    """A registered toy experiment whose arms record their calls."""

    def __init__(self, name="toy", offsets=(1.0, 0.0), spread=0.1, higher_is_better=True, fail=None):
        self.calls: list[tuple[str, int, bool]] = []
        self.fail = fail  # (arm, seed) that raises, to interrupt a run
        arms = tuple(self._arm(arm, offset, spread) for arm, offset in zip(("A", "B"), offsets, strict=True))
        self.experiment = Experiment(name, "00_toy", "score", arms=arms, verdict=("A", "B"),
                                     budget=Budget(1, 1, 1), higher_is_better=higher_is_better)
        experiments.register(self.experiment, replace=True)

    def _arm(self, arm, offset, spread):
        def run(seed, quick):
            if self.fail == (arm, seed):
                raise RuntimeError(f"{arm} fails at seed {seed}")
            self.calls.append((arm, seed, quick))
            return toy_value(arm, seed, quick, offset, spread)

        return Arm(arm, run, {"offset": offset})


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """Your own results in tmp/own (COURSE_RESULTS), the shipped ones in tmp/shipped."""
    own, shipped = tmp_path / "own", tmp_path / "shipped"
    monkeypatch.setenv("COURSE_RESULTS", str(own))
    monkeypatch.setattr(store, "SHIPPED", shipped)
    return own, shipped


@pytest.fixture
def toy(folders):
    made = []

    def make(**kwargs):
        t = Toy(**kwargs)
        made.append(t.experiment.name)
        return t

    yield make
    for name in made:
        experiments.unregister(name)


def quiet(*_args, **_kwargs):
    pass


def cell(folder, name, arm, seed, budget="full") -> Path:
    return Path(folder) / name / budget / arm.lower() / f"seed-{seed}.json"


# ---------------------------------------------------------------------------
# Store and provenance
# ---------------------------------------------------------------------------


def test_run_writes_one_file_per_arm_and_seed_with_its_provenance(toy, folders):
    from course.device import cpu_model

    own, _ = folders
    t = toy()
    report = experiments.run("toy", 3, log=quiet)
    assert len(report.ran) == 6 and not report.reused
    assert sorted(t.calls) == sorted((arm, seed, False) for arm in "AB" for seed in range(3))
    for arm, offset in (("A", 1.0), ("B", 0.0)):
        for seed in range(3):
            data = json.loads(cell(own, "toy", arm, seed).read_text())
            assert data["value"] == toy_value(arm, seed, False, offset, 0.1)
            assert (data["experiment"], data["arm"], data["seed"], data["budget"]) == ("toy", arm, seed, "full")
            assert data["fingerprint"] == experiments.code_fingerprint() and len(data["fingerprint"]) == 64
            assert data["device"].startswith("cpu") and data["dtype"] == "float32"
            assert data["processor"] == cpu_model()
            assert 0 <= data["seconds"] < 60 and data["metric"] == "score"
            when = datetime.datetime.fromisoformat(data["date"].replace("Z", "+00:00"))
            assert abs((datetime.datetime.now(datetime.timezone.utc) - when).total_seconds()) < 600
            assert data["settings"] == {"offset": offset, "steps": 1, "batch_size": 1, "eval_examples": 1}


def test_a_rerun_reuses_finished_seeds_and_runs_only_the_missing_ones(toy, folders):
    own, _ = folders
    t = toy()
    experiments.run("toy", 2, log=quiet)
    first = cell(own, "toy", "A", 0)
    before = (first.read_text(), first.stat().st_mtime_ns)
    t.calls.clear()
    report = experiments.run("toy", 4, log=quiet)
    assert sorted(t.calls) == sorted((arm, seed, False) for arm in "AB" for seed in (2, 3))
    assert len(report.reused) == 4 and len(report.ran) == 4
    assert (first.read_text(), first.stat().st_mtime_ns) == before  # not rewritten
    t.calls.clear()
    assert not experiments.run("toy", 4, log=quiet).ran and not t.calls


def test_an_interrupted_run_keeps_every_finished_result_and_resumes_there(toy, folders):
    own, _ = folders
    t = toy(fail=("B", 1))
    with pytest.raises(RuntimeError, match="B fails at seed 1"):
        experiments.run("toy", 3, log=quiet)
    written = sorted(p.relative_to(own).as_posix() for p in own.rglob("*.json"))
    assert written == ["toy/full/a/seed-0.json", "toy/full/a/seed-1.json", "toy/full/b/seed-0.json"]
    assert not [p for p in own.rglob("*") if p.name.endswith(".tmp")]
    t.fail, t.calls = None, []
    experiments.run("toy", 3, log=quiet)
    assert t.calls == [("B", 1, False), ("A", 2, False), ("B", 2, False)]  # seed by seed


def test_results_are_written_atomically(toy, folders, monkeypatch):
    own, _ = folders
    toy()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        experiments.run("toy", 2, log=quiet)
    assert not [p for p in own.rglob("*") if p.is_file() and p.name != ".lock"]  # no half file, no temporary


def test_quick_results_are_kept_apart_from_full_ones(toy, folders):
    own, _ = folders
    t = toy()
    experiments.run("toy", 2, quick=True, log=quiet)
    assert cell(own, "toy", "A", 0, "quick").is_file() and not (own / "toy" / "full").exists()
    assert experiments.summarise("toy").seeds == 0
    quick = experiments.summarise("toy", quick=True)
    assert quick.seeds == 2 and quick.arms[0].values == tuple(toy_value("A", s, True, 1.0, 0.1) for s in (0, 1))
    t.calls.clear()
    experiments.run("toy", 2, log=quiet)
    assert len(t.calls) == 4  # the quick results do not count as full ones
    with pytest.raises(ValueError, match="not shipped"):
        experiments.run("toy", 2, quick=True, ship=True, log=quiet)


def test_an_arm_must_return_one_finite_number(toy, folders):
    own, _ = folders
    t = toy()
    for bad in (float("nan"), "0.5", None, True):
        experiments.register(Experiment("toy", "00_toy", "score", arms=(Arm("A", lambda s, q, b=bad: b),
                                                                          t.experiment.arms[1]),
                                        verdict=("A", "B"), budget=Budget(1, 1, 1)), replace=True)
        with pytest.raises(TypeError, match="returned .* one finite number"):
            experiments.run("toy", 2, log=quiet)
        assert not (own / "toy" / "full" / "a").exists()


def test_a_damaged_or_misplaced_result_file_is_named(toy, folders):
    own, _ = folders
    toy()
    experiments.run("toy", 2, log=quiet)
    path = cell(own, "toy", "A", 1)
    path.write_text("{not json")
    with pytest.raises(experiments.StoreError, match="seed-1.json.*Delete it"):
        experiments.summarise("toy")
    data = json.loads(cell(own, "toy", "A", 0).read_text())
    path.write_text(json.dumps(data))  # seed 0's result in seed 1's place
    with pytest.raises(experiments.StoreError, match="not what its place says"):
        experiments.summarise("toy")
    del data["fingerprint"]
    path.write_text(json.dumps({**data, "seed": 1}))
    with pytest.raises(experiments.StoreError, match="missing or mistyped fingerprint"):
        experiments.summarise("toy")


def test_package_data_ships_the_results_in_the_stores_layout(toy, folders):
    """pyproject's package-data must match the files ``run --ship`` writes, or the wheel leaves them out."""
    _, shipped = folders
    toy()
    experiments.run("toy", 2, ship=True, log=quiet)
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["course"]
    files = [p.relative_to(shipped) for p in shipped.rglob("*.json")]
    assert len(files) == 4
    for relative in files:
        path = PurePosixPath("experiments/results") / relative.as_posix()
        assert any(len(PurePosixPath(p).parts) == len(path.parts) and path.match(p) for p in patterns), path


def test_the_code_fingerprint_covers_every_python_file_but_the_machinery(tmp_path, monkeypatch):
    package = tmp_path / "course"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "sub" / "b.py").write_text("y = 2\n")
    monkeypatch.setattr(store, "PACKAGE", package)

    def fingerprint():
        store.code_fingerprint.cache_clear()
        return store.code_fingerprint()

    try:
        first = fingerprint()
        (package / "sub" / "result.json").write_text("{}")  # data is not code
        assert fingerprint() == first
        (package / "sub" / "b.py").write_text("y = 3\n")
        second = fingerprint()
        assert second != first
        (package / "sub" / "b.py").rename(package / "b.py")  # the same code in another module
        third = fingerprint()
        assert third not in (first, second)
        (package / "grade.py").write_text("z = 1\n")  # the grader cannot change a result
        (package / "check").mkdir()
        (package / "check" / "lora.py").write_text("z = 2\n")
        assert fingerprint() == third
    finally:
        monkeypatch.undo()
        store.code_fingerprint.cache_clear()


# ---------------------------------------------------------------------------
# Stale results: other code's results are never mixed with the current code's
# ---------------------------------------------------------------------------


def run_as_old_code(monkeypatch, *args, **kwargs):
    with monkeypatch.context() as m:
        m.setattr(store, "code_fingerprint", lambda: "0" * 64)
        return experiments.run(*args, log=quiet, **kwargs)


def test_results_of_other_code_are_reported_stale_and_not_reused(toy, folders, monkeypatch, capsys):
    own, _ = folders
    t = toy()
    run_as_old_code(monkeypatch, "toy", 5)
    summary = experiments.summarise("toy")
    assert summary.stale and summary.fingerprint == "0" * 64 and summary.seeds == 5
    assert "STALE" in experiments.describe(summary)
    assert cli(["experiments", "list", "--json"]) == 0
    assert "toy: results are stale (made by code 000000000000" in capsys.readouterr().err
    t.calls.clear()
    with pytest.raises(StaleResultsError, match="10 result.*--replace-stale"):
        experiments.run("toy", 5, log=quiet)
    assert not t.calls  # refused before anything trained
    experiments.run("toy", 2, replace_stale=True, log=quiet)
    assert len(t.calls) == 4
    now = experiments.summarise("toy")
    # the current code's 4 results, not the old code's 6 remaining ones, and never a mix of both
    assert not now.stale and now.seeds == 2 and now.fingerprint == experiments.code_fingerprint()
    assert now.left_out == 6
    assert json.loads(cell(own, "toy", "A", 2).read_text())["fingerprint"] == "0" * 64


def test_stale_shipped_results_do_not_block_your_own_runs(toy, folders, monkeypatch):
    own, shipped = folders
    t = toy()
    run_as_old_code(monkeypatch, "toy", 2, ship=True)
    t.calls.clear()
    experiments.run("toy", 2, log=quiet)
    assert len(t.calls) == 4 and cell(own, "toy", "B", 1).is_file()
    assert not experiments.summarise("toy").stale


def test_shipped_results_are_reused_and_your_own_win_where_both_exist(toy, folders):
    own, shipped = folders
    t = toy()
    experiments.run("toy", 3, ship=True, log=quiet)
    assert cell(shipped, "toy", "A", 2).is_file() and not own.exists()
    t.calls.clear()
    experiments.run("toy", 4, log=quiet)
    assert sorted(t.calls) == [("A", 3, False), ("B", 3, False)]
    mine = json.loads(cell(shipped, "toy", "A", 0).read_text())
    mine["value"] = 42.0
    cell(own, "toy", "A", 0).write_text(json.dumps(mine))
    summary = experiments.summarise("toy")
    assert summary.seeds == 4 and summary.arms[0].values[0] == 42.0


# ---------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------


def test_a_second_run_of_the_same_experiment_is_refused_while_one_holds_the_lock(toy, folders):
    own, _ = folders
    t = toy()
    (own / "toy").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom filelock import FileLock\n"
                               f"with FileLock({str(own / 'toy' / '.lock')!r}):\n"
                               "    print('locked', flush=True)\n    sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ExperimentBusyError, match="another run of 'toy'.*wait for it"):
            experiments.run("toy", 2, log=quiet)
        assert not t.calls and not list(own.rglob("*.json"))
    finally:
        holder.communicate("", timeout=30)
    experiments.run("toy", 2, log=quiet)  # released: runs
    assert len(t.calls) == 4


# ---------------------------------------------------------------------------
# list --json: the contract's keys, the numbers from course.evidence
# ---------------------------------------------------------------------------


def listed(capsys, *extra) -> dict:
    assert cli(["experiments", "list", "--json", *extra]) == 0
    rows = json.loads(capsys.readouterr().out)
    for row in rows:
        assert set(row) == CONTRACT_KEYS
        assert all(set(arm) == {"name", "mean", "low", "high"} for arm in row["arms"])
        assert set(row["difference"]) == {"low", "high"}
    return {row["name"]: row for row in rows}


@pytest.mark.parametrize(("offsets", "higher_is_better", "decided", "better"), [
    ((1.0, 0.0), True, True, "A"),
    ((1.0, 0.0), False, True, "B"),  # a loss: lower is better
    ((0.0, 1.0), True, True, "B"),
    ((0.0, 0.0), True, False, None),
])
def test_list_json_reports_each_arms_interval_and_the_paired_verdict(toy, capsys, offsets, higher_is_better,
                                                                     decided, better):
    toy(offsets=offsets, higher_is_better=higher_is_better, spread=0.1)
    experiments.run("toy", 5, log=quiet)
    row = listed(capsys)["toy"]
    a = [toy_value("A", s, False, offsets[0], 0.1) for s in range(5)]
    b = [toy_value("B", s, False, offsets[1], 0.1) for s in range(5)]
    assert (row["chapter"], row["metric"], row["seeds"]) == ("00_toy", "score", 5)
    for arm, values in zip(row["arms"], (a, b), strict=True):
        assert (arm["mean"], arm["low"], arm["high"]) == pytest.approx(tuple(interval(values)), abs=1e-12)
    expected = compare(a, b, names=("A", "B"), paired=True, higher_is_better=higher_is_better)
    assert (row["difference"]["low"], row["difference"]["high"]) == pytest.approx((expected.low, expected.high))
    assert (row["decided"], row["better"]) == (expected.decided, expected.better) == (decided, better)
    assert row["decided"] == (row["difference"]["low"] > 0 or row["difference"]["high"] < 0)


def test_list_pairs_the_arms_on_the_seeds_every_arm_finished(toy, folders, capsys):
    own, _ = folders
    toy()
    experiments.run("toy", 4, log=quiet)
    cell(own, "toy", "B", 1).unlink()  # seed 1 is now incomplete
    summary = experiments.summarise("toy")
    assert summary.seed_list == (0, 2, 3) and summary.left_out == 1
    row = listed(capsys)["toy"]
    assert row["seeds"] == 3
    a = [toy_value("A", s, False, 1.0, 0.1) for s in (0, 2, 3)]
    assert (row["arms"][0]["mean"], row["arms"][0]["low"]) == pytest.approx(tuple(interval(a))[:2])
    assert "1 result(s) left out" in experiments.describe(summary)


def test_list_with_too_few_seeds_reports_no_interval(toy, folders, capsys):
    own, _ = folders
    toy()
    row = listed(capsys)["toy"]
    assert row["seeds"] == 0 and row["arms"][0]["mean"] is None
    assert row["difference"] == {"low": None, "high": None} and (row["decided"], row["better"]) == (False, None)
    experiments.run("toy", 2, log=quiet)
    for b in ("a", "b"):
        (own / "toy" / "full" / b / "seed-1.json").unlink()
    row = listed(capsys)["toy"]
    assert row["seeds"] == 1 and row["arms"][0]["mean"] == toy_value("A", 0, False, 1.0, 0.1)
    assert row["arms"][0]["low"] is None and row["decided"] is False


def test_list_text_names_each_arm_and_says_the_verdict(toy, capsys):
    toy()
    assert cli(["experiments", "run", "toy", "--seeds", "3"]) == 0
    capsys.readouterr()
    assert cli(["experiments", "list"]) == 0
    out = capsys.readouterr().out
    block = out[out.index("toy (00_toy)"):]
    assert "3 of 5 seeds" in block and "A − B = " in block and "over 3 paired seeds: A is better" in block
    assert "02-lora-rank (02_lora_from_scratch)" in out and "no results yet" in out


# ---------------------------------------------------------------------------
# Command line errors and the registry's own checks
# ---------------------------------------------------------------------------


def test_an_unknown_experiment_is_refused_with_the_known_names(toy, capsys):
    toy()
    assert cli(["experiments", "run", "dora-vs-lora"]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'dora-vs-lora'" in err and "03-dora-vs-lora" in err and "toy" in err
    with pytest.raises(experiments.UnknownExperimentError, match="Known experiments: .*02-lora-rank"):
        experiments.summarise("nope")


@pytest.mark.parametrize("seeds", ["0", "1", "-3", "abc", "2.5"])
def test_bad_seeds_are_refused_with_what_to_give(toy, capsys, seeds):
    t = toy()
    with pytest.raises(SystemExit) as exit_:
        cli(["experiments", "run", "toy", "--seeds", seeds])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--seeds" in err and ("at least 2" in err or "whole number" in err)
    assert not t.calls
    with pytest.raises(ValueError, match="at least 2|whole number"):
        experiments.run("toy", int(seeds) if seeds.lstrip("-").isdigit() else seeds, log=quiet)


def test_the_registry_refuses_experiments_it_could_not_report():
    arm = Arm("A", lambda s, q: 0.0)
    other = Arm("B", lambda s, q: 0.0)
    budget = Budget(1, 1, 1)
    with pytest.raises(ValueError, match="two different arms"):
        Experiment("x", "00", "m", arms=(arm, other), verdict=("A", "C"), budget=budget)
    with pytest.raises(ValueError, match="at least two arms"):
        Experiment("x", "00", "m", arms=(arm,), verdict=("A", "A"), budget=budget)
    with pytest.raises(ValueError, match="clashing folder names"):
        Experiment("x", "00", "m", arms=(arm, Arm("a", lambda s, q: 0.0)), verdict=("A", "a"), budget=budget)
    with pytest.raises(ValueError, match="names a folder"):
        Experiment("X Y", "00", "m", arms=(arm, other), verdict=("A", "B"), budget=budget)
    with pytest.raises(ValueError, match="already registered"):
        experiments.register(experiments.get("03-dora-vs-lora"))


def test_the_chapters_experiments_are_registered_with_five_seeds():
    chapters = {e.chapter[:2] for e in experiments.EXPERIMENTS.values()}
    assert {"02", "03", "04", "05", "06", "07"} <= chapters
    for e in experiments.EXPERIMENTS.values():
        if e.chapter[:2] in ("06", "07"):
            assert e.seeds >= 5 and all(e.arm(a) for a in e.verdict) and e.description, e.name
    for name in ("02-lora-rank", "03-dora-vs-lora", "04-olora-vs-lora-lr-2e-4", "04-olora-vs-lora-lr-2e-3",
                 "05-nola-vs-lora"):
        e = experiments.get(name)
        assert e.seeds == 5 and e.higher_is_better and e.metric == "held-out exact match"
        assert all(e.arm(a) for a in e.verdict)
    assert experiments.get("04-olora-vs-lora-lr-2e-4").arm("OLoRA").settings["lr"] == 2e-4
    assert experiments.get("04-olora-vs-lora-lr-2e-3").arm("LoRA").settings["lr"] == 2e-3
    assert experiments.get("03-dora-vs-lora").arm("DoRA").settings["r"] == 2


def test_list_json_from_a_fresh_process_has_exactly_the_contract_keys(tmp_path):
    env = {**os.environ, "COURSE_RESULTS": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "course", "experiments", "list", "--json"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(result.stdout)
    assert {row["name"] for row in rows} >= {"02-lora-rank", "03-dora-vs-lora", "05-nola-vs-lora"}
    assert {row["chapter"][:2] for row in rows} >= {"02", "03", "04", "05", "06", "07"}
    assert all(set(row) == CONTRACT_KEYS for row in rows)


# ---------------------------------------------------------------------------
# The real arms, at the quick budget, on a tiny random Llama (the code path, not results)
# ---------------------------------------------------------------------------


def test_each_kind_of_real_arm_trains_and_scores_on_a_tiny_model(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("COURSE_MODEL", str(tiny_model_dir))
    chosen = {("02-lora-rank", "LoRA r=8"), ("03-dora-vs-lora", "DoRA"), ("04-olora-vs-lora-lr-2e-3", "OLoRA"),
              ("05-nola-vs-lora", "NOLA K=256"), ("05-nola-vs-lora", "VeRA r=256")}
    for name, arm in sorted(chosen):
        value = experiments.get(name).arm(arm).run(0, True)
        assert isinstance(value, float) and 0.0 <= value <= 1.0
        assert value * experiments.QUICK.eval_examples == round(value * experiments.QUICK.eval_examples)
    import torch

    from course.experiments.addition import context, top_half
    from course.lora import lora_layers
    from course.models import load_base_model

    _, base, _ = context()
    assert base.config.hidden_size == 64  # the tiny model (conftest.make_tiny_model), not the real one
    blocks = base.config.num_hidden_layers
    assert top_half(base) and {int(name.split(".")[2]) for name in top_half(base)} == set(range(blocks // 2, blocks))
    assert not lora_layers(base)  # each arm trained a copy: OLoRA's residual did not reach the shared base
    fresh = load_base_model(progress=False)
    assert all(torch.equal(p, q) for p, q in zip(base.parameters(), fresh.parameters(), strict=True))


def test_an_arm_imports_only_modules_its_fingerprint_covers(tiny_model_dir, tiny_adapters_dir):
    """The fingerprint leaves out the machinery (store.MACHINERY): an arm must not run any of it, or a
    change there would change results that are still called current."""
    code = ("import sys; from pathlib import Path; from course import experiments; from course.experiments import store\n"
            "for name, arm in (('02-lora-rank', 'LoRA r=8'), ('03-dora-vs-lora', 'DoRA'),\n"
            "                  ('04-olora-vs-lora-lr-2e-3', 'OLoRA'), ('05-nola-vs-lora', 'NOLA K=256'),\n"
            "                  ('05-nola-vs-lora', 'VeRA r=256'), ('06-ties-vs-task-arithmetic-addition', 'TIES d=0.5'),\n"
            "                  ('06-dare-density-pirate', 'DARE d=0.05'), ('07-sft', 'base model'),\n"
            "                  ('07-grpo', 'SFT + DPO + GRPO'), ('07-dpo', 'SFT + DPO'),\n"
            "                  ('07-lr-rule', 'full fine-tuning lr 5e-5')):\n"
            "    experiments.get(name).arm(arm).run(0, True)\n"
            "files = [Path(m.__file__).relative_to(store.PACKAGE).as_posix() for n, m in list(sys.modules.items())\n"
            "         if n.split('.')[0] == 'course' and getattr(m, '__file__', None)]\n"
            "print('\\n'.join(f for f in files if not store.fingerprinted(f)))")
    env = {**os.environ, "COURSE_MODEL": str(tiny_model_dir), "COURSE_ADAPTERS": str(tiny_adapters_dir),
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [], f"arms import machinery the fingerprint leaves out: {done.stdout.split()}"


def test_each_kind_of_chapter_06_and_07_arm_runs_and_scores_on_a_tiny_model(tiny_model_dir, tiny_adapters_dir,
                                                                           monkeypatch):
    """One arm of each new kind at the quick budget: merges scored on additions and on pirate speech, and
    TRL's SFT, DPO and GRPO (chained: each stage's model is reused by the next arm of the same seed) and
    section 2's short SFT runs."""
    import math

    monkeypatch.setenv("COURSE_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("COURSE_ADAPTERS", str(tiny_adapters_dir))
    n = experiments.QUICK.eval_examples
    fractions = {("06-ties-vs-task-arithmetic-addition", "TIES d=0.5"): n, ("06-dare-density-pirate", "DARE d=0.05"): n,
                 ("06-dare-addition-alone", "adapter merged"): n, ("07-sft", "SFT (LoRA)"): n,
                 ("07-dpo", "SFT + DPO"): n // 2}
    for (name, arm), count in fractions.items():
        value = experiments.get(name).arm(arm).run(0, True)
        assert isinstance(value, float) and 0.0 <= value <= 1.0, (name, arm, value)
        assert value * count == pytest.approx(round(value * count)), (name, arm, value)  # a share of `count`
    reward = experiments.get("07-grpo").arm("SFT + DPO + GRPO").run(0, True)
    assert isinstance(reward, float) and 0.0 <= reward <= 2.0  # right sum + bare number
    loss = experiments.get("07-lr-rule").arm("LoRA lr 0.002 (40x, the course's)").run(0, True)
    assert isinstance(loss, float) and math.isfinite(loss) and loss > 0


def test_each_stage_of_chapter_07s_chain_computes_with_its_own_weights(tiny_model_dir, monkeypatch):
    """A trained model carries the trainer's ``forward`` wrapper on the instance; through it a deep copy
    computed with the original's weights, so DPO and GRPO scored exactly as the models they started from
    (found in the shipped sweep: every seed equal). Each stage must change the logits of the one before."""
    import torch

    from course.experiments import rlhf

    monkeypatch.setenv("COURSE_MODEL", str(tiny_model_dir))
    rlhf._STAGES.clear()
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    sft = rlhf.sft_model(0, True)
    before = {k: v.clone() for k, v in sft.state_dict().items()}
    logits = {}
    with torch.no_grad():
        logits["sft"] = sft(ids).logits
    dpo = rlhf.dpo_model(0, True)
    with torch.no_grad():
        logits["dpo"] = dpo(ids).logits
    grpo = rlhf.grpo_model(0, True)
    with torch.no_grad():
        logits["grpo"] = grpo(ids).logits
    assert "forward" not in vars(sft) and "forward" not in vars(dpo)
    assert all(torch.equal(v, sft.state_dict()[k]) for k, v in before.items())  # DPO trained a copy
    assert not torch.allclose(logits["dpo"], logits["sft"]), "the DPO model computes what the SFT model does"
    # A random tiny model earns no reward, so GRPO's advantages are 0 and it learns nothing here: check instead
    # that the GRPO model computes with its own weights (and not through a wrapper of the DPO model's).
    assert "forward" not in vars(grpo) and "forward" not in vars(grpo.get_base_model())
    with torch.no_grad():
        grpo.get_base_model().lm_head.weight.mul_(2.0)
        assert not torch.allclose(grpo(ids).logits, logits["grpo"])
        assert torch.equal(dpo(ids).logits, logits["dpo"])
    rlhf._STAGES.clear()


def test_merges_draw_dares_masks_from_the_seed_and_nothing_else(tiny_model_dir, tiny_adapters_dir, monkeypatch):
    import torch

    from course.experiments.merging import deltas, merged_model

    monkeypatch.setenv("COURSE_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("COURSE_ADAPTERS", str(tiny_adapters_dir))
    layers = deltas()
    assert {a for by in layers.values() for a in by} == {"addition", "pirate"}
    name = next(n for n, by in layers.items() if len(by) == 2)  # a layer both adapters change

    def weight(method, density, seed, adapters=("addition", "pirate")):
        torch.manual_seed(seed)
        return merged_model(method, density, adapters).get_submodule(name).weight.detach().clone()

    base = weight("sum", 0.5, 0, ())
    total = layers[name]["addition"] + layers[name]["pirate"]
    assert torch.allclose(weight("sum", 0.5, 0) - base, total, atol=1e-6)
    assert torch.equal(weight("ties", 0.5, 0), weight("ties", 0.5, 1))
    assert not torch.equal(weight("dare", 0.05, 0), weight("dare", 0.05, 1))
    assert torch.equal(weight("dare", 0.05, 3), weight("dare", 0.05, 3))
    kept = (weight("dare", 0.05, 0, ("addition",)) - base != 0).float().mean().item()
    assert 0.02 < kept < 0.1  # about 5 % of the entries survive
    with pytest.raises(ValueError, match="unknown merge method 'mean'"):
        merged_model("mean", 0.5)


def test_the_merges_score_held_out_additions_in_disjoint_blocks_one_per_seed():
    from course.adapters.recipes import RECIPES
    from course.data import addition_pairs
    from course.experiments.merging import addition_sample

    recipe = RECIPES["addition"]
    trained = {f"What is {a}+{b}? Reply with the number only." for a, b in
               addition_pairs(recipe.n_train, recipe.n_eval, recipe.seed)[0]}
    blocks = [addition_sample(seed, 64) for seed in range(5)]
    prompts = [p for block, _ in blocks for p in block]
    assert len(prompts) == len(set(prompts)) == 320 and not trained & set(prompts)
    for block, answers in blocks:
        for prompt, answer in zip(block, answers, strict=True):
            a, b = prompt.split()[2].rstrip("?").split("+")
            assert int(a) + int(b) == int(answer)
    assert addition_sample(2, 64) == blocks[2]


def test_chapter_07s_experiments_use_the_notebooks_cpu_budget(monkeypatch):
    from course.experiments.rlhf import rlhf_budget
    from course.rlhf import rlhf_budget as notebook_budget

    monkeypatch.delenv("COURSE_QUICK", raising=False)
    assert rlhf_budget(False) == notebook_budget("cpu")
    quick = rlhf_budget(True)
    assert quick.sft_steps == quick.dpo_steps == quick.grpo_steps == experiments.QUICK.steps
    lr = experiments.get("07-lr-rule")
    assert not lr.higher_is_better and lr.verdict == ("LoRA lr 0.002 (40x, the course's)", "LoRA lr 5e-4 (10x)")
    assert sorted(arm.settings["lr"] for arm in lr.arms) == [5e-5, 5e-5, 5e-4, 2e-3]
