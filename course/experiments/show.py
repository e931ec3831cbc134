"""A chapter's shipped sweep beside the run the reader just made (notebooks 02-07).

Five seeds of every comparison do not fit in a notebook's few minutes on a laptop CPU, so the
course ships them (``python -m course experiments run NAME --ship``: ``course/experiments/results``)
and a notebook trains one seed live. ``show(name, live=...)`` prints each arm's mean and Student-t
95 % interval over the shipped seeds (``course.evidence.interval``), the verdict of the chapter's
pair (``course.evidence.compare``, paired: the arms share seeds), and draws them: one row per arm,
its seeds as dots, its interval as a bar, and the live run as a cross. A live value far outside
its arm's spread of seeds says that something differs from the sweep (budget, code, device).

Not part of any arm (``store.MACHINERY``): changing how results are shown leaves them current.
"""

from __future__ import annotations

from course.experiments.summary import Summary, summarise


class NoResultsError(LookupError):
    """An experiment with no stored results to show."""


def _fmt(x: float, decimals: int) -> str:
    # The minus sign of the verdicts (course.evidence), so that a row and its verdict read alike.
    return f"{x:.{decimals}f}".replace("-", "\u2212")


def budget_text(budget) -> str:
    """What one seed of an arm does, in words, leaving out what it does not do: "6 steps of batch 8,
    32 held-out questions"; a merge trains nothing ("no training, 64 held-out questions"), a loss
    curve scores no questions ("6 steps of batch 8")."""
    parts = [f"{budget.steps} steps of batch {budget.batch_size}" if budget.steps else "no training"]
    if budget.eval_examples:
        parts.append(f"{budget.eval_examples} held-out questions")
    return ", ".join(parts)


def lines(summary: Summary, live: dict | None = None, decimals: int = 3) -> list[str]:
    """The text ``show`` prints: one line per arm, then the verdict."""
    e = summary.experiment
    out = [f"{e.name}: {e.metric}, {summary.seeds} seeds shipped ({budget_text(e.budget)}; "
           + ", ".join(summary.devices or ("device unknown",)) + ")"]
    if summary.stale:
        out.append("  NOTE: these results were made by an earlier version of the course's code "
                   f"(python -m course experiments run {e.name} makes current ones)")
    width = max(len(a.name) for a in summary.arms)
    for arm in summary.arms:
        span = f" [{_fmt(arm.low, decimals)}, {_fmt(arm.high, decimals)}]" if arm.low is not None else ""
        seeds = ", ".join(_fmt(v, decimals) for v in arm.values)
        here = f"; this run {_fmt(live[arm.name], decimals)}" if live and arm.name in live else ""
        out.append(f"  {arm.name:<{width}}  {_fmt(arm.mean, decimals)}{span}  (seeds: {seeds}){here}")
    if summary.comparison is not None:
        out.append(f"  {summary.comparison.verdict}")
    return out


def show(name: str, live: dict | None = None, *, ax=None, decimals: int = 3, plot: bool = True) -> Summary:
    """Print and plot the shipped results of experiment ``name``; ``live`` maps arm names to this run's values.

    Returns the ``Summary`` (``.comparison.decided``, ``.better``, ``.arms``) so that a notebook's text
    can follow the decision. ``ax``: a matplotlib axis to draw on (default: a new figure, shown).
    """
    summary = summarise(name)
    if summary.seeds == 0:
        raise NoResultsError(f"experiment {name!r} has no stored results. Make them with "
                             f"`python -m course experiments run {name}` (about as long as the notebook's "
                             "live run, once per seed); they are kept in COURSE_RESULTS.")
    unknown = set(live or {}) - {arm.name for arm in summary.arms}
    if unknown:
        raise KeyError(f"live values for {sorted(unknown)}, which are not arms of {name!r}: "
                       f"{[arm.name for arm in summary.arms]}")
    print("\n".join(lines(summary, live, decimals)))
    if plot:
        _draw(summary, live or {}, ax)
    return summary


def _draw(summary: Summary, live: dict, ax) -> None:
    import matplotlib.pyplot as plt

    own = ax is None
    if own:
        _, ax = plt.subplots(figsize=(7, 0.55 * len(summary.arms) + 1.2))
    for row, arm in enumerate(summary.arms):
        ax.scatter(arm.values, [row] * len(arm.values), color="C0", alpha=0.5, s=18,
                   label="shipped seeds" if row == 0 else None)
        if arm.low is not None:
            ax.errorbar([arm.mean], [row], xerr=[[arm.mean - arm.low], [arm.high - arm.mean]], fmt="o", color="C0",
                        capsize=4, lw=2, label="mean, 95 % interval" if row == 0 else None)
        if arm.name in live:
            ax.scatter([live[arm.name]], [row], marker="x", color="C3", s=60, zorder=3,
                       label="this run" if not any(a.name in live for a in summary.arms[:row]) else None)
    ax.set_yticks(range(len(summary.arms)), [arm.name for arm in summary.arms])
    ax.set_ylim(-0.6, len(summary.arms) - 0.4)
    ax.invert_yaxis()
    ax.set(xlabel=summary.experiment.metric, title=f"{summary.experiment.name}: {summary.seeds} seeds")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8, loc="best")
    if own:
        plt.tight_layout()
        plt.show()


# ---------------------------------------------------------------------------
# The README's table: "What each method bought here"
# ---------------------------------------------------------------------------

README_START = "<!-- experiments table: python -m course experiments table --readme -->"
README_END = "<!-- end of experiments table -->"


def _number(x: float | None, decimals: int = 3) -> str:
    return "—" if x is None else _fmt(x, decimals)


def markdown_table(summaries=None) -> str:
    """One row per experiment of chapters 02-07: its arms' means and 95 % intervals, and its verdict."""
    from course.experiments.summary import summarise_all

    summaries = summarise_all() if summaries is None else summaries
    rows = ["| chapter | experiment | metric, budget | arms: mean [95 % interval] over the seeds | verdict |",
            "| --- | --- | --- | --- | --- |"]
    for s in summaries:
        e = s.experiment
        if s.seeds == 0:
            arms, verdict = "no results yet", f"`python -m course experiments run {e.name}`"
        else:
            arms = "; ".join(f"{a.name} {_number(a.mean)}" + (f" [{_number(a.low)}, {_number(a.high)}]"
                                                               if a.low is not None else "") for a in s.arms)
            verdict = s.comparison.verdict if s.comparison is not None else "fewer than 2 seeds: no interval"
            if s.stale:
                verdict += " (STALE: made by earlier code)"
        rows.append(f"| {e.chapter[:2]} | `{e.name}`: {e.description} | {e.metric}; {budget_text(e.budget)} | {arms} | {verdict} |")
    return "\n".join(rows)


def readme_block(summaries=None) -> str:
    return f"{README_START}\n{markdown_table(summaries)}\n{README_END}"


def update_readme(path) -> bool:
    """Write the generated table between the README's markers; True when the file changed."""
    from pathlib import Path

    path = Path(path)
    text = path.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{path} has no experiments table markers ({README_START!r} ... {README_END!r}): "
                         "put them where the table belongs")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    new = head + readme_block() + tail
    if new == text:
        return False
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(new)
    temporary.replace(path)
    return True
