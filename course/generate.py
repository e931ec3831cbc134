"""Chat-formatted greedy generation and task accuracy (notebooks 00-02)."""

from __future__ import annotations

import torch

from course.data import exact_match


def chat_prompt(tokenizer, question: str) -> str:
    """The question in the model's chat template, ready for the assistant's reply."""
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def generate(model, tokenizer, questions, *, max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Greedy replies to ``questions`` (a string or a list), decoded without special tokens."""
    single = isinstance(questions, str)
    questions = [questions] if single else list(questions)
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    replies: list[str] = []
    try:
        for start in range(0, len(questions), batch_size):
            texts = [chat_prompt(tokenizer, q) for q in questions[start : start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = out[:, batch["input_ids"].shape[1] :]
            replies += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return replies[0] if single else replies


def accuracy(model, tokenizer, dataset, *, batch_size: int = 32) -> float:
    """Exact-match accuracy of greedy replies on a split with ``prompt`` and ``answer`` columns."""
    replies = generate(model, tokenizer, dataset["prompt"], max_new_tokens=6, batch_size=batch_size)
    return exact_match(replies, dataset["answer"])
