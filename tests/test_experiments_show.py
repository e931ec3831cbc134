"""course.experiments.show: a chapter's shipped sweep beside its live run, and the shipped results themselves.

The first tests use a toy experiment (cheap seeded arms, results in temporary folders). The last ones
read the results shipped in the package: every chapter 02-07 experiment must have five seeds made by
the code as it is now (a change to a fingerprinted module makes them stale: rerun the sweeps with
``python -m course experiments run NAME --ship``), and ``decided``/``better`` must follow the intervals.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from course import experiments  # noqa: E402
from course.experiments import store  # noqa: E402
from course.experiments.show import NoResultsError, lines, show  # noqa: E402
from tests.test_experiments import folders, quiet, toy  # noqa: E402, F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent


def test_show_prints_each_arms_interval_its_seeds_the_live_value_and_the_verdict(toy, capsys):  # noqa: F811
    toy(offsets=(1.0, 0.0), spread=0.1)
    experiments.run("toy", 5, ship=True, log=quiet)
    summary = show("toy", live={"A": 0.75}, plot=False)
    out = capsys.readouterr().out.splitlines()
    a, b = summary.arms
    assert out[0].startswith("toy: score, 5 seeds shipped")
    assert out[1].split()[:2] == ["A", f"{a.mean:.3f}"] and f"[{a.low:.3f}, {a.high:.3f}]" in out[1]
    assert "; this run 0.750" in out[1] and "this run" not in out[2]
    assert ", ".join(f"{v:.3f}" for v in b.values).replace("-", "\u2212") in out[2]
    assert out[3].strip() == summary.comparison.verdict and summary.better == "A"


def test_show_says_when_results_are_stale(toy, monkeypatch):  # noqa: F811
    toy()
    experiments.run("toy", 3, ship=True, log=quiet)
    monkeypatch.setattr(store, "code_fingerprint", lambda: "another version")
    text = "\n".join(lines(experiments.summarise("toy")))
    assert "earlier version of the course's code" in text and "experiments run toy" in text


def test_show_without_results_says_how_to_make_them(toy):  # noqa: F811
    toy()
    with pytest.raises(NoResultsError, match="python -m course experiments run toy"):
        show("toy", plot=False)


def test_live_values_for_an_arm_the_experiment_lacks_are_refused(toy):  # noqa: F811
    toy()
    experiments.run("toy", 2, ship=True, log=quiet)
    with pytest.raises(KeyError, match="not arms of 'toy'"):
        show("toy", live={"C": 1.0}, plot=False)


def test_show_draws_one_row_per_arm_with_its_seeds_interval_and_the_live_cross(toy):  # noqa: F811
    toy()
    experiments.run("toy", 4, ship=True, log=quiet)
    fig, ax = plt.subplots()
    summary = show("toy", live={"B": 0.5}, ax=ax)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["A", "B"]
    from matplotlib.collections import PathCollection

    points = [c for c in ax.collections if isinstance(c, PathCollection)]
    dots = [c for c in points if c.get_offsets().shape[0] == 4]
    assert len(dots) == 2  # the seeds of each arm
    crosses = [c for c in points if c.get_offsets().shape[0] == 1]
    assert len(crosses) == 1 and tuple(crosses[0].get_offsets()[0]) == (0.5, 1.0)
    bars = [line for line in ax.lines if line.get_marker() == "o"]  # the means (the caps are other markers)
    assert sorted(line.get_xdata()[0] for line in bars) == sorted(arm.mean for arm in summary.arms)
    plt.close(fig)


def test_show_is_machinery_outside_the_results_fingerprint():
    assert not store.fingerprinted("experiments/show.py")
    assert store.fingerprinted("experiments/summary.py") and store.fingerprinted("models.py")


# ---------------------------------------------------------------------------
# The shipped results
# ---------------------------------------------------------------------------

CHAPTERS = ("02", "03", "04", "05", "06", "07")


@pytest.fixture(scope="module")
def listed(tmp_path_factory):
    env = {**os.environ, "COURSE_RESULTS": str(tmp_path_factory.mktemp("own")), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "course", "experiments", "list", "--json"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_every_chapter_02_to_07_has_shipped_experiments_with_five_current_seeds(listed):
    by_chapter = {}
    for entry in listed:
        by_chapter.setdefault(entry["chapter"][:2], []).append(entry)
    assert set(CHAPTERS) <= set(by_chapter)
    short = [(e["name"], e["seeds"]) for e in listed if e["chapter"][:2] in CHAPTERS and e["seeds"] < 5]
    assert not short, (f"experiments with fewer than 5 current seeds: {short}. After changing a module the results "
                       "depend on, rerun: python -m course experiments run NAME --ship")
    for entry in listed:
        for arm in entry["arms"]:
            assert arm["low"] <= arm["mean"] <= arm["high"], (entry["name"], arm)


def test_decided_and_better_follow_each_shipped_interval(listed):
    for entry in listed:
        low, high = entry["difference"]["low"], entry["difference"]["high"]
        assert entry["decided"] == (low > 0 or high < 0), entry["name"]
        experiment = experiments.get(entry["name"])
        a, b = experiment.verdict
        if not entry["decided"]:
            assert entry["better"] is None, entry["name"]
        else:
            a_ahead = low > 0
            assert entry["better"] == (a if a_ahead == experiment.higher_is_better else b), entry["name"]


def test_the_readme_table_is_the_one_the_shipped_results_give():
    from course.experiments.show import README_END, README_START, readme_block

    text = (ROOT / "README.md").read_text()
    assert README_START in text and README_END in text
    shown = text[text.index(README_START): text.index(README_END) + len(README_END)]
    assert shown == readme_block(), ("README's table differs from the shipped results: "
                                     "python -m course experiments table --readme")


def test_the_table_command_writes_between_the_markers_and_keeps_the_rest(toy, tmp_path):  # noqa: F811
    from course.__main__ import main as cli
    from course.experiments.show import README_END, README_START

    toy()
    experiments.run("toy", 3, ship=True, log=quiet)
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n\n{README_START}\nold table\n{README_END}\n\nafter\n")
    assert cli(["experiments", "table", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n\n") and text.endswith("\n\nafter\n") and "old table" not in text
    assert "| 00 | `toy`" in text and experiments.summarise("toy").comparison.verdict in text
    unmarked = tmp_path / "OTHER.md"
    unmarked.write_text("no markers")
    assert cli(["experiments", "table", "--readme", str(unmarked)]) == 2
    assert unmarked.read_text() == "no markers"


def test_the_budget_in_words_leaves_out_what_an_arm_does_not_do():
    from course.experiments.registry import Budget
    from course.experiments.show import budget_text

    assert budget_text(Budget(6, 8, 32)) == "6 steps of batch 8, 32 held-out questions"
    assert budget_text(Budget(0, 0, 64)) == "no training, 64 held-out questions"  # a merge
    assert budget_text(Budget(6, 8, 0)) == "6 steps of batch 8"  # a training-loss curve


def test_negative_numbers_in_a_rows_interval_use_the_verdicts_minus_sign(toy, capsys):  # noqa: F811
    toy(offsets=(-1.0, 0.0), spread=0.1)
    experiments.run("toy", 3, ship=True, log=quiet)
    show("toy", plot=False)
    row = capsys.readouterr().out.splitlines()[1]
    assert row.split()[1].startswith("\u2212") and "-" not in row  # arm A, near -1: mean, interval, seeds
