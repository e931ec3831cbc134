"""Draw images/lora_diagram.png, the LoRA picture of notebook 02.

Run from the repository root: ``python images/make_lora_diagram.py``. The frozen
weight W (d_out x d_in) and, beside it, the low-rank path A (r x d_in) then
B (d_out x r), scaled by alpha / r, whose output is added to W x. Box sizes are
drawn to scale for d_in = d_out = 8 and r = 2, so the thin A and B look as small
as they are.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

FROZEN = "#9ecae1"  # blue: the pretrained weight, frozen
TRAINED = "#fdae6b"  # orange: the adapter, trained
INK = "#222222"
UNIT = 0.32  # size of one matrix entry on the page


def box(ax, x, y, w, h, colour, label, sub):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.06",
                                facecolor=colour, edgecolor=INK, linewidth=1.4))
    lift = 0.12 if sub else 0.0
    ax.text(x + w / 2, y + h / 2 + lift, label, ha="center", va="center", fontsize=17, weight="bold", color=INK)
    if sub:
        ax.text(x + w / 2, y + h / 2 - 0.25, sub, ha="center", va="center", fontsize=9.5, color=INK)


def arrow(ax, start, end, text=None, offset=(0.12, 0.0)):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=16, linewidth=1.4, color=INK))
    if text:
        mid = ((start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1])
        ax.text(*mid, text, fontsize=10, color=INK, ha="left", va="center")


def draw(path: Path) -> None:
    d, r = 8, 2
    fig, ax = plt.subplots(figsize=(9, 6.2))
    ax.set_xlim(0, 9)
    ax.set_ylim(-0.2, 6.6)
    ax.axis("off")

    # Input x at the bottom, output h at the top.
    ax.text(4.5, 0.05, r"input $x$  ($d_{in}$)", ha="center", va="center", fontsize=12)
    ax.text(4.5, 6.4, r"output $h = W x + \frac{\alpha}{r} B A x$  ($d_{out}$)", ha="center", va="center", fontsize=12)

    # Frozen W: d x d, on the left.
    wx, wy, ws = 0.9, 1.75, d * UNIT
    box(ax, wx, wy, ws, ws, FROZEN, r"$W$", r"$d_{out} \times d_{in}$, frozen")

    # A: r x d_in (wide and flat), then B: d_out x r (tall and thin), on the right.
    ax_x, ax_y = 5.0, 1.35
    box(ax, ax_x, ax_y, d * UNIT, r * UNIT, TRAINED, r"$A$", "")
    ax.text(ax_x + d * UNIT + 0.12, ax_y + r * UNIT / 2, r"$r \times d_{in}$" "\n" r"init random",
            fontsize=9.5, va="center")
    bx_x, bx_y = ax_x + (d - r) * UNIT / 2, 2.75
    box(ax, bx_x, bx_y, r * UNIT, d * UNIT, TRAINED, r"$B$", "")
    ax.text(bx_x + r * UNIT + 0.12, bx_y + d * UNIT / 2, r"$d_{out} \times r$" "\n" r"init zero",
            fontsize=9.5, va="center")

    # Arrows: x -> W, x -> A -> B; both into the sum.
    arrow(ax, (4.5, 0.25), (wx + ws / 2, wy - 0.03))
    arrow(ax, (4.5, 0.25), (ax_x + d * UNIT / 2, ax_y - 0.03))
    arrow(ax, (ax_x + d * UNIT / 2, ax_y + r * UNIT + 0.03), (bx_x + r * UNIT / 2, bx_y - 0.03),
          r"$r$ numbers", offset=(0.05, 0.0))
    plus = (4.5, 5.75)
    ax.add_patch(plt.Circle(plus, 0.22, facecolor="white", edgecolor=INK, linewidth=1.4))
    ax.text(*plus, "+", ha="center", va="center", fontsize=18)
    arrow(ax, (wx + ws / 2, wy + ws + 0.03), (plus[0] - 0.23, plus[1] - 0.05))
    arrow(ax, (bx_x + r * UNIT / 2, bx_y + d * UNIT + 0.03), (plus[0] + 0.23, plus[1] - 0.05),
          r"$\times\ \alpha / r$", offset=(-0.55, -0.3))
    arrow(ax, (plus[0], plus[1] + 0.23), (4.5, 6.22))

    # Legend and the merge remark.
    ax.add_patch(FancyBboxPatch((0.15, 5.9), 0.3, 0.22, boxstyle="round,pad=0.01", facecolor=FROZEN, edgecolor=INK))
    ax.text(0.55, 6.01, "frozen", va="center", fontsize=10)
    ax.add_patch(FancyBboxPatch((0.15, 5.5), 0.3, 0.22, boxstyle="round,pad=0.01", facecolor=TRAINED, edgecolor=INK))
    ax.text(0.55, 5.61, "trained", va="center", fontsize=10)
    ax.text(7.0, 6.05, "after training, merge:\n" r"$W \leftarrow W + \frac{\alpha}{r} B A$" "\n"
            "one matrix again,\nno extra inference cost", fontsize=9.5, va="top", style="italic")

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "lora_diagram.png"
    draw(out)
    print(f"wrote {out}")
