"""The course's running task: two-digit addition, generated deterministically (notebook 00).

"What is 37+45? Reply with the number only." -> "82". The base model gets almost
none of these right; a LoRA trained for a couple of CPU minutes gets most of them,
so every chapter can show a real, measured improvement on held-out questions.

Splits are ``datasets.Dataset`` objects. Each row has ``prompt`` (the question),
``answer`` (the number as text), and ``messages`` (the chat format TRL's
``SFTTrainer`` takes). ``addition_preferences`` adds ``chosen`` / ``rejected`` for
DPO, and ``addition_reward`` scores completions for GRPO. Replies are scored by
``exact_match`` (the first number must be the sum) and, leniently, by ``lenient_match``
(the sum appears anywhere in the reply).
"""

from __future__ import annotations

import random
import re

QUESTION = "What is {a}+{b}? Reply with the number only."
_NUMBER = re.compile(r"-?\d+")


def _all_pairs() -> list[tuple[int, int]]:
    return [(a, b) for a in range(10, 100) for b in range(10, 100)]


def addition_pairs(n_train: int = 2000, n_eval: int = 64, seed: int = 0):
    """Disjoint lists of (a, b) pairs for training and evaluation, fixed by ``seed``."""
    pairs = _all_pairs()
    if n_train + n_eval > len(pairs):
        raise ValueError(f"n_train + n_eval must be at most {len(pairs)} (there are no more two-digit pairs)")
    random.Random(seed).shuffle(pairs)
    return pairs[n_eval : n_eval + n_train], pairs[:n_eval]


def _row(a: int, b: int) -> dict:
    prompt = QUESTION.format(a=a, b=b)
    answer = str(a + b)
    return {
        "prompt": prompt,
        "answer": answer,
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ],
    }


def addition_splits(n_train: int = 2000, n_eval: int = 64, seed: int = 0):
    """``DatasetDict`` with ``train`` and ``eval`` splits of the addition task (no overlap)."""
    from datasets import Dataset, DatasetDict

    train, held_out = addition_pairs(n_train, n_eval, seed)
    return DatasetDict(
        train=Dataset.from_list([_row(a, b) for a, b in train]),
        eval=Dataset.from_list([_row(a, b) for a, b in held_out]),
    )


def wrong_answer(a: int, b: int, rng: random.Random) -> str:
    """A plausible mistake: the carry forgotten, or off by ten, or off by one."""
    right = a + b
    no_carry = (a // 10 + b // 10) % 10 * 10 + (a + b) % 10
    candidates = {no_carry, right + 10, right - 10, right + 1, right - 1} - {right}
    return str(rng.choice(sorted(candidates)))


def addition_preferences(n_train: int = 2000, n_eval: int = 64, seed: int = 0):
    """Preference version for DPO: conversational ``prompt``, ``chosen``, ``rejected``."""
    from datasets import Dataset, DatasetDict

    rng = random.Random(seed + 1)
    train, held_out = addition_pairs(n_train, n_eval, seed)

    def row(a: int, b: int) -> dict:
        prompt = QUESTION.format(a=a, b=b)
        return {
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": str(a + b)}],
            "rejected": [{"role": "assistant", "content": wrong_answer(a, b, rng)}],
            "answer": str(a + b),
        }

    return DatasetDict(
        train=Dataset.from_list([row(a, b) for a, b in train]),
        eval=Dataset.from_list([row(a, b) for a, b in held_out]),
    )


def extract_number(text: str) -> str | None:
    """The first integer in a model's reply, or None."""
    match = _NUMBER.search(text)
    return match.group(0) if match else None


def is_correct(reply: str, answer: str) -> bool:
    """Exact match on the first number of the reply."""
    return extract_number(reply) == str(answer).strip()


def _paired(replies, answers, metric: str) -> list[tuple[str, str]]:
    replies, answers = list(replies), list(answers)
    if len(replies) != len(answers):
        raise ValueError(f"{len(replies)} replies for {len(answers)} answers")
    if not answers:
        raise ValueError(f"{metric} needs at least one answer")
    return list(zip(replies, answers, strict=True))


def exact_match(replies, answers) -> float:
    """Fraction of replies whose first number equals the answer."""
    pairs = _paired(replies, answers, "exact_match")
    return sum(is_correct(r, a) for r, a in pairs) / len(pairs)


def contains_answer(reply: str, answer: str) -> bool:
    """Whether the answer appears as a whole number anywhere in the reply (notebooks 00, 02).

    ``"56 + 29 = 85"`` contains ``"85"``; ``"850"`` and ``"8.5"`` do not. On the addition task
    restating the question cannot score: a sum of two two-digit numbers is neither of them.
    """
    return str(answer).strip() in _NUMBER.findall(reply)


def lenient_match(replies, answers) -> float:
    """Fraction of replies that contain the answer anywhere (``contains_answer``), whatever the format.

    Beside ``exact_match`` it separates format from arithmetic: a model that writes
    ``"56 + 29 = 85"`` has the sum right (lenient) in the wrong format (exact).
    """
    pairs = _paired(replies, answers, "lenient_match")
    return sum(contains_answer(r, a) for r, a in pairs) / len(pairs)


def addition_reward(completions, answer, **kwargs) -> list[float]:
    """GRPO reward (TRL's reward-function signature): 1.0 for a correct number, else 0.0.

    ``completions`` are strings or conversational lists of messages.
    """
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if is_correct(t, a) else 0.0 for t, a in zip(texts, answer, strict=True)]
