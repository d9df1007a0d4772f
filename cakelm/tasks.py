"""Verifiable tasks: questions with one exact answer, for SFT data, evaluation and RL rewards.

Tasks (`TASKS`):
- `arithmetic`: our own seeded generator. Additions and subtractions of numbers up to 99 and products of
  2..12, asked in varied phrasings ("What is 37 + 48?", "Add 37 and 48.", "How much is 12 times 7?"); the
  reference reply works the sum out digit by digit and ends with the equation (see `worked_solution`).
- `gsm`: GSM8K-style word problems from PyPI `reasoning-gym` (`gsm_symbolic`, offline), with their worked
  solutions; `basic_arithmetic`: reasoning-gym's bracketed integer expressions ("Calculate ( 56 + -33 ) - 84.").

Train and eval problems never overlap. For `arithmetic` the split is by the problem itself, not its wording: a
problem (operands and operator) is held out when a hash of it falls in the eval bucket, so no phrasing of a
held-out problem (nor its operands swapped, for + and *) is ever trained on, nor appears in the pretraining
equations. For reasoning-gym tasks the eval
questions come from another seed, and any training question equal to one of them is dropped.

    problems = make_problems("arithmetic", "train", 1000, seed=0)
    is_correct("So 37 + 48 = 85.", problems[0].answer)

`final_number` reads the last number of a reply ("The answer is 1,234." -> "1234"); answers are compared as
numbers.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction

from cakelm.common import CakeError

TASKS = ("arithmetic", "gsm", "basic_arithmetic")
EVAL_BUCKETS = 8  # 1 in 8 arithmetic problems is held out for evaluation

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_PHRASES = {
    "+": ("What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}.", "How much is {a} plus {b}?",
          "Compute {a} + {b}.", "What do you get if you add {b} to {a}?", "Calculate {a} + {b}.",
          "What is the sum of {a} and {b}?"),
    "-": ("What is {a} - {b}?", "What is {a} minus {b}?", "Subtract {b} from {a}.", "How much is {a} minus {b}?",
          "Compute {a} - {b}.", "What do you get if you take {b} away from {a}?", "Calculate {a} - {b}.",
          "What is the difference between {a} and {b}?"),
    "*": ("What is {a} * {b}?", "What is {a} times {b}?", "Multiply {a} by {b}.", "How much is {a} times {b}?",
          "Compute {a} * {b}.", "What is the product of {a} and {b}?", "Calculate {a} * {b}.",
          "What is {a} multiplied by {b}?"),
}


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # the exact final answer, e.g. "85"
    solution: str  # the reference assistant reply, ending with the answer
    key: str  # identity of the problem regardless of wording, e.g. "37+48"
    entry: dict | None = field(default=None, compare=False, hash=False)  # reasoning-gym's problem, for its scorer


def final_number(text: str) -> str | None:
    """The last number in `text`, normalised ("1,234." -> "1234", "2.50" -> "2.5"), or None if there is none (or
    it is too long to read: model output never makes this raise)."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    s = found[-1].replace(",", "")
    try:
        value = Fraction(s)  # more than 4,300 digits: ValueError (Python's int limit), so never slow
        return str(value.numerator) if value.denominator == 1 else str(float(value))
    except (ValueError, ZeroDivisionError, OverflowError):  # OverflowError: a decimal beyond float's range
        return None


def is_correct(reply: str, answer: str) -> bool:
    """Exact match of the reply's final number with the answer, compared as numbers."""
    got = final_number(reply)
    return got is not None and got == final_number(answer)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k (the chance that at least one of k samples is right) from n >= k samples of
    which c are right: 1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1..n} (1 - k/i) so large n cannot
    overflow (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", the Codex paper, Fig. 3)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    p = 1.0
    for i in range(n - c + 1, n + 1):
        p *= 1.0 - k / i
    return 1.0 - p


def _bucket(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") % EVAL_BUCKETS


def _is_eval(key: str) -> bool:
    return _bucket(key) == 0


def _arithmetic_problem(rng: random.Random) -> tuple[int, str, int, int]:
    r = rng.random()
    if r < 0.45:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return a, "+", b, a + b
    if r < 0.8:
        a = rng.randint(0, 99)
        b = rng.randint(0, a)
        return a, "-", b, a - b
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return a, "*", b, a * b


def worked_solution(a: int, op: str, b: int) -> str:
    """The reference reply: the column method, one digit at a time, then the equation. A tiny model cannot
    add two-digit numbers in one step, but it can look up single-digit facts and carry (chain of thought):
        "7 + 8 = 15, carry 1. 3 + 4 + 1 = 8. So 37 + 48 = 85."
        "12 - 7 = 5, borrow 1. 5 - 1 - 1 = 3. So 52 - 17 = 35."
    Products of the times tables are recalled whole: "7 * 8 = 56." """
    if op == "*":
        return f"{a} * {b} = {a * b}."
    (ta, ua), (tb, ub) = divmod(a, 10), divmod(b, 10)
    if op == "+":
        units = ua + ub
        steps = [f"{ua} + {ub} = {units}" + (", carry 1." if units >= 10 else ".")]
        if ta or tb or units >= 10:
            steps.append(f"{ta} + {tb}" + (" + 1" if units >= 10 else "") + f" = {ta + tb + (units >= 10)}.")
        return " ".join(steps) + f" So {a} + {b} = {a + b}."
    borrow = ua < ub
    steps = [f"{ua + 10 * borrow} - {ub} = {ua + 10 * borrow - ub}" + (", borrow 1." if borrow else ".")]
    if ta or tb:
        steps.append(f"{ta} - {tb}" + (" - 1" if borrow else "") + f" = {ta - tb - borrow}.")
    return " ".join(steps) + f" So {a} - {b} = {a - b}."


def arithmetic_problems(split: str, n: int, seed: int) -> list[Problem]:
    """n problems of the given split (problems repeat in the train split; the eval split holds ~1/8 of them)."""
    rng = random.Random(f"arithmetic/{split}/{seed}")
    out = []
    while len(out) < n:
        a, op, b, c = _arithmetic_problem(rng)
        key = f"{a}{op}{b}"
        # 7 * 8 and 8 * 7 are one fact: the split looks at both orders alike
        if _is_eval(f"{min(a, b)}{op}{max(a, b)}" if op in "+*" else key) != (split == "eval"):
            continue
        question = rng.choice(_PHRASES[op]).format(a=a, b=b)
        out.append(Problem(question, str(c), worked_solution(a, op, b), key))
    return out


def equations(n: int, seed: int) -> list[str]:
    """n lines "a op b = c" of training problems only: arithmetic text for the pretraining mixture."""
    return [re.sub(r"(\d+)(\D)(\d+)", r"\1 \2 \3", p.key) + f" = {p.answer}"
            for p in arithmetic_problems("train", n, seed)]


def _reasoning_gym(name: str, n: int, seed: int) -> list[dict]:
    try:
        import reasoning_gym
    except ImportError:
        raise CakeError(f"task {name} needs the reasoning-gym package: pip install reasoning-gym==0.1.25") from None
    return list(reasoning_gym.create_dataset(name, size=n, seed=seed))


def _gym_problem(task: str, entry: dict) -> Problem:
    answer = str(entry["answer"]).strip()
    cot = str(entry.get("metadata", {}).get("answer_cot") or "").strip()
    if task == "gsm" and cot:
        # the worked solution ends with "#### 288" in GSM8K style; state the answer in words instead
        cot = re.sub(r"\n?####.*$", "", cot, flags=re.S).strip()
        solution = f"{cot}\nThe answer is {answer}."
    else:
        solution = f"The answer is {answer}."
    return Problem(entry["question"].strip(), answer, solution, entry["question"].strip(), entry)


GYM_NAMES = {"gsm": "gsm_symbolic", "basic_arithmetic": "basic_arithmetic"}
_GYM_EVAL_SEED = 10_000_019  # eval questions come from their own seed, far from any training seed
GYM_EVAL_SIZE = 1000  # reasoning-gym eval sets are prefixes of these 1000 questions, all kept out of training


def make_problems(task: str, split: str, n: int, seed: int = 0) -> list[Problem]:
    """n problems of `task` ("train" or "eval" split). Deterministic for (task, split, n, seed)."""
    if task not in TASKS:
        raise CakeError(f"unknown task {task!r} (tasks: {', '.join(TASKS)})")
    if split not in ("train", "eval"):
        raise CakeError(f"split must be train or eval, got {split!r}")
    if n < 1:
        raise CakeError(f"need at least one {task} problem, asked for {n}")
    if task == "arithmetic":
        return arithmetic_problems(split, n, seed)
    name = GYM_NAMES[task]
    if split == "eval":
        if n > GYM_EVAL_SIZE:
            raise CakeError(f"task {task}: at most {GYM_EVAL_SIZE} evaluation problems, asked for {n}")
        # one fixed question set (reasoning-gym datasets are prefix-stable), whatever the seed
        return [_gym_problem(task, e) for e in _reasoning_gym(name, n, _GYM_EVAL_SEED)]
    held_out = {p.key for p in make_problems(task, "eval", GYM_EVAL_SIZE)}
    kept = [p for p in (_gym_problem(task, e) for e in _reasoning_gym(name, n, seed)) if p.key not in held_out]
    return kept
