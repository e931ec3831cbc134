"""Merging adapters: task arithmetic, TIES, DARE, back to LoRA factors, and two models compared (notebook 06).

Every function here works on *weight changes* ("task vectors", "deltas"): for a LoRA
adapter on a layer, ``delta = scaling * B @ A`` (``get_delta_weight()``); for a full
fine-tune, ``W_finetuned - W_pretrained``. A merge turns several deltas into one.

- ``task_arithmetic``: ``sum_i w_i delta_i`` (Ilharco et al. 2023, "Editing Models with
  Task Arithmetic", the task vector sum of section 2).
- ``ties_merge``: TIES-Merging (Yadav et al. 2023, "Resolving Interference When Merging
  Models", section 3 / algorithm 1): *trim* each delta to its largest-magnitude entries,
  *elect* each entry's sign by the total of the trimmed deltas, *merge* by averaging the
  weighted entries that agree with the elected sign ("disjoint mean").
- ``dare_prune`` / ``dare_merge``: DARE (Yu et al. 2024, "Language Models are Super Mario",
  eq. 1): drop each entry with probability ``1 - density`` and divide the survivors by
  ``density``, so that the expected delta is unchanged; then merge linearly or TIES-style.
- ``svd_truncate``: a (merged) delta back to LoRA factors ``(A, B)`` of a given rank, the
  best approximation in the Frobenius norm (Eckart-Young).
- ``compare_models``: how far two models' next-token distributions are apart, as a
  ``ModelComparison`` (the one yardstick for "do these two models compute the same thing?":
  chapter 06 validates merges with it, chapter 07's ``course.rlhf.save_merge_reload`` the
  reloaded model).

The merges follow PEFT's ``peft.utils.merge_utils`` operation for operation (``ties`` with
``majority_sign_method="total"``, ``dare_linear``, ``dare_ties``), so that they give PEFT's
numbers, and DARE draws its random mask exactly as PEFT does (``torch.bernoulli`` on each
delta in turn), so the same random state gives the same result. ``tests/test_merging.py``
compares them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

__all__ = [
    "ModelComparison",
    "compare_models",
    "dare_merge",
    "dare_prune",
    "magnitude_prune",
    "svd_truncate",
    "task_arithmetic",
    "ties_merge",
]


# ---------------------------------------------------------------------------
# Checking the arguments
# ---------------------------------------------------------------------------


def _stack(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The deltas stacked on a new dimension 0, and the weights shaped to multiply them."""
    if isinstance(deltas, torch.Tensor):
        raise TypeError("Pass the deltas as a list of tensors (one per adapter), not one tensor: "
                        "e.g. [delta_addition, delta_pirate].")
    deltas = list(deltas)
    if not deltas:
        raise ValueError("No deltas to merge: pass a list with at least one tensor.")
    shapes = {tuple(d.shape) for d in deltas}
    if len(shapes) != 1:
        raise ValueError(f"All deltas must have the same shape to be merged, got {sorted(shapes)}: "
                         "merge the weight changes of one layer at a time.")
    weights = torch.as_tensor(weights, dtype=deltas[0].dtype, device=deltas[0].device).flatten()
    if len(weights) != len(deltas):
        raise ValueError(f"{len(deltas)} deltas but {len(weights)} weights: give one weight per delta.")
    stacked = torch.stack(deltas, dim=0)
    return stacked, weights.view(-1, *([1] * (stacked.dim() - 1)))


def _check_density(density: float) -> None:
    if not 0 < density <= 1:
        raise ValueError(f"density is the fraction of entries kept, in (0, 1]; got {density!r}. "
                         "0.5 keeps half of them, 1 keeps all.")


# ---------------------------------------------------------------------------
# The merges
# ---------------------------------------------------------------------------


def task_arithmetic(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_i weights[i] * deltas[i]``: the weighted sum of the weight changes (task arithmetic).

    Weights need not sum to one: ``[1, 1]`` adds two adapters at full strength, a negative
    weight subtracts one ("forgetting by negation"). Equal to PEFT's ``task_arithmetic``.
    """
    stacked, w = _stack(deltas, weights)
    return (stacked * w).sum(dim=0)


def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``int(density * numel)`` largest-magnitude entries set to zero.

    TIES's "trim" step, with PEFT's rule for how many entries stay; ``density >= 1`` keeps all.
    """
    _check_density(density)
    if density >= 1:
        return delta.clone()
    k = int(density * delta.numel())
    keep = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    keep[torch.topk(delta.abs().reshape(-1), k=k, largest=True).indices] = 1
    return delta * keep.reshape(delta.shape)


def _elect_and_merge(pruned: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """TIES's "elect" and "disjoint merge" on the stacked, already pruned deltas."""
    elected = torch.where(pruned.sum(dim=0) >= 0, 1, -1)  # sign of the total mass (PEFT: "total")
    agrees = pruned.sign() == elected  # a zero (pruned) entry agrees with neither sign
    merged = (pruned * w * agrees).sum(dim=0)
    return merged / agrees.sum(dim=0).clamp(min=1)  # mean over the deltas that agree, not over all


def ties_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023, algorithm 1) of ``deltas`` with ``weights``.

    1. trim: keep the top ``density`` fraction of each delta by magnitude (``magnitude_prune``);
    2. elect: each entry's sign is the sign of the sum of the trimmed deltas (ties go to +);
    3. disjoint merge: average the *weighted* trimmed entries whose sign agrees with the
       elected one, dividing by how many agree (not by the number of deltas).

    Equal to ``peft.utils.merge_utils.ties(deltas, torch.tensor(weights), density, "total")``.
    """
    _check_density(density)
    stacked, w = _stack(deltas, weights)
    pruned = torch.stack([magnitude_prune(d, density) for d in stacked], dim=0)
    return _elect_and_merge(pruned, w)


def dare_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """DARE's drop-and-rescale (Yu et al. 2024, eq. 1): each entry survives with probability
    ``density`` and survivors are divided by ``density``, so ``E[dare_prune(delta)] = delta``.

    Draws from torch's global generator exactly as PEFT's ``random_pruning`` does (one
    ``torch.bernoulli`` over the delta's shape); ``density >= 1`` keeps all and draws nothing.
    """
    _check_density(density)
    if density >= 1:
        return delta.clone()
    keep = torch.bernoulli(torch.full_like(delta, density))
    return delta * keep / density


def dare_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float,
               *, ties: bool = False) -> torch.Tensor:
    """DARE: ``dare_prune`` each delta (in order), then merge them.

    ``ties=False``: weighted sum, equal to PEFT's ``dare_linear``. ``ties=True``: TIES's sign
    election and disjoint mean on the pruned deltas, equal to PEFT's ``dare_ties``. Both under
    the same random state as PEFT's (the masks are drawn in the same order).
    """
    _check_density(density)
    stacked, w = _stack(deltas, weights)
    pruned = torch.stack([dare_prune(d, density) for d in stacked], dim=0)
    if ties:
        return _elect_and_merge(pruned, w)
    return (pruned * w).sum(dim=0)


# ---------------------------------------------------------------------------
# Back to an adapter
# ---------------------------------------------------------------------------


def svd_truncate(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors ``(A, B)`` with ``B @ A`` the best rank-``rank`` approximation of ``delta``.

    ``delta = U S V^T``; ``B = U[:, :rank] S[:rank]`` (out x rank), ``A = V^T[:rank]`` (rank x in),
    as PEFT's ``add_weighted_adapter(..., combination_type="svd")`` builds them (there with
    ``lora_alpha = r``, so the scaling is 1). The error is the energy of the dropped singular
    values (Eckart-Young), so it is exact (up to rounding) when ``rank`` is at least the rank
    of ``delta``: the sum of two rank-r changes needs rank 2r. Computed in float32 at least
    (SVD has no half-precision kernel); the factors come back in that dtype.
    """
    if delta.dim() != 2:
        raise ValueError(f"svd_truncate takes a weight change of shape (out, in), got shape {tuple(delta.shape)}.")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(delta.shape):
        raise ValueError(f"rank must be an integer from 1 to min(out, in) = {min(delta.shape)}, got {rank!r}.")
    work = delta if delta.dtype == torch.float64 else delta.float()
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    return Vh[:rank].clone(), U[:, :rank] * S[:rank]


# ---------------------------------------------------------------------------
# Measuring two models apart
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelComparison:
    """How two models' next-token predictions differ on the same tokens (``compare_models``).

    ``max_logit_diff``: the largest |logit_a - logit_b| over every position and vocabulary entry;
    ``top1_agreement``: the fraction of positions where both pick the same most likely token;
    ``mean_kl``: KL(p_a || p_b) in nats, averaged over positions. Padding is left out.
    (Two *arms* of an experiment, seeds of one metric, are compared by ``course.evidence.compare``.)
    """

    max_logit_diff: float
    top1_agreement: float
    mean_kl: float
    positions: int

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"max |logit diff| {self.max_logit_diff:.3g}, top-1 agreement {self.top1_agreement:.1%}, "
                f"mean KL {self.mean_kl:.3g} nats ({self.positions} positions)")


def _logits(model, inputs: dict) -> torch.Tensor:
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in inputs.items()}
    with torch.inference_mode():
        return model(**batch).logits.float().cpu()


def compare_models(a, b, inputs) -> ModelComparison:
    """Run ``a`` and ``b`` on the same ``inputs`` and measure how far their predictions differ.

    ``inputs``: a tokenizer batch (``input_ids`` and ``attention_mask``; positions where the mask
    is 0 are ignored) or a tensor of token ids. The models may live on different devices or in
    different dtypes: the logits are compared in float32 on the CPU. Use it to validate a merge:
    the merged model against the adapter it came from should give a KL near zero and top-1
    agreement near 100%.
    """
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    inputs = dict(inputs)
    if "input_ids" not in inputs:
        raise ValueError("inputs must be token ids or a tokenizer batch with `input_ids` "
                         "(e.g. tokenizer(texts, return_tensors='pt', padding=True)).")
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool().cpu()
    la, lb = _logits(a, inputs), _logits(b, inputs)
    if la.shape != lb.shape:
        raise ValueError(f"The models' logits differ in shape, {tuple(la.shape)} and {tuple(lb.shape)}: "
                         "compare models that share a tokenizer and vocabulary.")
    la, lb = la[mask], lb[mask]  # (positions, vocabulary)
    log_pa, log_pb = la.log_softmax(-1), lb.log_softmax(-1)
    kl = (log_pa.exp() * (log_pa - log_pb)).sum(-1)
    return ModelComparison(
        max_logit_diff=(la - lb).abs().max().item(),
        top1_agreement=(la.argmax(-1) == lb.argmax(-1)).float().mean().item(),
        mean_kl=kl.mean().clamp(min=0).item(),
        positions=int(mask.sum()),
    )
