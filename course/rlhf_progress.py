"""Running a TRL trainer in a notebook (notebook 07): the course's progress bar, the per-step logs.

``fit(trainer, desc)`` trains under one bar (a text line updated in place in a notebook, so that
the saved file shows the final state) and returns a ``Run`` with the logs; ``quiet_progress``
silences the progress bars of ``datasets`` and ``transformers`` around a block. Re-exported by
``course.rlhf``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

__all__ = ["Run", "fit", "progress_bar", "quiet_progress"]

# ---------------------------------------------------------------------------
# Running a trainer: the course's progress bar, the per-step logs
# ---------------------------------------------------------------------------


class _DisplayLine:
    """A file-like object for tqdm that shows only its latest line, in place.

    In a notebook the line is an output that is updated, so the saved notebook holds the
    bar's final state (100%, the last loss), never a bar frozen at 0%.
    """

    def __init__(self):
        from IPython.display import display

        self._handle = display({"text/plain": ""}, raw=True, display_id=True)
        self._last = ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "\n").strip().rpartition("\n")[2]
        if line and line != self._last:
            self._last = line
            self._handle.update({"text/plain": line}, raw=True)

    def flush(self) -> None:
        pass


def _progress_file():
    with contextlib.suppress(ImportError):
        from IPython import get_ipython

        if get_ipython() is not None and hasattr(get_ipython(), "kernel"):
            return _DisplayLine()
    return None  # a terminal: tqdm's own bar on stderr


def progress_bar(total: int, desc: str):
    """A tqdm bar; in a notebook, a text line updated in place (see ``_DisplayLine``)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=_progress_file(), mininterval=0.5,
                bar_format="{l_bar}{bar:20}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")


def _callback(desc: str, key: str):
    from transformers import TrainerCallback

    class CourseProgress(TrainerCallback):
        """The course's bar: one tick per optimiser step, the latest loss (or reward) beside it."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = progress_bar(state.max_steps, desc)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and key in logs:
                self.bar.set_postfix_str(f"{key}={logs[key]:.3f}", refresh=False)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return CourseProgress()


@dataclass
class Run:
    """What ``fit`` returns: the per-step logs of a TRL run, its time and its model."""

    logs: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    model: object = None

    def series(self, key: str) -> list[float]:
        """One logged quantity ("loss", "reward", "rewards/margins", ...) at every step that logged it."""
        return [float(entry[key]) for entry in self.logs if key in entry]

    @property
    def losses(self) -> list[float]:
        return self.series("loss")


def fit(trainer, desc: str, *, show: str = "loss") -> Run:
    """Train ``trainer`` under the course's progress bar; return its per-step logs as a ``Run``.

    TRL's own printer and bar are removed (they would fill a notebook with dicts, or leave
    a bar at 0% in the saved file); ``show`` picks the logged number shown beside the bar.
    """
    from transformers import PrinterCallback, ProgressCallback

    for cls in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cls)
    with contextlib.suppress(ImportError):
        from transformers.utils.notebook import NotebookProgressCallback

        trainer.remove_callback(NotebookProgressCallback)
    trainer.add_callback(_callback(desc, show))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logs = [entry for entry in trainer.state.log_history if "step" in entry and "train_runtime" not in entry]
    model = trainer.model
    model.eval()
    return Run(logs=logs, seconds=seconds, model=model)


@contextlib.contextmanager
def quiet_progress():
    """No progress bars from ``datasets`` (TRL tokenising) or ``transformers`` (loading weights)
    while the block runs: a notebook would save them at 0%. The course's own bar is not affected."""
    import datasets
    from transformers.utils import logging

    datasets_on, transformers_on = datasets.is_progress_bar_enabled(), logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
        if transformers_on:
            logging.enable_progress_bar()

