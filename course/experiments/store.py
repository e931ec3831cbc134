"""Per-seed results on disk, one JSON file each, with their provenance.

Layout: ``<folder>/<experiment>/<budget>/<arm>/seed-<n>.json`` (budget ``full`` or ``quick``;
the arm as a folder name, ``"LoRA r=2"`` -> ``lora-r-2``). Each file holds the metric's value and
where it came from: the code fingerprint, seed, arm, device, dtype, processor, seconds, date and
budget (``Result``).

Two folders are read, the first winning when both hold the same cell:

1. your own, ``COURSE_RESULTS`` (default ``<COURSE_CACHE>/results``, i.e.
   ``~/.cache/peft-course/results``): where ``experiments run`` writes;
2. the results shipped inside the package, ``course/experiments/results`` (``SHIPPED``), written
   by ``experiments run NAME --ship`` when the course's sweeps are made.

The code fingerprint (``code_fingerprint``) is a SHA-256 of every ``.py`` file of the ``course``
package. A result whose fingerprint differs from the running code's is *stale*: the runner does
not count it as done (and replaces it only when asked, ``--replace-stale``); ``experiments list``
never mixes results of different fingerprints in one experiment: it reports the current code's
results, or, when there are none, the largest set made by one earlier version, marked stale.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent  # the course package
SHIPPED = Path(__file__).resolve().parent / "results"
BUDGETS = ("full", "quick")


class StoreError(RuntimeError):
    """A result file that cannot be read, or a folder that cannot be written."""


#: The course's machinery, which never runs inside an arm: changing it leaves results current.
#: (tests/test_experiments.py checks that an arm imports none of these.)
MACHINERY = ("check/", "classroom/", "experiments/cli.py", "__main__.py", "grade",
             "site.py", "notebooks.py", "notebook_outputs.py", "gpu_check.py", "finetune", "checkpoints.py",
             "practice.py", "experiments/show.py")


def fingerprinted(relative: str) -> bool:
    """Whether the module at ``relative`` (a POSIX path inside the package) counts for the results."""
    return "__pycache__" not in relative and not relative.startswith(MACHINERY)


@functools.cache
def code_fingerprint() -> str:
    """SHA-256 over the path and bytes of every ``.py`` file of the ``course`` package that can change a
    result (all but ``MACHINERY``: grading, classroom exports, the site, the command line), in hex."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if fingerprinted(relative):
            digest.update(relative.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def own_dir() -> Path:
    """Where your own runs go: ``COURSE_RESULTS``, else ``results`` in the course cache."""
    if os.environ.get("COURSE_RESULTS"):
        return Path(os.environ["COURSE_RESULTS"]).expanduser()
    from course.models import cache_dir

    return cache_dir() / "results"


def folders() -> list[Path]:
    """The folders results are read from, the first winning: your own, then the shipped ones."""
    own, shipped = own_dir(), SHIPPED
    return [own] if own.resolve() == shipped.resolve() else [own, shipped]


@dataclass(frozen=True)
class Result:
    """One arm's metric for one seed, and where it came from."""

    experiment: str
    arm: str
    seed: int
    metric: str
    value: float
    budget: str  # "full" or "quick"
    fingerprint: str  # code_fingerprint() of the code that made it
    device: str
    dtype: str
    processor: str
    seconds: float
    date: str  # ISO 8601, UTC
    torch: str = ""
    settings: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


_REQUIRED = {"experiment": str, "arm": str, "seed": int, "metric": str, "value": (int, float), "budget": str,
             "fingerprint": str, "device": str, "dtype": str, "processor": str, "seconds": (int, float), "date": str}


def read(path) -> Result:
    """The ``Result`` in ``path``; a damaged or foreign file is refused, naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: not a readable result file ({exc}). Delete it and run the experiment again.") from None
    if not isinstance(data, dict):
        raise StoreError(f"{path}: expected a JSON object. Delete it and run the experiment again.")
    wrong = [key for key, kind in _REQUIRED.items()
             if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool)]
    if wrong:
        raise StoreError(f"{path}: missing or mistyped {', '.join(wrong)}. Delete it and run the experiment again.")
    known = set(Result.__dataclass_fields__)
    return Result(**{k: v for k, v in data.items() if k in known})


def cell_path(folder, experiment: str, budget: str, arm_slug: str, seed: int) -> Path:
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    return Path(folder) / experiment / budget / arm_slug / f"seed-{seed}.json"


def write(folder, result: Result, arm_slug: str) -> Path:
    """Write ``result`` atomically into ``folder``; returns its path."""
    from course.files import atomic_write

    path = cell_path(folder, result.experiment, result.budget, arm_slug, result.seed)
    atomic_write(path, result.to_json())
    return path


def results(experiment, budget: str, folders_=None) -> dict[tuple[str, int], list[tuple[Result, Path]]]:
    """Every stored result of ``experiment`` at ``budget``, by (arm name, seed): a list with one entry
    per folder that holds that cell, in the order of ``folders()`` (yours first)."""
    from course.experiments.registry import get

    experiment = get(experiment)
    by_slug = {arm.slug: arm.name for arm in experiment.arms}
    found: dict[tuple[str, int], list[tuple[Result, Path]]] = {}
    for folder in folders() if folders_ is None else folders_:
        base = Path(folder) / experiment.name / budget
        if not base.is_dir():
            continue
        for path in sorted(base.glob("*/seed-*.json")):
            arm = by_slug.get(path.parent.name)
            if arm is None:  # an arm no longer in the experiment: see orphans()
                continue
            result = read(path)
            expected_seed = path.stem.removeprefix("seed-")
            if result.arm != arm or result.experiment != experiment.name \
                    or str(result.seed) != expected_seed or result.budget != budget:
                raise StoreError(f"{path}: holds {result.experiment!r} / {result.arm!r} / seed {result.seed} / "
                                 f"{result.budget}, which is not what its place says. Move or delete it.")
            found.setdefault((arm, result.seed), []).append((result, path))
    return found


def orphans(experiment, budget: str, folders_=None) -> list[Path]:
    """Result files in folders of arms that ``experiment`` no longer has (renamed or removed arms)."""
    from course.experiments.registry import get

    experiment = get(experiment)
    slugs = {arm.slug for arm in experiment.arms}
    return [path for folder in (folders() if folders_ is None else folders_)
            for path in sorted((Path(folder) / experiment.name / budget).glob("*/seed-*.json"))
            if path.parent.name not in slugs]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
