"""check.global_token_loss both ways, and the reference against a real (simulated) DDP step.

The course's reference is also compared with what DDP does with it: N replicas of a small model, each
backpropagating its own rank's loss, gradients averaged; that must equal one process on the whole batch.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from answers import checks_own_solution
from torch import nn

from course import check
from course.distributed import answer_token_loss_sum, global_token_loss

# ---------------------------------------------------------------------------
# The reference: DDP with it equals one process
# ---------------------------------------------------------------------------


def _ranks(seed, shapes_and_spans, vocab=11, hidden=6):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for rows, width, spans in shapes_and_spans:
        features = torch.randn(rows, width, hidden, generator=g)
        labels = torch.full((rows, width), -100)
        for row, (start, stop) in enumerate(spans):
            labels[row, start:stop] = torch.randint(vocab, (stop - start,), generator=g)
        batches.append((features, labels))
    return batches


RANKS = [(2, 5, [(3, 5), (4, 5)]), (3, 4, [(1, 4), (0, 3), (1, 4)]), (1, 7, [(0, 0)]), (2, 6, [(1, 6), (5, 6)])]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ddp_averaging_of_the_reference_losses_equals_one_process(world_size):
    batches = _ranks(world_size, RANKS[:world_size])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 11))
    # One process: all the rows, the mean over every answer token (padding the batches to one width).
    width = max(f.shape[1] for f, _ in batches)
    features = torch.cat([F.pad(f, (0, 0, 0, width - f.shape[1])) for f, _ in batches])
    labels = torch.cat([F.pad(y, (0, width - y.shape[1]), value=-100) for _, y in batches])
    loss = F.cross_entropy(model(features).flatten(0, 1), labels.flatten(), ignore_index=-100)
    one_process = torch.autograd.grad(loss, list(model.parameters()))
    # DDP: one replica per rank, each rank's own loss, then the all-reduce's average.
    replicas = [copy.deepcopy(model) for _ in batches]
    logits = [replica(f) for replica, (f, _) in zip(replicas, batches, strict=True)]
    losses = global_token_loss(logits, [y for _, y in batches])
    per_rank = [torch.autograd.grad(loss_r, list(replica.parameters()))
                for loss_r, replica in zip(losses, replicas, strict=True)]
    averaged = [torch.stack(grads).mean(0) for grads in zip(*per_rank, strict=True)]
    for got, want in zip(averaged, one_process, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.stack(losses).mean(), loss.detach(), rtol=1e-5, atol=1e-7)


def test_a_per_rank_mean_does_not_equal_one_process():
    """The test above can fail: the usual mistake gives another gradient on these batches."""
    batches = _ranks(2, RANKS[:2])
    torch.manual_seed(0)
    model = nn.Linear(6, 11)
    width = max(f.shape[1] for f, _ in batches)
    features = torch.cat([F.pad(f, (0, 0, 0, width - f.shape[1])) for f, _ in batches])
    labels = torch.cat([F.pad(y, (0, width - y.shape[1]), value=-100) for _, y in batches])
    want = torch.autograd.grad(F.cross_entropy(model(features).flatten(0, 1), labels.flatten()), model.weight)[0]
    means = [F.cross_entropy(model(f).flatten(0, 1), y.flatten()) for f, y in batches]
    got = torch.stack([torch.autograd.grad(m, model.weight)[0] for m in means]).mean(0)
    assert (got - want).abs().max() > 1e-3


def test_bad_input_is_refused_with_what_to_do():
    logits, labels = torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="one tensor per rank in a list"):
        global_token_loss(logits, labels)
    with pytest.raises(ValueError, match="2 ranks of logits and 1 of labels"):
        global_token_loss([logits, logits], [labels])
    with pytest.raises(ValueError, match="No rank has an answer token"):
        global_token_loss([logits], [torch.full((2, 3), -100)])
    with pytest.raises(ValueError, match="do not match"):
        answer_token_loss_sum(logits, labels[:, :2])


# ---------------------------------------------------------------------------
# Correct answers, written differently
# ---------------------------------------------------------------------------


def gathered(logits_per_rank, labels_per_rank):
    """log_softmax and gather, the mask written out; the count as a tensor."""
    count = torch.stack([(y != -100).sum() for y in labels_per_rank]).sum()
    out = []
    for x, y in zip(logits_per_rank, labels_per_rank, strict=True):
        mask = y != -100
        picked = x.log_softmax(-1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
        out.append(-(picked * mask).sum() * len(logits_per_rank) / count)
    return out


def mean_times_count(logits_per_rank, labels_per_rank):
    """Each rank's mean times its own count (a sum again), guarded for a rank with no answer token."""
    counts = [int((y != -100).sum()) for y in labels_per_rank]
    world, total = len(counts), sum(counts)
    out = []
    for x, y, n in zip(logits_per_rank, labels_per_rank, counts, strict=True):
        if n == 0:
            out.append(x.sum() * 0.0)  # still a tensor in the graph, gradient zero
        else:
            out.append(F.cross_entropy(x.reshape(-1, x.shape[-1]), y.reshape(-1)) * n * world / total)
    return out


def stacked(logits_per_rank, labels_per_rank):
    """A 1-D tensor of losses, each from nll_loss in float64."""
    total = sum((y != -100).sum() for y in labels_per_rank)
    return torch.stack([F.nll_loss(x.double().log_softmax(-1).flatten(0, 1), y.flatten(), reduction="sum")
                        for x, y in zip(logits_per_rank, labels_per_rank, strict=True)]) * len(labels_per_rank) / total


def _fallback_solution():
    return checks_own_solution(check.global_token_loss, "global_token_loss", torch=torch, F=F)


@pytest.mark.parametrize("answer", [global_token_loss, gathered, mean_times_count, stacked, _fallback_solution()],
                         ids=["reference", "gathered", "mean_times_count", "stacked", "fallback_solution"])
def test_correct_answers_pass(answer):
    result = check.global_token_loss.run(answer)
    assert result.status == "passed", result.message


# ---------------------------------------------------------------------------
# Typical mistakes
# ---------------------------------------------------------------------------


def _sums(logits_per_rank, labels_per_rank):
    return [F.cross_entropy(x.flatten(0, 1), y.flatten(), reduction="sum")
            for x, y in zip(logits_per_rank, labels_per_rank, strict=True)]


def per_rank_mean(logits_per_rank, labels_per_rank):
    return [F.cross_entropy(x.flatten(0, 1), y.flatten()) for x, y in zip(logits_per_rank, labels_per_rank,
                                                                           strict=True)]


def per_rank_mean_guarded(logits_per_rank, labels_per_rank):
    """A per-rank mean that dodges the 0 / 0: still the local count."""
    out = []
    for s, y in zip(_sums(logits_per_rank, labels_per_rank), labels_per_rank, strict=True):
        out.append(s / max(int((y != -100).sum()), 1))
    return out


def mean_over_ranks(logits_per_rank, labels_per_rank):
    return [m / len(logits_per_rank) for m in per_rank_mean_guarded(logits_per_rank, labels_per_rank)]


def ranks_only(logits_per_rank, labels_per_rank):
    return [s / len(logits_per_rank) for s in _sums(logits_per_rank, labels_per_rank)]


def no_world_size(logits_per_rank, labels_per_rank):
    total = sum(int((y != -100).sum()) for y in labels_per_rank)
    return [s / total for s in _sums(logits_per_rank, labels_per_rank)]


def counts_padding(logits_per_rank, labels_per_rank):
    positions = sum(y.numel() for y in labels_per_rank)
    return [s * len(logits_per_rank) / positions for s in _sums(logits_per_rank, labels_per_rank)]


def local_positions(logits_per_rank, labels_per_rank):
    return [s / y.numel() for s, y in zip(_sums(logits_per_rank, labels_per_rank), labels_per_rank, strict=True)]


def not_normalised(logits_per_rank, labels_per_rank):
    return _sums(logits_per_rank, labels_per_rank)


def global_mean_everywhere(logits_per_rank, labels_per_rank):
    total = sum(int((y != -100).sum()) for y in labels_per_rank)
    loss = sum(_sums(logits_per_rank, labels_per_rank)) / total
    return [loss] * len(logits_per_rank)


def as_numbers(logits_per_rank, labels_per_rank):
    return [torch.tensor(loss.item()) for loss in global_token_loss(logits_per_rank, labels_per_rank)]


def one_number(logits_per_rank, labels_per_rank):
    return sum(global_token_loss(logits_per_rank, labels_per_rank)) / len(logits_per_rank)


def one_too_many(logits_per_rank, labels_per_rank):
    losses = global_token_loss(logits_per_rank, labels_per_rank)
    return [*losses, losses[0]]


@pytest.mark.parametrize(
    ("answer", "phrases"),
    [
        (per_rank_mean, ["For 2 ranks with 3 and 9 answer tokens", "*own* number of answer tokens",
                         "answer tokens of *all* ranks"]),
        (per_rank_mean_guarded, ["*own* number of answer tokens"]),
        (mean_over_ranks, ["own mean by the number of ranks", "DDP already averages"]),
        (ranks_only, ["divide by the number of ranks only", "global"]),
        (no_world_size, ["Right count", "multiply each rank's loss by the number of ranks"]),
        (counts_padding, ["Count only the answer tokens", "prompt and padding included"]),
        (local_positions, ["its own number of positions"]),
        (not_normalised, ["plain sums"]),
        (global_mean_everywhere, ["Every rank returns the loss of the whole global batch"]),
        (as_numbers, ["does not depend on its logits for autograd"]),
        (one_number, ["one number for 2 ranks", "one loss per rank"]),
        (one_too_many, ["you return 3 losses"]),
    ],
)
def test_each_mistake_fails_with_its_own_message(answer, phrases):
    result = check.global_token_loss.run(answer)
    assert result.status == "failed", f"{answer.__name__} passed"
    for phrase in phrases:
        assert phrase in result.message, result.message


def test_a_mean_that_is_nan_on_a_rank_without_answer_tokens_is_named():
    def mean_times_count_unguarded(logits_per_rank, labels_per_rank):
        counts = [int((y != -100).sum()) for y in labels_per_rank]
        return [F.cross_entropy(x.flatten(0, 1), y.flatten()) * n * len(counts) / sum(counts)
                for x, y, n in zip(logits_per_rank, labels_per_rank, counts, strict=True)]

    result = check.global_token_loss.run(mean_times_count_unguarded)
    assert result.status == "failed"
    assert "3 ranks, the second with no answer token" in result.message and "NaN" in result.message


def test_a_loss_that_reads_another_ranks_logits_fails_even_with_the_right_values():
    def borrows(logits_per_rank, labels_per_rank):
        losses = global_token_loss(logits_per_rank, labels_per_rank)
        other = logits_per_rank[-1]
        return [loss + 0.0 * other.sum() + (other.sum() - other.sum().detach()) for loss in losses]

    result = check.global_token_loss.run(borrows)
    assert result.status == "failed" and "depends on rank 1's logits" in result.message, result.message


def test_a_stub_is_not_attempted():
    def stub(logits_per_rank, labels_per_rank):
        raise NotImplementedError()

    assert check.global_token_loss.run(stub).status == "not_attempted"


def test_the_solution_falls_back_to_the_checks_own_until_the_notebook_has_the_exercise(monkeypatch):
    from course.check import core

    monkeypatch.setattr(core, "_solutions_in_manifest", lambda: {})
    assert check.global_token_loss.solution_source().startswith("def global_token_loss(logits_per_rank, ")
    monkeypatch.setattr(core, "_solutions_in_manifest", lambda: {"global_token_loss": "# the notebook's answer"})
    assert check.global_token_loss.solution_source() == "# the notebook's answer"
