"""The training loop: answer-only labels, seeded, learns, clear errors."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from course.data import addition_splits
from course.train import (
    IGNORE_INDEX,
    History,
    default_budget,
    encode_example,
    plot_histories,
    train,
)


def tiny_model(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


def test_labels_mask_everything_but_the_answer(tokenizer):
    ids, labels = encode_example(tokenizer, "What is 1+2?", "3")
    assert len(ids) == len(labels)
    kept = [t for t, y in zip(ids, labels, strict=True) if y != IGNORE_INDEX]
    assert tokenizer.decode(kept) == "3" + tokenizer.eos_token
    assert ids[-len(kept):] == kept


def test_train_is_seeded_and_learns(tokenizer):
    split = addition_splits(n_train=4, n_eval=4)["train"]
    model = tiny_model(len(tokenizer))
    long = train(model, tokenizer, split, steps=15, batch_size=4, lr=1e-2, progress=False)
    short = train(tiny_model(len(tokenizer)), tokenizer, split, steps=3, batch_size=4, lr=1e-2, progress=False)
    assert short.losses == long.losses[:3]  # same seed, same batches, same numbers
    assert long.losses[-1] < 0.5 * long.losses[0]
    assert not model.training


def test_eval_schedule(tokenizer):
    split = addition_splits(n_train=8, n_eval=4)["train"]
    calls = []
    history = train(tiny_model(len(tokenizer)), tokenizer, split, steps=5, batch_size=2,
                    eval_fn=lambda m: calls.append(m.training) or 0.5, eval_every=2, progress=False)
    assert history.eval_steps == [0, 2, 4, 5]
    assert history.final_score == 0.5
    assert history.seconds > 0


def test_no_trainable_parameters_is_a_clear_error(tokenizer):
    model = tiny_model(len(tokenizer)).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, tokenizer, addition_splits(n_train=4, n_eval=1)["train"], steps=1, progress=False)


def test_budget_scales_with_device_and_quick_mode(monkeypatch):
    monkeypatch.delenv("COURSE_QUICK", raising=False)
    cpu, gpu = default_budget("cpu"), default_budget("cuda")
    assert gpu.steps > cpu.steps and gpu.batch_size >= cpu.batch_size
    monkeypatch.setenv("COURSE_QUICK", "1")
    assert default_budget("cpu").steps < cpu.steps


def test_plot_histories_draws_both_panels():
    h = History(losses=[3.0, 2.0, 1.0], eval_steps=[0, 3], eval_scores=[0.0, 0.5])
    fig = plot_histories({"a": h, "b": h})
    left, right = fig.axes
    assert len(left.lines) == 2 and len(right.lines) == 2
    assert list(right.lines[0].get_ydata()) == [0.0, 0.5]


def test_an_empty_dataset_is_refused_at_once():
    import signal

    def hung(*args):
        raise TimeoutError("train never returned")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        with pytest.raises(ValueError, match="The dataset is empty"):
            train(torch.nn.Linear(2, 2), None, {"prompt": [], "answer": []}, steps=1, progress=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
