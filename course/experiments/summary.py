"""What the stored results say: each arm's mean and interval, and the verdict's difference.

``summarise(name)`` gathers an experiment's results (``store.results``), keeps one code version
(the running code's results, else the largest set made by one earlier version, marked stale: never
a mix), keeps the seeds that every arm has finished, and computes each arm's Student-t interval
(``course.evidence.interval``) and the difference of the verdict's two arms
(``course.evidence.compare``, paired: the arms share seeds). ``Summary.to_json()`` has exactly the
keys of ``python -m course experiments list --json``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from course.evidence import Comparison, compare, interval
from course.experiments import store
from course.experiments.registry import EXPERIMENTS, Experiment, get


@dataclass(frozen=True)
class ArmSummary:
    name: str
    values: tuple[float, ...]  # one per seed, in the order of Summary.seed_list
    mean: float | None
    low: float | None  # None below 2 seeds
    high: float | None


@dataclass(frozen=True)
class Summary:
    experiment: Experiment
    budget: str
    seed_list: tuple[int, ...]  # seeds finished by every arm
    arms: tuple[ArmSummary, ...]
    comparison: Comparison | None  # None below 2 seeds
    fingerprint: str | None  # the code version of the results used
    stale: bool  # made by code other than the running one
    left_out: int = 0  # results not used: seeds some arm lacks, or another code version's
    orphans: int = 0  # results of arms no longer in the experiment
    devices: tuple[str, ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        return self.experiment.name

    @property
    def seeds(self) -> int:
        return len(self.seed_list)

    @property
    def decided(self) -> bool:
        return bool(self.comparison and self.comparison.decided)

    @property
    def better(self) -> str | None:
        return self.comparison.better if self.comparison else None

    def to_json(self) -> dict:
        """The contract's keys: name, chapter, metric, seeds, arms, difference, decided, better."""
        return {
            "name": self.name,
            "chapter": self.experiment.chapter,
            "metric": self.experiment.metric,
            "seeds": self.seeds,
            "arms": [{"name": a.name, "mean": a.mean, "low": a.low, "high": a.high} for a in self.arms],
            "difference": {"low": self.comparison.low if self.comparison else None,
                           "high": self.comparison.high if self.comparison else None},
            "decided": self.decided,
            "better": self.better,
        }


def _choose(found, current: str) -> tuple[str | None, dict]:
    """The code version to report and its results by (arm, seed): the current one when present,
    else the version with the most results (the newest on a tie). Your folder wins within one."""
    by_version: dict[str, dict] = {}
    for cell, entries in found.items():
        for result, _ in entries:  # yours first: setdefault keeps it
            by_version.setdefault(result.fingerprint, {}).setdefault(cell, result)
    if not by_version:
        return None, {}
    if current in by_version:
        return current, by_version[current]
    version = max(by_version, key=lambda v: (len(by_version[v]), max(r.date for r in by_version[v].values())))
    return version, by_version[version]


def summarise(name, *, quick: bool = False) -> Summary:
    """The summary of experiment ``name`` from its stored results (``quick``: the quick-budget ones)."""
    experiment = get(name)
    budget = "quick" if quick else "full"
    found = store.results(experiment, budget)
    current = store.code_fingerprint()
    version, cells = _choose(found, current)
    counts = Counter(seed for _, seed in cells)
    seed_list = tuple(sorted(seed for seed, n in counts.items() if n == len(experiment.arms)))
    arms = []
    for arm in experiment.arms:
        values = tuple(cells[arm.name, seed].value for seed in seed_list)
        if len(values) >= 2:
            mean, low, high = interval(values)
        else:
            mean, low, high = (values[0] if values else None), None, None
        arms.append(ArmSummary(arm.name, values, mean, low, high))
    comparison = None
    if len(seed_list) >= 2:
        a, b = experiment.verdict
        by_name = {arm.name: arm for arm in arms}
        comparison = compare(by_name[a].values, by_name[b].values, names=(a, b), paired=True,
                             higher_is_better=experiment.higher_is_better)
    used = len(seed_list) * len(experiment.arms)
    total = sum(1 for entries in found.values() for _ in entries[:1])
    devices = tuple(sorted({cells[arm.name, seed].device for arm in experiment.arms for seed in seed_list}))
    return Summary(experiment, budget, seed_list, tuple(arms), comparison, version,
                   stale=version is not None and version != current, left_out=total - used,
                   orphans=len(store.orphans(experiment, budget)), devices=devices)


def summarise_all(*, quick: bool = False) -> list[Summary]:
    """Every registered experiment's summary, by chapter, in the order they were registered."""
    ordered = sorted(EXPERIMENTS.values(), key=lambda e: e.chapter)  # stable: registration order within one
    return [summarise(e, quick=quick) for e in ordered]


def _number(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def describe(summary: Summary) -> str:
    """A few lines of text for ``experiments list``."""
    e = summary.experiment
    head = f"{e.name} ({e.chapter}): {e.metric}, {summary.seeds} of {e.seeds} seeds"
    if summary.budget == "quick":
        head += ", QUICK budget (a smoke test, not a result)"
    lines = [head]
    if summary.fingerprint is None:
        lines.append(f"  no results yet: python -m course experiments run {e.name}"
                     + (" --quick" if summary.budget == "quick" else ""))
        return "\n".join(lines)
    if summary.stale:
        quick = " --quick" if summary.budget == "quick" else ""
        lines.append(f"  STALE: made by code {summary.fingerprint[:12]}, the code is now "
                     f"{store.code_fingerprint()[:12]}; rerun with python -m course experiments run {e.name}{quick} "
                     "(add --replace-stale where they are your own)")
    width = max(len(a.name) for a in summary.arms)
    for a in summary.arms:
        span = f" [{_number(a.low)}, {_number(a.high)}]" if a.low is not None else ""
        lines.append(f"  {a.name:<{width}}  {_number(a.mean)}{span}")
    if summary.comparison is not None:
        lines.append(f"  {summary.comparison.verdict}")
    elif summary.seeds < 2:
        lines.append("  fewer than 2 seeds finished by every arm: no interval yet")
    notes = []
    if summary.left_out:
        notes.append(f"{summary.left_out} result(s) left out (seeds not finished by every arm, or other code)")
    if summary.orphans:
        notes.append(f"{summary.orphans} result(s) of arms no longer in the experiment ignored")
    if summary.devices:
        notes.append("on " + ", ".join(summary.devices))
    if notes:
        lines.append("  (" + "; ".join(notes) + ")")
    return "\n".join(lines)
