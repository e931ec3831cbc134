"""Checks for notebook 08, from notebook to cluster: ``check.global_token_loss``.

The answer is ``f(logits_per_rank, labels_per_rank) -> list of per-rank losses``: the losses that N
data-parallel processes backpropagate so that training equals one process on the whole batch.

What is modelled, precisely: rank r backpropagates ``losses[r]`` into its own replica of the model;
DDP's all-reduce then *averages* the parameter gradients over the N ranks. Whatever the model, that
average equals the gradient of one process's loss ``L = (sum of the cross-entropy over every answer
token of the global batch) / (their number)`` exactly when, for every rank r,

* ``losses[r]`` depends on rank r's logits only (a process has no other rank's logits), and
* ``(1 / N) * d losses[r] / d logits_r == d L / d logits_r``,

because the parameter gradient is the logits' gradient pulled back through the (shared) model. The
check verifies both with autograd on seeded logits, and that the mean of the losses is L (the number
a run logs), on batches of unequal numbers of answer tokens, of different lengths per rank, and with a
rank that holds no answer token at all. The reference is ``course.distributed.global_token_loss``
(what ``course.finetune`` trains with); a wrong answer is matched against the usual mistakes.
"""

from __future__ import annotations

import torch

from course.check.core import Failure, check, close, expect

IGNORE = -100
VOCAB = 7

#: Shown by ``check.global_token_loss.solution()`` until notebook 08 has the exercise (the manifest's answer wins).
_SOLUTION = '''\
def global_token_loss(logits_per_rank, labels_per_rank):
    # Each rank's summed answer-token loss over the GLOBAL answer-token count, times the number of ranks.
    world_size = len(logits_per_rank)
    tokens = sum(int((labels != -100).sum()) for labels in labels_per_rank)  # in DDP: one all_reduce
    losses = []
    for logits, labels in zip(logits_per_rank, labels_per_rank):
        total = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="sum")
        losses.append(total * world_size / tokens)  # DDP averages the gradients: times world_size undoes that
    return losses'''


def _batch(generator, rows: int, width: int, spans):
    """Seeded logits (rows, width, VOCAB) and labels with -100 outside each row's answer span [start, stop)."""
    logits = torch.randn(rows, width, VOCAB, generator=generator) * 2
    labels = torch.full((rows, width), IGNORE, dtype=torch.long)
    for row, (start, stop) in enumerate(spans):
        labels[row, start:stop] = torch.randint(VOCAB, (stop - start,), generator=generator)
    return logits, labels


def _cases():
    """(label, logits per rank, labels per rank); prompts and padding are -100."""
    g = torch.Generator().manual_seed(0)
    yield ("2 ranks with 3 and 9 answer tokens", *zip(
        _batch(g, 2, 5, [(3, 5), (4, 5)]),  # short answers after long prompts, 10 positions
        _batch(g, 3, 4, [(1, 4), (0, 3), (1, 4)]),  # 12 positions, 9 answer tokens
        strict=True))
    yield ("3 ranks, the second with no answer token at all (5, 0 and 6)", *zip(
        _batch(g, 1, 6, [(1, 6)]),
        _batch(g, 2, 3, [(0, 0), (0, 0)]),
        _batch(g, 2, 5, [(2, 5), (2, 5)]),
        strict=True))
    yield ("1 rank (one process) with 7 answer tokens", *zip(_batch(g, 2, 6, [(2, 6), (3, 6)]), strict=True))


def _parts(logits_per_rank, labels_per_rank):
    """Per rank, in float64: summed answer-token CE, answer tokens, positions."""
    from course.distributed import answer_token_loss_sum

    sums, counts, positions = [], [], []
    for logits, labels in zip(logits_per_rank, labels_per_rank, strict=True):
        total, count = answer_token_loss_sum(logits.detach().double(), labels)
        sums.append(total.item())
        counts.append(int(count))
        positions.append(labels.numel())
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64), \
        torch.tensor(positions, dtype=torch.float64)


def _reference(logits_per_rank, labels_per_rank):
    from course.distributed import global_token_loss

    return global_token_loss(logits_per_rank, labels_per_rank)


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    # float32 cross-entropies of a dozen tokens: rounding ~1e-6; every mistake is off by 10 % or more.
    return close(got, want, rtol=1e-4, atol=1e-6, equal_nan=True)


def _mistakes(sums, counts, positions):
    """(per-rank values a typical mistake returns, message)."""
    n, tokens, everything = len(sums), counts.sum(), positions.sum()
    with torch.no_grad():
        local_mean = sums / counts  # nan where a rank has no answer token
    padded = "Count only the answer tokens, `(labels != -100).sum()`: "
    return [
        (local_mean, "Each rank divides by its *own* number of answer tokens (a per-rank mean, e.g. "
         "`F.cross_entropy(..., ignore_index=-100)` with its default mean). DDP then averages those means, which "
         "weights every token of a rank with few answer tokens more than one of a rank with many, and a rank "
         "with none divides 0 by 0. Divide each rank's *sum* by the answer tokens of *all* ranks."),
        (local_mean / n, "You divide each rank's own mean by the number of ranks: the count is still local (a "
         "rank with few answer tokens weighs more), and DDP already averages over the ranks. Sum each rank's "
         "losses, divide by the answer tokens of all ranks and multiply by the number of ranks."),
        (sums / n, "You divide by the number of ranks only: the loss must be normalised by the number of "
         "answer tokens of the whole (global) batch, as one process's mean over those tokens is."),
        (sums / tokens, "Right count, but DDP *averages* the gradients over the ranks, which divides them by "
         "the number of ranks once more: multiply each rank's loss by the number of ranks "
         "(world_size = len(logits_per_rank)) to undo it."),
        (sums, "Your losses are the plain sums of each rank's token losses: divide by the number of answer "
         "tokens of all ranks (and multiply by the number of ranks, which DDP's averaging divides by)."),
        (local_mean * n, "Each rank divides by its own number of answer tokens: use the answer tokens of "
         "*all* ranks (one all_reduce of the counts)."),
        (sums * n / everything, padded + "you divide by every position of the global batch, prompt and "
         "padding included (labels -100 carry no loss and must not count)."),
        (sums / everything, padded + "you divide by every position of the global batch, prompt and padding "
         "included; and DDP's averaging needs the factor world_size."),
        (sums / positions, padded + "you divide each rank's sum by its own number of positions, prompt and "
         "padding included (and a local count weighs ranks unequally)."),
        (torch.full_like(sums, (sums.sum() / tokens).item()), "Every rank returns the loss of the whole global "
         "batch. A process only has its own rank's logits: rank r's loss may use only rank r's logits (only the "
         "token count is shared, by an all_reduce): its summed loss times world_size over the global count."),
    ]


def _call(answer, logits_per_rank, labels_per_rank):
    leaves = [x.clone().requires_grad_() for x in logits_per_rank]
    out = answer(list(leaves), [y.clone() for y in labels_per_rank])
    n = len(leaves)
    if isinstance(out, torch.Tensor) and (out.dim() == 0 or n > 1 and out.numel() == 1):
        raise Failure(f"You return one number for {n} ranks. Return a list with one loss per rank: each process "
                      "backpropagates its own loss, and DDP averages their gradients.")
    expect(isinstance(out, (list, tuple)) or (isinstance(out, torch.Tensor) and out.dim() == 1),
           f"Return a list of {n} losses, one per rank, got a {type(out).__name__}.")
    losses = list(out)
    expect(len(losses) == n, f"For {n} ranks you return {len(losses)} losses; return one per rank.")
    for r, loss in enumerate(losses):
        expect(isinstance(loss, torch.Tensor) and loss.numel() == 1, f"Rank {r}'s loss is "
               f"{'a tensor of shape ' + str(tuple(loss.shape)) if isinstance(loss, torch.Tensor) else 'a ' + type(loss).__name__}: "
               "each rank's loss is one number, a tensor that autograd can differentiate.")
    return leaves, [loss.reshape(()) for loss in losses]


def _judge(answer, label, logits_per_rank, labels_per_rank) -> None:
    where = f"For {label}"
    leaves, losses = _call(answer, logits_per_rank, labels_per_rank)
    n = len(leaves)
    got = torch.stack([loss.detach().double() for loss in losses])
    want = torch.stack([loss.detach().double() for loss in _reference(logits_per_rank, labels_per_rank)])
    if not _close(got, want):
        sums, counts, positions = _parts(logits_per_rank, labels_per_rank)
        if torch.isnan(got).any() and (counts == 0).any():
            raise Failure(f"{where}: some of your losses are NaN. A rank whose labels are all -100 has no answer "
                          "token: its own mean is 0 / 0. Sum each rank's token losses and divide by the answer "
                          "tokens of all ranks: that rank's loss is then 0.")
        for wrong, message in _mistakes(sums, counts, positions):
            if _close(got, wrong):
                raise Failure(f"{where}: {message}")
        raise Failure(f"{where}: your per-rank losses are {[round(v, 4) for v in got.tolist()]}; want "
                      f"{[round(v, 4) for v in want.tolist()]}: world_size x (rank's summed cross-entropy over its "
                      "answer tokens) / (answer tokens of all ranks).")
    # The gradients DDP would average: each rank's loss into its own logits only.
    single = [x.clone().requires_grad_() for x in logits_per_rank]
    from course.distributed import answer_token_loss_sum

    parts = [answer_token_loss_sum(x, y) for x, y in zip(single, labels_per_rank, strict=True)]
    total = sum(p[0] for p in parts) / sum(int(p[1]) for p in parts)  # one process, the whole batch
    want_grads = torch.autograd.grad(total, single)
    for r, loss in enumerate(losses):
        expect(loss.requires_grad, f"{where}: rank {r}'s loss does not depend on its logits for autograd (did you "
               "use .item(), .detach() or torch.no_grad()?): no gradient would reach the model.")
        grads = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
        for s, grad in enumerate(grads):
            if s != r and grad is not None and grad.abs().max() > 0:
                raise Failure(f"{where}: rank {r}'s loss depends on rank {s}'s logits. In DDP a process has only "
                              "its own batch's logits; what ranks share is one number, the count of answer tokens "
                              "(an all_reduce). Compute rank r's loss from logits_per_rank[r] alone.")
        mine = grads[r]
        expect(mine is not None and close(mine / n, want_grads[r], rtol=1e-4, atol=1e-7),
               f"{where}: the gradient of rank {r}'s loss, averaged by DDP over {n} ranks, is not the one-process "
               f"gradient on rank {r}'s logits, although the values agree. Compute the loss with differentiable torch "
               "operations (F.cross_entropy with reduction='sum'), not from constants.")


@check(
    "global_token_loss",
    hint=[
        "One process on the whole batch minimises the mean over *all* answer tokens: (sum of their "
        "cross-entropies) / (their number). Each rank holds some of those tokens, so each rank contributes its "
        "own sum divided by the global count. DDP then averages the ranks' gradients, dividing by world_size: "
        "multiply by it to undo that.",
        "Count the answer tokens of every rank, `sum((labels != -100).sum() for labels in labels_per_rank)` (in "
        "a real run an all_reduce). Each rank's sum: `F.cross_entropy(logits.flatten(0, -2), labels.flatten(), "
        "ignore_index=-100, reduction='sum')`.",
        "`losses = [F.cross_entropy(x.flatten(0, -2), y.flatten(), ignore_index=-100, reduction='sum') * "
        "len(logits_per_rank) / tokens for x, y in zip(logits_per_rank, labels_per_rank)]`",
    ],
    solution=_SOLUTION,  # the solution notebook's answer replaces it once notebook 08 has the exercise
    reference="course.distributed:global_token_loss",
)
def global_token_loss(answer):
    """``answer(logits_per_rank, labels_per_rank) -> [loss of rank 0, ...]``: DDP's average equals one process."""
    expect(callable(answer), f"Expected a function f(logits_per_rank, labels_per_rank), got {type(answer).__name__}. "
           "Pass the function itself: check.global_token_loss(global_token_loss).")
    for label, logits_per_rank, labels_per_rank in _cases():
        _judge(answer, label, list(logits_per_rank), list(labels_per_rank))
