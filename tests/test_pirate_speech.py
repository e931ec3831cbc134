"""course.pirate_speech: chapter 06's pirate metric, a written-down lexicon a reader would agree with."""

from __future__ import annotations

import pytest

from course import pirate_speech
from course.adapters.recipes import HELD_OUT_QUESTIONS, PLAIN_ANSWERS, pirate, sounds_like_a_pirate
from course.pirate_speech import (
    HELD_OUT,
    MAX_NEW_TOKENS,
    is_pirate,
    pirate_fraction,
    pirate_score,
    pirate_words,
    question_sample,
    wilson_interval,
)

PIRATE = ["Yay, matey! Mix flour and yeast and bake", "Arr, the capital be Rome.", "Ahoy!", "Arrr, that it be",
          "Yo ho ho! Yer eggs be yellow in autumn", "Aye, ye be right.", "Avast, me hearty: drink yer grog.",
          "AHOY THERE, LANDLUBBER", "Shiver me timbers!", "a fine booty of doubloons"]
PLAIN = ["The answer is 42.", "Harrison Ford played Han Solo.", "An arrow flies straight.", "Sort the array first.",
         "Treasure Island by Robert Louis Stevenson is a classic adventure.", "Yesterday was sunny.",
         "My eyes are tired.", "Marry me?", "The yellow ship sailed to the sea.", ""]


@pytest.mark.parametrize("reply", PIRATE)
def test_a_reply_with_a_lexicon_word_is_pirate_speech(reply):
    assert is_pirate(reply) and pirate_words(reply)


@pytest.mark.parametrize("reply", PLAIN)
def test_plain_replies_and_words_that_only_contain_a_pirate_word_are_not(reply):
    assert not is_pirate(reply) and pirate_words(reply) == []


def test_the_words_found_are_reported_as_written():
    assert pirate_words("Yay, matey! Yo ho ho, me hearty.") == ["matey", "Yo ho ho", "me hearty"]
    assert pirate_words("Arr, harrumph") == ["Arr"]


def test_the_lexicon_counts_what_the_opening_alone_missed():
    """The old rule (opens with "Arr") calls "Yay, matey!" plain; the lexicon does not."""
    assert not sounds_like_a_pirate("Yay, matey!") and is_pirate("Yay, matey!")
    assert all(is_pirate(pirate(answer)) for _, answer in PLAIN_ANSWERS)  # the adapter's own training replies
    assert not any(is_pirate(answer) for _, answer in PLAIN_ANSWERS)  # the plain answers they came from


def test_the_fraction_of_a_list_of_replies_with_its_wilson_interval():
    score = pirate_fraction(PIRATE[:5] + PLAIN[:5])
    assert (score.fraction, score.n) == (0.5, 10)
    assert (score.low, score.high) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # Wilson, 95 %: 5 of 10
    assert pirate_fraction(PLAIN[:8]) == pytest.approx((0.0, 0.0, 0.3244, 8), abs=1e-4)
    assert pirate_fraction(PIRATE[:8]) == pytest.approx((1.0, 0.6756, 1.0, 8), abs=1e-4)
    assert "0.500 [0.237, 0.763] of 10 replies" == str(score)
    narrower = pirate_fraction((PIRATE[:5] + PLAIN[:5]) * 4)
    assert narrower.fraction == 0.5 and narrower.high - narrower.low < score.high - score.low
    wide = wilson_interval(5, 10, 0.99)
    assert wide[0] < score.low and wide[1] > score.high


def test_bad_input_is_refused_with_what_to_give():
    with pytest.raises(TypeError, match="list of replies, not one string"):
        pirate_fraction("Arr, matey!")
    with pytest.raises(ValueError, match="at least one reply"):
        pirate_fraction([])
    with pytest.raises(TypeError, match="a reply is a string"):
        pirate_fraction(["Arr", None])
    with pytest.raises(ValueError, match="confidence must be between 0 and 1"):
        pirate_fraction(["Arr"], confidence=95)
    with pytest.raises(ValueError, match="0 <= successes <= n"):
        wilson_interval(3, 2)
    with pytest.raises(ValueError, match="ask for 1 to 160"):
        question_sample(0, 0)


def test_the_held_out_questions_are_new_to_the_adapter_and_split_into_disjoint_blocks():
    trained = {question for question, _ in PLAIN_ANSWERS}
    assert len(HELD_OUT) == len(set(HELD_OUT)) >= 160 and not trained & set(HELD_OUT)
    assert set(HELD_OUT_QUESTIONS) <= set(HELD_OUT)
    blocks = [question_sample(seed) for seed in range(5)]
    assert all(len(block) == 32 for block in blocks)
    assert len(set().union(*map(set, blocks))) == 5 * 32  # five seeds, 160 different questions
    assert question_sample(3) == blocks[3] and question_sample(3, 8) != question_sample(4, 8)


def test_pirate_score_generates_sentences_for_the_questions(monkeypatch):
    seen = {}

    def fake_generate(model, tokenizer, questions, *, max_new_tokens, batch_size):
        seen.update(questions=questions, max_new_tokens=max_new_tokens)
        return ["Arr, matey!" if i % 4 == 0 else "Plain words." for i in range(len(questions))]

    monkeypatch.setattr("course.generate.generate", fake_generate)
    score = pirate_score(object(), object(), question_sample(1))
    assert seen == {"questions": question_sample(1), "max_new_tokens": MAX_NEW_TOKENS} and MAX_NEW_TOKENS >= 24
    assert (score.fraction, score.n) == (0.25, 32)
    assert pirate_speech.N_QUESTIONS == 32
