"""Running an experiment: only the (arm, seed) cells not yet done, each saved as soon as it finishes.

``run(name, seeds=5)`` makes sure seeds 0 to ``seeds - 1`` of every arm have a result made by the
running code (``store.code_fingerprint``). Cells already stored, in your folder or among the
shipped results, are reused; the others run seed by seed (every arm of seed 0, then of seed 1,
...), so that a run stopped halfway leaves whole seeds behind, and each result is written
atomically the moment its arm returns. A lock on the experiment's folder keeps two runs of the
same experiment from writing at once. ``python -m course experiments run NAME`` calls this.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from course.experiments import store
from course.experiments.registry import QUICK, get


class ExperimentBusyError(RuntimeError):
    """Another run of the same experiment holds its folder's lock."""


class StaleResultsError(RuntimeError):
    """The folder to write holds results made by other code, and replacing them was not asked for."""


def check_seeds(seeds) -> int:
    """``seeds`` as an int of at least 2, or a clear error."""
    if isinstance(seeds, bool) or not isinstance(seeds, int):
        try:
            if isinstance(seeds, bool) or float(seeds) != int(seeds):
                raise ValueError
            seeds = int(seeds)
        except (TypeError, ValueError):
            raise ValueError(f"seeds must be a whole number (runs seeds 0 to N-1); got {seeds!r}") from None
    if seeds < 2:
        raise ValueError(f"seeds={seeds}: an interval needs at least 2 seeds (the course's verdicts use 5); "
                         "seeds N runs seeds 0 to N-1")
    return seeds


@dataclass
class RunReport:
    """What ``run`` did: the results it made, those it reused, and where it wrote."""

    experiment: str
    budget: str
    seeds: int
    folder: Path
    ran: list[store.Result] = field(default_factory=list)
    reused: list[store.Result] = field(default_factory=list)


def _provenance() -> dict:
    import torch

    from course.device import cpu_model, default_device, default_dtype

    device = default_device()
    name = device.type
    if device.type == "cuda":
        name = f"cuda ({torch.cuda.get_device_name(device)})"
    elif device.type == "cpu":
        name = f"cpu ({torch.get_num_threads()} threads)"
    return {"device": name, "dtype": str(default_dtype(device)).removeprefix("torch."), "processor": cpu_model(),
            "torch": torch.__version__}


def _writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise store.StoreError(f"cannot create {folder} ({exc.strerror}): set COURSE_RESULTS to a folder "
                               "you can write to") from None
    if not os.access(folder, os.W_OK):
        raise store.StoreError(f"cannot write to {folder}: set COURSE_RESULTS to a folder you can write to")


def run(name, seeds: int | None = None, *, quick: bool = False, ship: bool = False, replace_stale: bool = False,
        lock_timeout: float = 0, log=print) -> RunReport:
    """Run (or complete) experiment ``name`` for seeds 0 to ``seeds - 1`` (default: its own number, 5).

    ``quick``: the smallest budget, stored apart from the full one (a smoke test of the code path).
    ``ship``: write into the package's shipped results (for the course's maintainers) instead of
    your own folder (``COURSE_RESULTS``). ``replace_stale``: overwrite results in that folder made
    by other code; without it such results stop the run before anything trains.
    ``lock_timeout``: seconds to wait for another run of the same experiment (0: fail at once).
    """
    from filelock import FileLock, Timeout

    experiment = get(name)
    seeds = experiment.seeds if seeds is None else check_seeds(seeds)
    if ship and quick:
        raise ValueError("quick results are smoke tests and are not shipped: drop --quick or --ship")
    budget = "quick" if quick else "full"
    target = store.SHIPPED if ship else store.own_dir()
    _writable(target / experiment.name)
    lock = FileLock(str(target / experiment.name / ".lock"), timeout=lock_timeout)
    try:
        lock.acquire()
    except Timeout:
        raise ExperimentBusyError(f"another run of {experiment.name!r} is writing to {target / experiment.name} "
                                  f"(it holds {lock.lock_file}); wait for it to finish") from None
    try:
        report = RunReport(experiment.name, budget, seeds, target)
        fingerprint = store.code_fingerprint()
        stored = store.results(experiment, budget)
        todo, stale = [], []
        for seed in range(seeds):
            for arm in experiment.arms:
                entries = stored.get((arm.name, seed), [])
                current = [result for result, _ in entries if result.fingerprint == fingerprint]
                if current:
                    report.reused.append(current[0])
                    continue
                stale += [path for _, path in entries if path.resolve().is_relative_to(target.resolve())]
                todo.append((seed, arm))
        if stale and not replace_stale:
            raise StaleResultsError(
                f"{len(stale)} result(s) of {experiment.name!r} in {target} were made by other code "
                f"(e.g. {stale[0]}); `experiments list` reports them as stale. Replace them with --replace-stale "
                "(replace_stale=True), or keep them and write elsewhere by setting COURSE_RESULTS.")
        if todo:
            log(f"{experiment.name}: {len(todo)} run(s) to do, {len(report.reused)} reused "
                f"({budget} budget: {QUICK if quick else experiment.budget}); writing to {target}")
        else:
            log(f"{experiment.name}: all {len(report.reused)} result(s) of seeds 0-{seeds - 1} already there "
                f"({budget} budget)")
        provenance = _provenance()
        used = QUICK if quick else experiment.budget
        budget_numbers = {"steps": used.steps, "batch_size": used.batch_size, "eval_examples": used.eval_examples}
        for seed, arm in todo:
            start = time.perf_counter()
            value = arm.run(seed, quick)
            seconds = time.perf_counter() - start
            settings = {**arm.settings, **budget_numbers}
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"arm {arm.name!r} of {experiment.name!r} returned {value!r} for seed {seed}; "
                                "an arm returns one finite number, the metric")
            result = store.Result(experiment=experiment.name, arm=arm.name, seed=seed, metric=experiment.metric,
                                  value=float(value), budget=budget, fingerprint=fingerprint,
                                  seconds=round(seconds, 3), date=store.now(), settings=settings,
                                  **provenance)
            path = store.write(target, result, arm.slug)
            report.ran.append(result)
            log(f"  {arm.name}, seed {seed}: {experiment.metric} {value:.4g} ({seconds:.0f} s) -> {path.name}")
        return report
    finally:
        lock.release()
