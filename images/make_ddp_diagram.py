"""Draw images/ddp_diagram.png, the data-parallel picture of notebook 08.

Run from the repository root: ``python images/make_ddp_diagram.py``. One global batch is cut into
one slice per process; each process holds the whole model (frozen base and adapter), computes the
gradients of its slice, and an all-reduce averages the adapter gradients so that every copy takes
the same optimizer step.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

FROZEN, TRAINED, DATA, INK = "#9ecae1", "#fdae6b", "#c7e9c0", "#222222"


def box(ax, x, y, w, h, colour, text, size=11):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.06",
                                facecolor=colour, edgecolor=INK, linewidth=1.3))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, color=INK)


def arrow(ax, start, end, style="-|>"):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=14, linewidth=1.3, color=INK))


def draw(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 5))
    ax.set_xlim(0, 9)
    ax.set_ylim(0, 5)
    ax.axis("off")
    box(ax, 2.5, 4.2, 4.0, 0.5, DATA, "global batch: N x batch_size examples")
    for i, x in enumerate((0.6, 5.0)):
        arrow(ax, (4.5, 4.18), (x + 1.7, 3.62))
        box(ax, x, 3.1, 3.4, 0.5, DATA, f"slice {i}: batch_size examples", 10)
        box(ax, x, 1.75, 3.4, 1.1, FROZEN, "", 10)
        ax.text(x + 1.7, 2.55, f"process {i}: the whole model", ha="center", fontsize=10)
        box(ax, x + 0.2, 1.85, 1.4, 0.45, FROZEN, "frozen base", 9)
        box(ax, x + 1.8, 1.85, 1.4, 0.45, TRAINED, "adapter", 9)
        arrow(ax, (x + 1.7, 3.08), (x + 1.7, 2.88))
        arrow(ax, (x + 2.5, 1.83), (x + 2.5 + (2.2 if i == 0 else -1.6), 1.05))
    box(ax, 2.5, 0.35, 4.0, 0.65, TRAINED, "all-reduce: average the adapter gradients\n"
        "(sum of token losses / global token count)", 9.5)
    ax.text(4.5, 0.08, "then every process takes the same optimizer step", ha="center", fontsize=9.5, style="italic")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "ddp_diagram.png"
    draw(out)
    print(f"wrote {out}")
