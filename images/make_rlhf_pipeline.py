"""Draw images/rlhf_pipeline.png, the pipeline picture of notebook 07.

Run from the repository root: ``python images/make_rlhf_pipeline.py``. Three stages, SFT, DPO
and GRPO, each a TRL trainer that puts a LoRA adapter (trained) on a frozen model, then merges
it: the merged model is the next stage's frozen base. Under each stage, what it learns from and
what plays the reference.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

FROZEN = "#9ecae1"  # blue: frozen weights (as in images/lora_diagram.png)
TRAINED = "#fdae6b"  # orange: the adapter being trained
INK = "#222222"

STAGES = [
    ("SFT", "SFTTrainer", "demonstrations:\nquestion -> right sum", "loss on the reply tokens"),
    ("DPO", "DPOTrainer", "pairs: right sum vs\na plausible mistake", "reference = adapter off"),
    ("GRPO", "GRPOTrainer", "4 sampled answers per\nquestion, scored by two rules",
     "advantage = (reward - group mean)\n/ (group's sample std + 1e-4)"),
]


def box(ax, x, y, w, h, colour, text, size=11, weight="normal"):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=colour, edgecolor=INK, linewidth=1.3))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, weight=weight, color=INK)


def arrow(ax, start, end):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=15, linewidth=1.3, color=INK))


def draw(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(13, 3.4))
    ax.set_xlim(0, 14.5)
    ax.set_ylim(0.2, 3.6)
    ax.axis("off")

    box(ax, 0.1, 1.55, 1.0, 0.8, FROZEN, "base\nmodel", weight="bold")
    x, width, gap = 2.1, 2.7, 1.0
    for i, (name, trainer, data, note) in enumerate(STAGES):
        # The stage: the model so far, frozen, and the adapter it trains; then a merge.
        middle = x + width / 2
        ax.text(middle, 3.3, f"{i + 1}. {name}", ha="center", fontsize=13, weight="bold", color=INK)
        ax.text(middle, 2.85, f"{trainer}(..., peft_config=lora)", ha="center", fontsize=8, family="monospace",
                color=INK)
        box(ax, x, 1.55, 1.45, 0.8, FROZEN, "frozen", size=10)
        box(ax, x + 1.55, 1.55, 1.15, 0.8, TRAINED, "LoRA\nadapter", size=10)
        ax.text(middle, 1.1, data, ha="center", va="center", fontsize=8.5, color=INK)
        ax.text(middle, 0.5, note, ha="center", va="center", fontsize=8.5, style="italic", color=INK)
        arrow(ax, (x - gap + 0.12, 1.95), (x - 0.08, 1.95))
        if i:
            ax.text(x - gap / 2, 2.1, "merge", ha="center", fontsize=8.5, color=INK)
        x += width + gap
    arrow(ax, (x - gap + 0.12, 1.95), (x - 0.08, 1.95))
    ax.text(x - gap / 2, 2.1, "merge", ha="center", fontsize=8.5, color=INK)
    box(ax, x, 1.55, 1.2, 0.8, FROZEN, "tuned\nmodel", weight="bold")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "rlhf_pipeline.png"
    draw(out)
    print(f"wrote {out}")
