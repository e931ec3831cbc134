"""Experiments are data: every comparison a notebook reports, by name, with its stored results.

- ``registry``: ``Experiment`` and ``Arm`` (chapter, metric, arms, budget, seeds, the verdict's pair),
  ``EXPERIMENTS``, ``get(name)``;
- ``store``: one JSON file per (arm, seed) with its provenance, shipped in the package or your own
  (``COURSE_RESULTS``), and the code fingerprint that tells current results from stale ones;
- ``runner``: ``run(name, seeds=5, quick=False)`` runs only the cells not yet done;
- ``summary``: ``summarise(name)``, each arm's interval and the verdict (``course.evidence``);
- ``addition``: the chapters' experiments (notebooks 02-05); ``merging``: notebook 06's merges (addition and
  pirate adapters); ``rlhf``: notebook 07's SFT, DPO and GRPO before and after, and its learning-rate rule;
- ``cli``: ``python -m course experiments list [--json]`` and ``run NAME [--seeds N] [--quick]``.

In a notebook::

    from course import experiments
    experiments.run("03-dora-vs-lora", seeds=5)      # reuses every seed already stored
    print(experiments.summarise("03-dora-vs-lora").comparison.verdict)
"""

from course.experiments import addition, merging, rlhf  # noqa: F401  (register the chapters' experiments)
from course.experiments.registry import (
    DEFAULT_SEEDS,
    EXPERIMENTS,
    QUICK,
    Arm,
    Budget,
    Experiment,
    UnknownExperimentError,
    get,
    register,
    unregister,
)
from course.experiments.runner import (
    ExperimentBusyError,
    RunReport,
    StaleResultsError,
    check_seeds,
    run,
)
from course.experiments.store import Result, StoreError, code_fingerprint
from course.experiments.summary import Summary, describe, summarise, summarise_all

__all__ = [
    "DEFAULT_SEEDS",
    "EXPERIMENTS",
    "QUICK",
    "Arm",
    "Budget",
    "Experiment",
    "ExperimentBusyError",
    "Result",
    "RunReport",
    "StaleResultsError",
    "StoreError",
    "Summary",
    "UnknownExperimentError",
    "check_seeds",
    "code_fingerprint",
    "describe",
    "get",
    "register",
    "run",
    "summarise",
    "summarise_all",
    "unregister",
]
