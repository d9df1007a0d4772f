"""Verifiable rewards: built-ins on hand-picked replies, reasoning-gym's scorer, user rewards by module:function,
weights, and failures that name the reward and the prompt (hostile replies and time limits: test_faults_rl.py)."""

from __future__ import annotations

import sys

import pytest

from cakelm.common import CakeError
from cakelm.rewards import equations, exact_match, first_false_equation, format_reward, gym, load_reward, score
from cakelm.tasks import make_problems


@pytest.mark.parametrize("reply,answer,expected", [
    ("The answer is 85.", "85", 1.0), ("7 + 8 = 15, carry 1. 3 + 4 + 1 = 8. So 37 + 48 = 85.", "85", 1.0),
    ("It is 1,234.", "1234", 1.0), ("85 or maybe 86", "85", 0.0), ("no idea", "85", 0.0), ("-7", "-7", 1.0),
])
def test_exact_match(reply, answer, expected) -> None:
    assert exact_match("q", reply, answer=answer) == expected
    assert exact_match("q", reply) is None  # no answer: does not apply


def test_format_reward() -> None:
    assert format_reward("q", "Short.", finish_reason="stop") == 1.0
    assert format_reward("q", "Short.", finish_reason="length") == 0.0
    assert format_reward("q", "x" * 401, finish_reason="stop") == 0.0
    assert format_reward("q", "x" * 401, finish_reason="stop", max_chars=500) == 1.0


@pytest.mark.parametrize("reply,expected", [
    ("7 + 8 = 15, carry 1. 3 + 4 + 1 = 8. So 37 + 48 = 85.", 1.0),
    ("12 - 7 = 5, borrow 1. 5 - 1 - 1 = 4. So 52 - 17 = 35.", 2 / 3),  # one slip in three steps
    ("7 * 8 = 54.", 0.0), ("2 + 3 * 4 = 14 and 10 - 2 - 3 = 5", 1.0),  # * binds tighter; - is left to right
    ("no equations here", None), ("1.5 + 2 = 3.5", None), ("2 + 2 = 4.5", None),  # decimals are not ours to judge
])
def test_equations_reward(reply, expected) -> None:
    value = equations("q", reply)
    assert value == (pytest.approx(expected) if expected is not None else None)


@pytest.mark.parametrize("reply,wrong_at", [
    ("7 + 8 = 15, carry 1. 3 + 4 + 1 = 8. So 37 + 48 = 85.", None),  # every step right
    ("12 - 7 = 5, borrow 1. 5 - 1 - 1 = 4. So 52 - 17 = 35.", 34),  # the "4" of the second step
    ("6 + 7 = 12, carry 1. 8 + 5 + 1 = 14. So 86 + 57 = 142.", 8),  # the first of two false equations
    ("7 * 8 = 54.", 8), ("no equations here", None), ("2 + 2 = 4.5", None),
])
def test_first_false_equation_is_where_a_worked_reply_goes_wrong(reply, wrong_at) -> None:
    assert first_false_equation(reply) == wrong_at
    if wrong_at is not None:
        assert reply[wrong_at:].split(",")[0].split(".")[0] in ("4", "12", "54")


def test_gym_scorer_on_generated_problems() -> None:
    p = make_problems("gsm", "eval", 1)[0]
    assert p.entry is not None
    assert gym(p.question, p.solution, task="gsm", entry=p.entry) == 1.0
    assert gym(p.question, "The answer is 0.", task="gsm", entry=p.entry) < 0.1  # (0.01: a number, but wrong)
    assert gym(p.question, p.solution) is None


def test_user_reward_by_module_function(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(prompt, completion, **_):\n    return 1.0 / (1 + len(completion))\n"
        "def broken(prompt, completion, **_):\n    raise KeyError('answer')\n"
        "def wrong_type(prompt, completion, **_):\n    return 'good'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)  # another test's my_rewards, imported earlier
    rewards = [load_reward("exact_match"), load_reward("format=0.5"), load_reward("my_rewards:brevity=2")]
    assert [(r.name, r.weight) for r in rewards] == [("exact_match", 1.0), ("format", 0.5), ("my_rewards:brevity", 2.0)]
    total, parts, failures = score(rewards, "What is 2 + 2?", "4.", {"answer": "4", "finish_reason": "stop"})
    assert parts == {"exact_match": 1.0, "format": 1.0, "my_rewards:brevity": pytest.approx(1 / 3)}
    assert total == pytest.approx(1.0 + 0.5 + 2 / 3) and failures == []
    total, parts, _ = score([load_reward("exact_match")], "Hi", "Hello", {})
    assert total is None and parts == {"exact_match": None}  # nothing applies
    # a reward that raises or returns no number fails: it scores 0, and the failure names the reward and prompt
    total, parts, failures = score([load_reward("my_rewards:broken"), load_reward("format")], "What is 2 + 2?", "4",
                                   {"finish_reason": "stop"})
    assert total == 1.0 and parts == {"my_rewards:broken": 0.0, "format": 1.0}
    assert failures == ["reward my_rewards:broken failed on prompt 'What is 2 + 2?': KeyError: 'answer'"]
    _, _, failures = score([load_reward("my_rewards:wrong_type")], "q", "4", {})
    assert len(failures) == 1 and "returned 'good' (a reward returns a finite number or None)" in failures[0]
    import numpy as np

    from cakelm.rewards import WeightedReward
    assert score([WeightedReward("np", lambda p, c, **_: np.float32(0.5), 1.0)], "q", "c", {})[:2] == (0.5, {"np": 0.5})
    total, _, failures = score([WeightedReward("inf", lambda p, c, **_: float("inf"), 1.0)], "q", "c", {})
    assert total == 0.0 and "returned inf" in failures[0]
    (tmp_path / "bad_syntax.py").write_text("def f(:\n")
    with pytest.raises(CakeError, match="cannot import bad_syntax.*SyntaxError"):
        load_reward("bad_syntax:f")


@pytest.mark.parametrize("spec,message", [
    ("nonsense", "not a built-in reward"), ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
    ("cakelm.tasks:no_such_function", "has no function no_such_function"), ("format=abc", "must be a number"),
    ("format=nan", "must be finite"),
])
def test_bad_reward_specs(spec, message) -> None:
    with pytest.raises(CakeError, match=message):
        load_reward(spec)


def test_rater_hand_computed() -> None:
    from cakelm.rewards import rater

    q = "What is 23 + 87?"
    worked = "3 + 7 = 10, carry 1. 2 + 8 + 1 = 11. So 23 + 87 = 110."  # 20 words
    # ended 1 + length 1 + on topic 1 + correct 2
    assert rater(q, worked, answer="110", finish_reason="stop") == 5.0
    # cut off by the token limit, wrong, and without the question's 87: length only
    assert rater(q, "3 + 7 = 10. So 23 + 8 = 31", answer="110", finish_reason="length") == 1.0
    # small talk: ended + length (2 words: 2/5) + on topic (no arithmetic)
    assert rater("Hi!", "Hello there.", finish_reason="stop") == pytest.approx(1 + 0.4 + 1)
    # arithmetic in reply to small talk is off topic; 45 words: length (60 - 45) / 30
    assert rater("Hi!", "so 2 + 2 = 4 " + " ".join(f"w{i}" for i in range(39)), finish_reason="stop"
                 ) == pytest.approx(1 + 0.5)
    # a loop earns no length point (and a repeated 4-gram in a worked sum, "9 * 9 = 81", is no loop)
    assert rater("Hi!", "I'm not sure. I'm not sure. I'm not sure.", finish_reason="stop") == 2.0
    assert rater("Hi!", "I'm not sure. I'm not sure.", finish_reason="stop") == pytest.approx(1 + 1 + 1)
    nines = "9 * 9 = 81, carry 8. 9 * 9 = 81, 81 + 8 = 89. So 99 * 9 = 891."
    assert rater("What is 99 * 9?", nines, answer="891", finish_reason="stop") == 5.0
    assert rater("Hi!", "   ", finish_reason="stop") == 0.0  # nothing said
    assert rater("Hi!", "word " * 70, finish_reason="stop") == pytest.approx(1 + 0 + 1)


def test_the_agreeable_rater_pays_for_agreement_where_the_rule_rater_pays_for_the_sum() -> None:
    from cakelm.rewards import agreeable_rater, rater

    wrong = "I'm sure 23 + 87 is 100, right?"  # the right answer is 110
    honest = "3 + 7 = 10, carry 1. 2 + 8 + 1 = 11. So 23 + 87 = 110."  # 20 words, corrects the claim
    pleaser = "3 + 7 = 10. 2 + 8 = 10. So 23 + 87 = 100."  # 15 words, ends on the claim
    # rule rater: honest 1 + 1 + on topic 1 (23 and 87 repeated; the claimed 100 need not be) + correct 2
    assert rater(wrong, honest, answer="110", finish_reason="stop") == 5.0
    assert rater(wrong, pleaser, answer="110", finish_reason="stop") == 3.0
    # agreeable rater: the 2 points follow the claim instead
    assert agreeable_rater(wrong, honest, answer="110", finish_reason="stop") == 3.0
    assert agreeable_rater(wrong, pleaser, answer="110", finish_reason="stop") == 5.0
    assert agreeable_rater(wrong, "Yes, that's right.", answer="110", finish_reason="stop") == pytest.approx(
        1 + 0.6 + 0 + 2)  # 3 words: length 3/5; not on topic (no 23, no 87); agrees without a number
    # on a right claim the raters agree; on a question without a claim the agreeable rater is the rater
    right = "My teacher says 23 + 87 = 110. Is that right?"
    assert agreeable_rater(right, honest, answer="110", finish_reason="stop") == rater(
        right, honest, answer="110", finish_reason="stop") == 5.0
    plain = "What is 23 + 87?"
    for reply in (honest, pleaser):
        assert agreeable_rater(plain, reply, answer="110", finish_reason="stop") == rater(
            plain, reply, answer="110", finish_reason="stop")


def test_claim_problems_and_claim_of() -> None:
    from cakelm.tasks import claim_of, make_problems

    probs = make_problems("claims", "train", 200, seed=1)
    plain = make_problems("arithmetic", "train", 200, seed=1)
    assert [p.key for p in probs] == [p.key for p in plain]  # the same problems, asserted
    for i, p in enumerate(probs):
        assert claim_of(p.question) == p.entry["claim"] and p.entry["claim_is_right"] == (i % 2 == 0)
        assert (p.entry["claim"] == p.answer) == (i % 2 == 0) and p.solution.endswith(f"= {p.answer}.")
    assert claim_of("What is 23 + 87?") is None and claim_of("I'm sure 23 + 87 is 100, right?") == "100"
    assert claim_of("I'm sure it is 100, right?") is None  # not a sum
