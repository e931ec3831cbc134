"""Draw images/dora_diagram.png, the DoRA picture of notebook 03.

Run from the repository root: ``python images/make_dora_diagram.py``. Three stages, left
to right, as in Figure 1 of Liu et al. 2024 but in PyTorch's (out, in) layout: the
pretrained weight W0; its decomposition into a magnitude m (one number per output row)
times a direction with unit rows; DoRA's adaptation, where m is trained directly and the
direction W0 + (alpha / r) B A is trained through LoRA and normalised again; and the merge
into one matrix whose rows have norms m. Same colours as images/lora_diagram.png.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

FROZEN = "#9ecae1"  # blue: the pretrained weight, frozen
TRAINED = "#fdae6b"  # orange: trained
MERGED = "#c7b9d9"  # the merged weight: frozen and trained parts in one matrix
INK = "#222222"
UNIT = 0.26  # size of one matrix entry on the page
D, R = 8, 2  # d_out = d_in = 8, r = 2: drawn to scale


def box(ax, x, y, w, h, colour, label, fontsize=15):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.05",
                                facecolor=colour, edgecolor=INK, linewidth=1.3))
    ax.text(x + w / 2, y + h / 2, label, ha="center", va="center", fontsize=fontsize, color=INK)


def rows(ax, x, y, w, h):
    """Thin lines between the rows of a matrix: each row is one output's weight vector."""
    for k in range(1, D):
        ax.plot([x + 0.03, x + w - 0.03], [y + k * h / D] * 2, color=INK, linewidth=0.4, alpha=0.35)


def arrow(ax, start, end, text="", dy=0.22):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=15, linewidth=1.3, color=INK))
    if text:
        ax.text((start[0] + end[0]) / 2, start[1] + dy, text, ha="center", va="bottom", fontsize=10.5)


def caption(ax, x, text):
    ax.text(x, 0.35, text, ha="center", va="top", fontsize=10.5, color=INK)


def draw(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(14, 4.6))
    ax.set_xlim(0, 18.0)
    ax.set_ylim(-0.55, 4.1)
    ax.axis("off")
    side, y0, mid = D * UNIT, 1.0, 1.0 + D * UNIT / 2

    def step_arrow(x, label):
        arrow(ax, (x + 0.15, mid), (x + 1.25, mid), label)
        return x + 1.4

    # 1. The pretrained weight.
    x = 0.3
    box(ax, x, y0, side, side, FROZEN, r"$W_0$")
    rows(ax, x, y0, side, side)
    caption(ax, x + side / 2, "pretrained weight\n" r"$d_{out} \times d_{in}$")
    x = step_arrow(x + side, "decompose")

    # 2. Decompose: magnitude column m times a direction with unit rows.
    left = x
    box(ax, x, y0, UNIT * 1.3, side, FROZEN, r"$m$", 13)
    ax.text(x + UNIT * 1.3 + 0.2, mid, r"$\odot$", ha="center", va="center", fontsize=16)
    x += UNIT * 1.3 + 0.4
    box(ax, x, y0, side, side, FROZEN, r"$\frac{W_0}{\|W_0\|_{row}}$", 17)
    rows(ax, x, y0, side, side)
    caption(ax, (left + x + side) / 2, "magnitude " r"$m = \|W_0\|_{row}$" "\n(one number per row)\n"
            "times a direction (rows of length 1)")
    x = step_arrow(x + side, "fine-tune")

    # 3. Adapt: m trained; direction = normalise(W0 + alpha/r B A), B and A trained.
    left = x
    box(ax, x, y0, UNIT * 1.3, side, TRAINED, r"$m$", 13)
    ax.text(x + UNIT * 1.3 + 0.2, mid, r"$\odot$", ha="center", va="center", fontsize=16)
    bracket = x + UNIT * 1.3 + 0.45
    ax.plot([bracket + 0.06, bracket, bracket, bracket + 0.06], [y0 - 0.05, y0 - 0.05, y0 + side + 0.05,
            y0 + side + 0.05], color=INK, linewidth=1.2)
    x = bracket + 0.12
    box(ax, x, y0, side, side, FROZEN, r"$W_0$")
    ax.text(x + side + 0.2, mid, "+", ha="center", va="center", fontsize=16)
    x += side + 0.4
    box(ax, x, y0, R * UNIT, side, TRAINED, r"$B$", 13)
    ax.text(x - 0.02, y0 + side + 0.12, r"$\frac{\alpha}{r}$", ha="right", va="bottom", fontsize=13)
    x += R * UNIT + 0.1
    box(ax, x, y0 + side - R * UNIT, side, R * UNIT, TRAINED, r"$A$", 13)
    close = x + side + 0.12
    ax.plot([close - 0.06, close, close, close - 0.06], [y0 - 0.05, y0 - 0.05, y0 + side + 0.05,
            y0 + side + 0.05], color=INK, linewidth=1.2)
    ax.text((left + close) / 2, y0 + side + 0.55, r"$m \odot \frac{W_0 + \frac{\alpha}{r} B A}"
            r"{\|W_0 + \frac{\alpha}{r} B A\|_{row}}$", ha="center", va="bottom", fontsize=16)
    caption(ax, (left + close) / 2, "m trained directly; the direction trained with LoRA\n"
            "(the norm is a constant in backward, section 4.3)")
    x = step_arrow(close + 0.1, "merge")

    # 4. Merge.
    box(ax, x, y0, side, side, MERGED, r"$W'$")
    rows(ax, x, y0, side, side)
    caption(ax, x + side / 2, "one matrix again:\nits row norms are m,\nno extra inference cost")

    for k, (colour, label) in enumerate(((FROZEN, "frozen"), (TRAINED, "trained"))):
        ax.add_patch(FancyBboxPatch((0.3, 3.75 - 0.38 * k), 0.28, 0.2, boxstyle="round,pad=0.01",
                                    facecolor=colour, edgecolor=INK))
        ax.text(0.68, 3.85 - 0.38 * k, label, va="center", fontsize=10)

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "dora_diagram.png"
    draw(out)
    print(f"wrote {out}")
