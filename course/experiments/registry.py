"""The named experiments: what each notebook compares, with its arms, metric, budget and seeds.

An ``Experiment`` is data: a name, the chapter (notebook) that reports it, the metric, its arms,
the budget each arm trains with, how many seeds make a verdict (5 by default), and which pair
of arms the chapter's verdict is about (``verdict = (a, b)``: the difference is ``a - b``).
Each ``Arm`` is a function ``(seed, quick) -> value`` of the metric: ``quick=True`` runs the
smallest budget (a smoke test of the code path, never a result).

``register`` adds one to ``EXPERIMENTS``; ``get(name)`` finds it, or says which names exist.
The course's own experiments are defined in ``course.experiments.addition``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_SEEDS = 5
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def slug(text: str) -> str:
    """A folder name for an arm: ``"LoRA r=2"`` -> ``"lora-r-2"``."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "arm"


@dataclass(frozen=True)
class Budget:
    """The work one arm does for one seed: training steps and batch, held-out questions scored."""

    steps: int
    batch_size: int
    eval_examples: int

    def __str__(self) -> str:
        return f"{self.steps} steps of batch {self.batch_size}, {self.eval_examples} held-out questions"


#: ``--quick``: the smallest budget that still runs every line of an arm (a smoke test, never a result).
QUICK = Budget(steps=2, batch_size=4, eval_examples=8)


@dataclass(frozen=True)
class Arm:
    """One side of a comparison: a name and ``run(seed, quick) -> float`` (the metric for that seed)."""

    name: str
    run: Callable[[int, bool], float]
    settings: dict = field(default_factory=dict)  # what distinguishes it (rank, lr, ...), stored with each result

    @property
    def slug(self) -> str:
        return slug(self.name)


@dataclass(frozen=True)
class Experiment:
    """A comparison a chapter reports (see the module's docstring)."""

    name: str
    chapter: str
    metric: str
    arms: tuple[Arm, ...]
    verdict: tuple[str, str]  # (a, b): the chapter's verdict is about mean(a) - mean(b)
    budget: Budget
    seeds: int = DEFAULT_SEEDS
    higher_is_better: bool = True
    description: str = ""

    def __post_init__(self):
        if not _NAME.match(self.name):
            raise ValueError(f"experiment name {self.name!r}: use lower-case letters, digits, '.', '_' and '-' "
                             "(it names a folder)")
        object.__setattr__(self, "arms", tuple(self.arms))
        names = [arm.name for arm in self.arms]
        if len(names) < 2:
            raise ValueError(f"experiment {self.name!r} needs at least two arms to compare; it has {names}")
        slugs = [arm.slug for arm in self.arms]
        if len(set(slugs)) != len(slugs):
            raise ValueError(f"experiment {self.name!r}: arm names {names} give clashing folder names {slugs}; "
                             "make them differ in letters or digits")
        a, b = self.verdict
        if a == b or a not in names or b not in names:
            raise ValueError(f"experiment {self.name!r}: verdict={self.verdict!r} must name two different arms "
                             f"of {names}")
        if self.seeds < 2:
            raise ValueError(f"experiment {self.name!r}: seeds={self.seeds}; an interval needs at least 2")

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(f"experiment {self.name!r} has no arm {name!r}; its arms: {[a.name for a in self.arms]}")


EXPERIMENTS: dict[str, Experiment] = {}


def register(experiment: Experiment, *, replace: bool = False) -> Experiment:
    """Add ``experiment`` to ``EXPERIMENTS`` (an existing name is refused unless ``replace``)."""
    if experiment.name in EXPERIMENTS and not replace:
        raise ValueError(f"an experiment named {experiment.name!r} is already registered")
    EXPERIMENTS[experiment.name] = experiment
    return experiment


def unregister(name: str) -> None:
    EXPERIMENTS.pop(name, None)


class UnknownExperimentError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


def get(name: str) -> Experiment:
    """The experiment called ``name``; an unknown name is refused with the list of known ones."""
    if isinstance(name, Experiment):
        return name
    try:
        return EXPERIMENTS[name]
    except KeyError:
        known = ", ".join(sorted(EXPERIMENTS)) or "none"
        raise UnknownExperimentError(f"unknown experiment {name!r}. Known experiments: {known} "
                                     "(python -m course experiments list)") from None
