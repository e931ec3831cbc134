"""Data-parallel training that equals one process: the loss over the global number of answer tokens (notebook 08).

Under DDP (``torchrun``, ``accelerate launch``) every process holds a replica of the model, takes
its own slice of the global batch, backpropagates its own loss, and the all-reduce then *averages*
the parameter gradients over the N processes. One process on the whole batch minimises the mean
cross-entropy over all answer tokens, ``L = sum_all CE / T`` with ``T`` the number of answer tokens
(labels other than -100) in the whole batch. The processes reproduce its gradient exactly when
rank r's loss is

    loss_r = N * (sum of rank r's answer tokens' CE) / T

because ``(1/N) sum_r grad loss_r = grad L``. Each rank knows its own sum; ``T`` needs one
``all_reduce`` of the per-rank counts (``accelerator.reduce(tokens, "sum")``), and the factor N
undoes DDP's averaging. A per-rank mean (``CE / T_r``) instead weights the tokens of a rank with
few answer tokens more, and is 0 / 0 on a rank that has none. ``course.finetune`` trains this way
(its ``loss_sum * accelerator.num_processes / global_tokens``); ``check.global_token_loss`` asks
for ``global_token_loss`` below.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "answer_token_loss_sum", "global_token_loss"]

IGNORE_INDEX = -100  # labels of prompt and padding tokens: no loss there


def answer_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the cross-entropy over the answer tokens, their number) for one rank's batch.

    ``logits`` (..., vocabulary) and ``labels`` (...) are aligned: ``labels[..., t]`` is the token
    ``logits[..., t, :]`` should predict (already shifted), -100 where there is no loss (prompt,
    padding). Computed in float32 at least.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match: labels must "
                         "have the logits' shape without the last (vocabulary) dimension, one target per position.")
    work = logits if logits.dtype == torch.float64 else logits.float()
    total = F.cross_entropy(work.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total, (labels != IGNORE_INDEX).sum()


def global_token_loss(logits_per_rank: Sequence[torch.Tensor],
                      labels_per_rank: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each rank's loss, ``N * (its answer tokens' summed cross-entropy) / (answer tokens of all ranks)``.

    Rank r backpropagates ``losses[r]``; DDP averages the gradients over the N ranks, which then
    equal the gradient of one process's mean loss over every answer token of the global batch.
    The mean of the returned losses is that loss's value. Here all ranks' batches are in one
    process (a simulation, as in notebook 08's exercise); in a real run the count comes from an
    ``all_reduce``. Batches may differ in shape from rank to rank (each pads its own).
    """
    if isinstance(logits_per_rank, torch.Tensor) or isinstance(labels_per_rank, torch.Tensor):
        raise TypeError("Pass one tensor per rank in a list: [logits of rank 0, logits of rank 1, ...] and the same "
                        "for the labels (the ranks' batches may have different lengths).")
    if len(logits_per_rank) != len(labels_per_rank) or not logits_per_rank:
        raise ValueError(f"{len(logits_per_rank)} ranks of logits and {len(labels_per_rank)} of labels: give one "
                         "of each per rank (at least one rank).")
    parts = [answer_token_loss_sum(x, y) for x, y in zip(logits_per_rank, labels_per_rank, strict=True)]
    sums = [total for total, _ in parts]
    tokens = sum(int(count) for _, count in parts)  # in DDP: all_reduce(count, SUM)
    if tokens == 0:
        raise ValueError("No rank has an answer token (every label is -100): there is no loss to train on. Check "
                         "the labels: prompt and padding are -100, the answer's tokens keep their ids.")
    world_size = len(sums)
    return [total * world_size / tokens for total in sums]
