"""The addition task: deterministic, disjoint splits, chat and preference formats, metric, reward."""

import random

import pytest

from course import data


def test_splits_are_deterministic_disjoint_and_sized():
    a, b = data.addition_splits(n_train=300, n_eval=40, seed=3), data.addition_splits(n_train=300, n_eval=40, seed=3)
    assert a["train"]["prompt"] == b["train"]["prompt"] and a["eval"]["prompt"] == b["eval"]["prompt"]
    assert (len(a["train"]), len(a["eval"])) == (300, 40)
    assert not set(a["train"]["prompt"]) & set(a["eval"]["prompt"])
    other = data.addition_splits(n_train=300, n_eval=40, seed=4)
    assert other["eval"]["prompt"] != a["eval"]["prompt"]


def test_rows_are_correct_and_in_chat_format():
    row = data.addition_splits(n_train=5, n_eval=5)["train"][0]
    a, b = map(int, row["prompt"].removeprefix("What is ").split("?")[0].split("+"))
    assert row["answer"] == str(a + b)
    assert row["messages"] == [
        {"role": "user", "content": row["prompt"]},
        {"role": "assistant", "content": row["answer"]},
    ]


def test_too_many_examples_is_a_clear_error():
    with pytest.raises(ValueError, match="at most 8100"):
        data.addition_pairs(n_train=8100, n_eval=1)


def test_preferences_reject_a_wrong_answer():
    prefs = data.addition_preferences(n_train=200, n_eval=10)
    for row in prefs["train"]:
        assert row["chosen"][0]["content"] == row["answer"]
        assert row["rejected"][0]["content"] != row["answer"]
        assert row["prompt"][0]["role"] == "user"


def test_wrong_answer_is_plausible():
    rng = random.Random(0)
    for _ in range(100):
        wrong = int(data.wrong_answer(37, 45, rng))
        assert wrong != 82 and wrong in {72, 92, 81, 83}


@pytest.mark.parametrize(
    ("reply", "answer", "correct"),
    [("82", "82", True), ("The answer is 82.", "82", True), ("37 + 45 = 82", "82", False), ("", "82", False), ("820", "82", False)],
)
def test_exact_match_takes_the_first_number(reply, answer, correct):
    assert data.is_correct(reply, answer) is correct


def test_exact_match_and_reward():
    assert data.exact_match(["82", "1", "x"], ["82", "2", "3"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        data.exact_match(["1"], ["1", "2"])
    conversational = [[{"role": "assistant", "content": "82"}], [{"role": "assistant", "content": "81"}]]
    assert data.addition_reward(conversational, answer=["82", "82"]) == [1.0, 0.0]
    assert data.addition_reward(["82", "x"], answer=["82", "82"]) == [1.0, 0.0]


@pytest.mark.parametrize(
    ("reply", "answer", "found"),
    [("85", "85", True), ("56 + 29 = 85", "85", True), ("The sum is 85.", "85", True), ("850", "85", False),
     ("8.5", "85", False), ("56 + 29", "85", False), ("-85", "85", False), ("", "85", False)],
)
def test_contains_answer_finds_the_number_anywhere_as_a_whole(reply, answer, found):
    assert data.contains_answer(reply, answer) is found


def test_lenient_match_separates_format_from_arithmetic():
    replies, answers = ["56 + 29 = 85", "85", "56 + 29 = 84"], ["85", "85", "85"]
    assert data.exact_match(replies, answers) == pytest.approx(1 / 3)  # only the bare number
    assert data.lenient_match(replies, answers) == pytest.approx(2 / 3)  # the sum, in any format
    with pytest.raises(ValueError, match="2 replies for 1 answers"):
        data.lenient_match(["1", "2"], ["1"])
    with pytest.raises(ValueError, match="at least one"):
        data.lenient_match([], [])


def test_restating_an_addition_never_scores_leniently():
    # Why the lenient metric is safe on this task: a + b is never a or b for two-digit numbers.
    for row in data.addition_splits(n_train=50, n_eval=50)["eval"]:
        a, b = row["prompt"].removeprefix("What is ").split("?")[0].split("+")
        assert not data.contains_answer(f"{a} + {b}", row["answer"])
