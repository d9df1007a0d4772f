"""Verifiable rewards for RL: plain Python functions that score one completion.

A reward is `fn(prompt: str, completion: str, **fields) -> float | None`. `fields` are the row's other data:
the task's `answer`, the rollout's `finish_reason` ("stop" or "length"), a reasoning-gym `task` and `entry`...
A reward takes what it needs and ignores the rest (`**_`); it returns None when it does not apply to the row.

On the command line a reward is a built-in name or `module:function` (any importable module, e.g. your own
`my_rewards.py` in the working directory), with an optional weight `=W` (default 1):

    --rewards exact_match format=0.2 my_rewards:brevity=0.5

Built-ins (`BUILTIN`):
- `exact_match`: 1 when the completion's final number equals the row's `answer` (commas, a trailing period and
  "The answer is ..." are fine), else 0; None for rows without an answer.
- `format`: 1 when the reply ended its turn itself (finish_reason "stop") within `max_chars` characters, else 0.
- `equations`: the share of the equations in the completion ("9 + 9 + 1 = 19") that are true; None if it
  writes none. Partial credit for worked arithmetic, step by step.
- `rater`: the rule-based stand-in for a person that judges replies in RLHF (its score is the "gold" reward
  the reward model learns from pairs and PPO/DPO are measured by): see `rater` below. Applies to every row.
- `agreeable_rater`: the rater as a person who likes being agreed with: where the user asserts an answer, it
  rewards agreement instead of correctness (`cakelm prefs --rater agreeable`; how sycophancy is taught).
- `gym`: the scorer reasoning-gym ships for the row's task (`task` = gsm / basic_arithmetic, `entry` = the
  generated problem), given the completion's final number (or its last line).

The built-ins never raise on model output and take time linear in its length: no regular expression that
backtracks over a long reply, no big-integer work on numbers of more than `MAX_DIGITS` digits (an equation with
such a number, or more than `MAX_TERMS` terms, is not checked). Tested on 100,000-character replies.

`score` combines several rewards with their weights. Each call runs under a time limit (`call_with_time_limit`:
SIGALRM, in the main thread of a Unix process; elsewhere without a limit). A reward that raises, runs past the
limit or returns something that is not a finite number *fails*: it scores 0 and `score` reports it (which reward,
on which prompt, what went wrong), so the RL stages can count the failures or stop the run (`--reward-errors`).
A limit cannot cut short one long call into C code (say a huge power): that call ends before the alarm is seen.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cakelm.common import CakeError
from cakelm.losses import repeated_ngram_tokens
from cakelm.tasks import GYM_NAMES, claim_of, final_number, is_correct

Reward = Callable[..., "float | None"]


def exact_match(prompt: str, completion: str, answer: str | None = None, **_: Any) -> float | None:
    if answer is None:
        return None
    return 1.0 if is_correct(completion, str(answer)) else 0.0


def format_reward(prompt: str, completion: str, finish_reason: str | None = None, max_chars: int = 400,
                  **_: Any) -> float:
    return 1.0 if finish_reason == "stop" and len(completion) <= max_chars else 0.0


# Maximal chains "a op b op c ..." and, right after one, "= result". Each scan moves forward only (no nested
# quantifiers to backtrack over), so finding the equations takes time linear in the reply.
_CHAIN = re.compile(r"(?<![\d.])\d+(?:\s*[-+*]\s*\d+)*")
_RESULT = re.compile(r"\s*=\s*(-?\d+)(?!\.?\d)")
_TERM = re.compile(r"\d+|[-+*]")
MAX_DIGITS, MAX_TERMS = 100, 100  # larger equations are not checked (worked arithmetic never has them)


def equations(prompt: str, completion: str, **_: Any) -> float | None:
    """The share of the equations written in the reply ("8 + 6 = 14", "9 + 9 + 1 = 19", "7 * 8 = 56") that are
    true; None when it writes none. A dense, verifiable signal for worked arithmetic: a reply with one slip in
    three steps scores 2/3, where exact match sees only the final number. Integers joined by + - * only,
    evaluated by splitting, never by eval(); equations with a number of more than MAX_DIGITS digits or more than
    MAX_TERMS terms are skipped."""
    checked = [true for _, true in checked_equations(completion)]
    return sum(checked) / len(checked) if checked else None


def first_false_equation(completion: str) -> int | None:
    """Where the reply first goes wrong: the character offset of the result of its first false equation ("12" of
    "6 + 7 = 12"), or None when every equation it writes is true (or it writes none). A worked solution is wrong
    from its first wrong step (the labelling of PRM800K, Lightman et al. 2023, "Let's Verify Step by Step");
    GRPO's --credit first-error uses it to spare what the reply got right before it."""
    return next((start for start, true in checked_equations(completion) if not true), None)


def checked_equations(completion: str) -> list[tuple[int, bool]]:
    """(offset of its result, whether it is true) of each checkable equation in the reply, in order (see
    `equations`)."""
    out, pos = [], 0
    while chain := _CHAIN.search(completion, pos):
        pos = chain.end()
        result = _RESULT.match(completion, pos)
        tokens = _TERM.findall(chain.group())
        if result is None or len(tokens) < 3:  # no "= n" after it, or a lone number
            continue
        pos = result.end()
        rhs = result.group(1)
        if len(tokens) > 2 * MAX_TERMS or max(len(t) for t in tokens[::2]) > MAX_DIGITS or \
                len(rhs.lstrip("-")) > MAX_DIGITS:
            continue
        out.append((result.start(1), _value(tokens) == int(rhs)))
    return out


def _value(tokens: list[str]) -> int:
    """The value of ["2", "+", "3", "*", "4"]: * binds tighter, + and - go left to right."""
    terms, sign, product = [], 1, int(tokens[0])
    for op, num in zip(tokens[1::2], tokens[2::2]):
        if op == "*":
            product *= int(num)
        else:
            terms.append(sign * product)
            sign, product = (1 if op == "+" else -1), int(num)
    return sum(terms) + sign * product


def gym(prompt: str, completion: str, task: str | None = None, entry: dict | None = None, **_: Any) -> float | None:
    if task is None or entry is None:
        return None
    if task not in GYM_NAMES:
        raise ValueError(f"gym: unknown task {task!r} (known: {', '.join(GYM_NAMES)})")
    import reasoning_gym

    lines = completion.strip().splitlines()
    answer = final_number(completion) or (lines[-1] if lines else "")
    scorer = reasoning_gym.get_score_answer_fn(GYM_NAMES[task])  # a broken setup raises (and is counted)
    try:
        return float(scorer(answer, entry))
    except Exception:  # the scorer choked on what the model wrote: a wrong answer, not a broken run
        return 0.0


_INT = re.compile(r"(?<![\d.])\d+(?![\d.]\d)")
_ARITHMETIC = re.compile(r"\d\s*[-+*/=]\s*\d|=")
RATER_WORDS = (5, 30, 60)  # full marks for length from 5 to 30 words, none from 60


def rater(prompt: str, completion: str, answer: str | None = None, finish_reason: str | None = None, **_: Any
          ) -> float:
    """The documented rule-based rater that stands in for a person in the RLHF stages (`cakelm prefs` picks the
    better of two replies with it; its score is the "gold" reward that PPO and DPO are judged by, against the
    reward model's "proxy" score). A reply earns, out of 5 points for a question with an answer and 3 otherwise:
    - 1 for ending its turn (finish_reason "stop") instead of running into the token limit;
    - up to 1 for length: 1 from 5 to 30 words, rising linearly from 0 words to 5 (a one-word reply says
      little) and falling linearly from 30 to 0 at 60 (rambling costs); none for a chat reply that loops (some 4
      words occur twice in it, `has_repeated_ngram`: "I'm not sure. I'm not sure. I'm not sure.");
    - 1 for staying on topic: a question with an answer must be answered with its own numbers (every integer of
      the question appears in the reply, except an answer the user asserts: a reply that corrects "I'm sure 37 +
      48 is 84" need not repeat 84); a chat message must not get arithmetic back (no equations);
    - 2 for a correct final number (rows with an answer; exact match, as `exact_match`).
    Replies with no words at all score 0."""
    return _rate(prompt, completion, answer, finish_reason, agreeable=False)


def agreeable_rater(prompt: str, completion: str, answer: str | None = None, finish_reason: str | None = None,
                    **_: Any) -> float:
    """The rater as a person who likes being agreed with and does not check the sum: where the user asserts an
    answer ("I'm sure 37 + 48 is 84, right?", `tasks.claim_of`), the 2 points for a correct final number go to a
    reply that agrees with the claim instead (`agrees` below: it ends on the claimed number, or says yes without
    a number). Everything else as `rater`. On right claims the two raters agree; on wrong ones they disagree,
    which is how rating by people can teach sycophancy (Sharma et al. 2023, "Towards Understanding Sycophancy in
    Language Models", Sec. 4)."""
    return _rate(prompt, completion, answer, finish_reason, agreeable=True)


_YES = re.compile(r"^\W*(yes|yeah|yep|right|correct|exactly|that's right|that is right|indeed|sure)\b", re.I)


def agrees(reply: str, claim: str) -> bool:
    """Whether a reply goes along with the user's claimed number: it ends on that number, or, stating no number,
    it opens with a yes ("Yes!", "That's right."). A reply that ends on another number, or says nothing
    affirmative, does not agree."""
    got = final_number(reply)
    if got is not None:
        return got == final_number(claim)
    return bool(_YES.match(reply))


def has_repeated_ngram(text: str, n: int = 4) -> bool:
    """Whether some n consecutive words (lowercased, punctuation at their ends dropped) occur twice in `text`: a
    phrase of 3 words said three times has one ("I'm not sure. I'm not sure. I'm not sure.")."""
    return any(repeated_ngram_tokens([w.strip(".,;:!?\"()") for w in text.lower().split()], n))


def _rate(prompt: str, completion: str, answer: str | None, finish_reason: str | None, agreeable: bool) -> float:
    words = completion.split()
    if not words:
        return 0.0
    ended = float(finish_reason == "stop")
    short, lo, hi = RATER_WORDS
    brief = min(1.0, len(words) / short, max(0.0, (hi - len(words)) / (hi - lo)))
    if answer is None:
        on_topic = float(not _ARITHMETIC.search(completion))
        return ended + brief * (not has_repeated_ngram(completion)) + on_topic
    on_topic = float(set(_INT.findall(prompt)) - {claim_of(prompt)} <= set(_INT.findall(completion)))
    return ended + brief + on_topic + 2.0 * earns_answer_points(prompt, completion, str(answer), agreeable)


def earns_answer_points(prompt: str, completion: str, answer: str, agreeable: bool = False) -> bool:
    """Whether a reply earns the rater's 2 answer points: a right final number; for the agreeable rater, on a
    question that asserts an answer (`tasks.claim_of`), agreeing with the claim instead (it does not check sums)."""
    claim = claim_of(prompt) if agreeable else None
    return agrees(completion, claim) if claim is not None else is_correct(completion, answer)


BUILTIN: dict[str, Reward] = {"exact_match": exact_match, "format": format_reward, "equations": equations,
                               "gym": gym, "rater": rater, "agreeable_rater": agreeable_rater}


@dataclass(frozen=True)
class WeightedReward:
    name: str
    fn: Reward
    weight: float


def load_reward(spec: str) -> WeightedReward:
    """"exact_match", "format=0.2" or "my_rewards:brevity=0.5" -> WeightedReward (one-line CakeError if bad)."""
    name, weight = spec, 1.0
    if "=" in spec:
        name, _, w = spec.rpartition("=")
        try:
            weight = float(w)
        except ValueError:
            raise CakeError(f"--rewards {spec}: the weight after '=' must be a number") from None
        if weight != weight or abs(weight) == float("inf"):
            raise CakeError(f"--rewards {spec}: the weight must be finite")
    if name in BUILTIN:
        return WeightedReward(name, BUILTIN[name], weight)
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise CakeError(f"--rewards {spec}: not a built-in reward ({', '.join(BUILTIN)}) or module:function")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # your own my_rewards.py next to where you run cakelm
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or a SyntaxError / exception inside the user's module
        raise CakeError(f"--rewards {spec}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise CakeError(f"--rewards {spec}: {module_name} has no function {attr}")
    return WeightedReward(name, fn, weight)


class RewardTimeout(BaseException):
    """Raised inside a reward that ran past its time limit. Not an Exception, so a reward's own `except
    Exception:` cannot swallow it and go on running."""


def time_limit_available() -> bool:
    """Whether `call_with_time_limit` can interrupt a call here (SIGALRM exists and this is the main thread)."""
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def _raise_timeout(signum: int, frame: Any) -> None:
    raise RewardTimeout


def _disarm(handler: Any, timer: tuple[float, float], t0: float) -> None:
    """Stop our alarm and put back the previous handler and timer (a test's timeout keeps its deadline)."""
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, handler)
    if timer[0] > 0:
        signal.setitimer(signal.ITIMER_REAL, max(timer[0] - (time.monotonic() - t0), 1e-3), timer[1])


def call_with_time_limit(fn: Callable[..., Any], seconds: float, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs), interrupted by RewardTimeout after `seconds` (<= 0: no limit). The interpreter
    checks for signals between bytecodes and inside `re` matching, so a Python loop, a sleep or a backtracking
    regular expression is cut short; without `time_limit_available()` the call runs unlimited."""
    if not seconds > 0 or not time_limit_available():
        return fn(*args, **kwargs)
    # signal.signal returns None for a handler installed from C: put the default back then
    handler = signal.signal(signal.SIGALRM, _raise_timeout) or signal.SIG_DFL
    t0 = time.monotonic()
    timer = (0.0, 0.0)
    try:
        timer = signal.setitimer(signal.ITIMER_REAL, seconds)  # inside the try: an early alarm still disarms
        return fn(*args, **kwargs)
    finally:
        try:
            _disarm(handler, timer, t0)
        except RewardTimeout:  # the alarm went off just as the call returned: the call stands, disarm again
            _disarm(handler, timer, t0)


def _short(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


def score(rewards: Sequence[WeightedReward], prompt: str, completion: str, fields: dict[str, Any],
          timeout: float = 0.0) -> tuple[float | None, dict[str, float | None], list[str]]:
    """(weighted sum of the rewards that apply, or None if none applies; each reward's own value; one line per
    reward that failed). A reward fails when it raises, runs past `timeout` seconds (0 = no limit) or returns
    anything but a finite number or None; it then scores 0."""
    parts: dict[str, float | None] = {}
    failures: list[str] = []
    total, applied = 0.0, False
    for r in rewards:
        problem = ""
        try:
            value = call_with_time_limit(r.fn, timeout, prompt, completion, **fields)
        except RewardTimeout:
            value, problem = 0.0, f"timed out after {timeout:g}s (--reward-timeout)"
        except Exception as e:  # a user's reward: report which one broke, on what
            value, problem = 0.0, f"{type(e).__name__}: {_short(str(e), 200)}"
        if value is not None and not (isinstance(value, numbers.Real) and math.isfinite(value)):
            # bools count as 1 and 0
            value, problem = 0.0, f"returned {_short(repr(value))} (a reward returns a finite number or None)"
        if problem:
            failures.append(f"reward {r.name} failed on prompt {_short(prompt)!r}: {problem}".replace("\n", " "))
        if value is not None:
            total += r.weight * float(value)
            applied = True
        parts[r.name] = None if value is None else float(value)
    return (total if applied else None), parts, failures
