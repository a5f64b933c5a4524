"""The synthetic skills: answers are right by construction, splits reproducible and disjoint by seed."""

import random

import pytest

from edgeconv.errors import EdgeconvError
from edgeconv.evaluation.skills import SKILLS, balanced, examples


def test_answers_are_correct():
    for ex in examples(seed=1, n=600):
        body = ex.prompt.split(" ", 1)[1][:-1]  # drop the skill name and the trailing "="
        if ex.skill == "add":
            a, b = body.split("+")
            assert int(ex.answer) == int(a) + int(b)
        elif ex.skill == "copy":
            assert ex.answer == body
        elif ex.skill == "reverse":
            assert ex.answer == body[::-1]
        elif ex.skill == "sort":
            assert ex.answer.split() == [str(x) for x in sorted(map(int, body.split()))]
        elif ex.skill == "brackets":
            assert ex.answer == ("yes" if balanced(body) else "no")
        elif ex.skill == "recall":
            *pairs, key = body.split()
            assert ex.answer == dict(p.split(":") for p in pairs)[key]
        assert ex.text == f"{ex.prompt} {ex.answer}\n" and "\n" not in ex.prompt + ex.answer


def test_every_skill_is_drawn_and_brackets_are_not_trivial():
    exs = examples(seed=2, n=1200)
    assert {e.skill for e in exs} == set(SKILLS.names()) == {"add", "copy", "reverse", "sort", "brackets", "recall"}
    answers = [e.answer for e in exs if e.skill == "brackets"]
    assert 0.3 < answers.count("yes") / len(answers) < 0.8  # both classes well represented


def test_balanced_by_hand():
    assert balanced("([]{})") and balanced("") and not balanced("(]") and not balanced("((") and not balanced(")(")


def test_reproducible_and_seeds_differ():
    assert examples(seed=3, n=50) == examples(seed=3, n=50)
    assert examples(seed=3, n=50) != examples(seed=4, n=50)
    assert examples(seed=3, n=10, skills=["add"])[0].skill == "add"
    with pytest.raises(EdgeconvError, match="unknown skill"):
        examples(seed=3, n=1, skills=["multiply"])
    SKILLS.get("add")(random.Random(0))
