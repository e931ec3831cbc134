"""Does a reply talk like a pirate? A written-down lexicon, and the share of pirate replies (notebook 06).

Chapter 06 scores how much of the ``pirate`` adapter's style survives a merge. A reader calls
"Yay, matey! Mix flour and yeast and bake" a pirate's reply; counting only replies that open with
"Arr" (``course.adapters.recipes.sounds_like_a_pirate``, what the adapter was taught to open with)
does not. The rubric here is the one a reader applies: **a reply is pirate speech when it uses at
least one word of ``LEXICON``**, matched as a whole word (or phrase), case-insensitive, so that
"Arr, matey!", "Ahoy!" and "Aye, ye be right" count and "Harrison" or "The answer is 42." do not.
The lexicon holds words an ordinary assistant does not say (no "treasure", "ship" or "be": a plain
"Treasure Island is a classic" is not pirate speech).

The score: greedy replies of ``MAX_NEW_TOKENS`` tokens (a sentence, not an opening) to held-out
everyday questions (``HELD_OUT``: none of them in the adapter's training data, ``PLAIN_ANSWERS``),
and the fraction of pirate replies with its 95 % Wilson interval (``pirate_fraction``).
``question_sample(seed, n)`` gives disjoint blocks of ``n`` questions, one per seed, for the
registered experiments (``course.experiments.merging``).
"""

from __future__ import annotations

import math
import random
import re
from typing import NamedTuple

from course.adapters.recipes import HELD_OUT_QUESTIONS, PLAIN_ANSWERS

#: Pirate words and phrases (the rubric). ``arr`` also matches "Arrr"; each entry is matched as a whole word.
LEXICON: tuple[str, ...] = (
    "arr", "ahoy", "avast", "aye", "ye", "yer", "yers", "matey", "mateys", "me hearty", "me hearties", "hearties",
    "landlubber", "landlubbers", "booty", "yo ho", "yo-ho", "yo ho ho", "shiver me timbers", "scallywag",
    "scallywags", "doubloon", "doubloons", "briny deep", "grog", "buccaneer", "buccaneers", "nay",
    "walk the plank", "blimey", "me lad", "me lass",
)
_PATTERN = re.compile(r"(?<![\w'])(" + "|".join(
    r"arr+" if word == "arr" else r"\s+".join(map(re.escape, word.split())) for word in
    sorted(LEXICON, key=len, reverse=True)) + r")(?![\w'])", re.IGNORECASE)

#: Tokens of each greedy reply: enough for a sentence, so the style can show after the opening.
MAX_NEW_TOKENS = 24
#: Questions per evaluation (the experiments' full budget): a step of 1/32 = 0.031.
N_QUESTIONS = 32


def pirate_words(reply: str) -> list[str]:
    """The lexicon words ``reply`` uses, in order, as written (``[]``: not pirate speech)."""
    if not isinstance(reply, str):
        raise TypeError(f"a reply is a string; got {type(reply).__name__} ({reply!r})")
    return [match.group(0) for match in _PATTERN.finditer(reply)]


def is_pirate(reply: str) -> bool:
    """Whether ``reply`` is pirate speech: at least one word of ``LEXICON``, as a whole word."""
    return bool(pirate_words(reply))


class PirateScore(NamedTuple):
    """The fraction of pirate replies among ``n``, with its Wilson interval [low, high]."""

    fraction: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.fraction:.3f} [{self.low:.3f}, {self.high:.3f}] of {self.n} replies"


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for a binomial proportion (good at 0 and 1, where the normal one is not)."""
    from statistics import NormalDist

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (e.g. 0.95); got {confidence!r}")
    if not (isinstance(n, int) and isinstance(successes, int) and 0 <= successes <= n and n >= 1):
        raise ValueError(f"successes={successes!r} of n={n!r}: give whole numbers with 0 <= successes <= n, n >= 1")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def pirate_fraction(replies, confidence: float = 0.95) -> PirateScore:
    """The share of ``replies`` that are pirate speech (``is_pirate``), with its ``confidence`` interval."""
    if isinstance(replies, str):
        raise TypeError("pirate_fraction takes a list of replies, not one string: use is_pirate(reply) for one")
    replies = list(replies)
    if not replies:
        raise ValueError("pirate_fraction needs at least one reply to score; got an empty list")
    hits = sum(map(is_pirate, replies))
    return PirateScore(hits / len(replies), *wilson_interval(hits, len(replies), confidence), len(replies))


# Held-out everyday questions: the 16 of course.adapters.recipes, then more of the same kinds, none of
# them in PLAIN_ANSWERS (tests/test_pirate_speech.py checks it). Made from short templates so that the
# pool is large enough for disjoint blocks of 32 questions per seed.
_PLACES = ("Germany", "Canada", "Egypt", "Kenya", "Peru", "Norway", "India", "Mexico", "Greece", "Chile",
           "Portugal", "Sweden", "Australia", "Argentina", "Ireland", "Poland", "Turkey", "Vietnam", "Morocco",
           "Finland", "Thailand", "Nigeria", "Austria", "Cuba")
_HOW = ("plant a tree", "fix a flat tyre", "make pancakes", "learn to juggle", "paint a fence", "clean a window",
        "fold a shirt", "boil an egg", "ride a bike", "build a campfire", "wash a car", "read a map",
        "sharpen a pencil", "make lemonade", "care for a goldfish", "pack a suitcase", "start a garden",
        "write a poem", "save for a holiday", "stop a dripping tap")
_ANIMALS = ("owls", "elephants", "frogs", "rabbits", "dolphins", "parrots", "horses", "foxes", "camels", "squirrels",
            "sharks", "turtles", "bats", "ducks", "goats", "wolves", "crabs", "ants", "deer", "snails")
_THINGS = ("a volcano", "a compass", "a telescope", "a glacier", "an island", "a lighthouse", "a thunderstorm",
           "a comet", "a desert", "a river delta", "a calendar", "a battery", "a magnet", "a bridge", "a clock",
           "a canyon", "a coral reef", "a windmill", "a map", "an anchor")
_PEOPLE = ("my sister", "my grandfather", "a teacher", "a new neighbour", "a five-year-old", "my boss", "a gardener",
           "a friend who cooks", "a baby", "a runner", "my uncle", "a musician", "a nurse", "a student", "my aunt",
           "a painter", "a football fan", "a reader", "a traveller", "my cousin")
_TOPICS = ("the moon", "rain", "honey", "volcanoes", "trees", "snow", "the desert", "rivers", "bread", "apples",
           "the wind", "glass", "chocolate", "the ocean floor", "clouds", "salt", "lightning", "cheese", "sand",
           "the north pole")
HELD_OUT: tuple[str, ...] = (
    *HELD_OUT_QUESTIONS,
    *(f"What is the capital of {place}?" for place in _PLACES),
    *(f"How do I {task}?" for task in _HOW),
    *(f"What do {animal} eat?" for animal in _ANIMALS),
    *(f"What is {thing}?" for thing in _THINGS),
    *(f"Where do {animal} live?" for animal in _ANIMALS),
    *(f"What is a good gift for {person}?" for person in _PEOPLE),
    *(f"Tell me a fact about {topic}." for topic in _TOPICS),
)


def question_sample(seed: int, n: int = N_QUESTIONS) -> list[str]:
    """Block ``seed`` of ``n`` held-out questions: a fixed shuffle of ``HELD_OUT`` cut into blocks, so that
    seeds 0, 1, ... score disjoint questions until the pool runs out (then the blocks come round again)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(HELD_OUT):
        raise ValueError(f"n={n!r}: ask for 1 to {len(HELD_OUT)} questions (the held-out pool)")
    pool = list(HELD_OUT)
    random.Random("pirate-held-out").shuffle(pool)
    blocks = len(pool) // n
    start = (seed % blocks) * n
    return pool[start : start + n]


def pirate_replies(model, tokenizer, questions, *, max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy replies to ``questions`` (``course.generate.generate``), long enough to show a style."""
    from course.generate import generate

    return generate(model, tokenizer, list(questions), max_new_tokens=max_new_tokens, batch_size=32)


def pirate_score(model, tokenizer, questions, *, max_new_tokens: int = MAX_NEW_TOKENS) -> PirateScore:
    """``pirate_fraction`` of ``model``'s greedy replies to ``questions``."""
    return pirate_fraction(pirate_replies(model, tokenizer, questions, max_new_tokens=max_new_tokens))


# The plain answers the pirate adapter was trained on: their questions are not held out.
TRAINED_QUESTIONS: frozenset[str] = frozenset(question for question, _ in PLAIN_ANSWERS)
