"""Chat data: conversations from files, built-in sources or the Hugging Face hub, as checked examples.

A chat source is one string on the command line (`--data SRC[=WEIGHT] ...`):
- `chitchat`: 7,168 human conversations from PyPI `chitchat-dataset==0.9.0` (MIT), fetched with
  `pip download --no-deps`, sha256-checked and cached; the two speakers become user and assistant;
- a task from `cakelm.tasks` (`arithmetic`, `gsm`, `basic_arithmetic`): generated question/answer pairs;
- a `.jsonl` file in the Hugging Face / TRL formats, one conversation per line:
      {"messages": [{"role": "system", "content": ...}, {"role": "user", ...}, {"role": "assistant", ...}]}
      {"prompt": "What is 2 + 2?", "completion": "4."}          (or both as message lists)
  An optional "answer" field is kept (exact-match evaluation and rewards use it);
- `hf:NAME` or `hf:NAME:SPLIT`: a Hugging Face dataset in one of those formats (needs `datasets` and internet).

Every conversation is validated (roles, empty content, system only first, ends on an assistant turn) and every
error names the file and line; `skip_bad_lines=True` counts and skips bad lines instead.

    examples, skipped = read_chat_source("my_chats.jsonl")
    train, held_out, skipped = train_and_heldout("my_chats.jsonl")     # the split sft and eval both use
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cakelm.chat_format import Message, validate
from cakelm.common import CakeError, atomic_path, cakelm_home
from cakelm.data.sources import PackageSource, fetch_package, jsonl_rows
from cakelm.tasks import TASKS, make_problems

CHITCHAT = PackageSource(
    package="chitchat-dataset", version="0.9.0", archive="chitchat_dataset-0.9.0-py3-none-any.whl",
    sha256="7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e", members="chitchat_dataset/dataset.json",
    about="7,168 human chit-chat conversations (MIT); PyPI chitchat-dataset==0.9.0",
)
BUILTIN_CHAT = ("chitchat", *TASKS)
# the default SFT mixture (`cakelm sft --data`), also what DPO replays (`cakelm dpo --replay`)
SFT_MIXTURE = ["chitchat=0.1", "arithmetic=0.8", "claims=0.05", "gsm=0.05"]
VAL_FRACTION = 0.02  # share of a conversation source held out (by name hash) for validation and `cakelm eval`


@dataclass(frozen=True)
class Example:
    name: str  # stable identifier: "chitchat/<id>", "data.jsonl:12", "arithmetic/train/3"
    messages: list[Message] = field(hash=False)
    answer: str | None = None  # exact final answer, for tasks
    fields: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)  # a row's other keys (rewards)


def parse_row(obj: Any, where: str, reply_required: bool = True) -> Example:
    """One JSONL object (messages or prompt/completion format) -> Example; CakeError naming `where` if bad.
    With reply_required=False (questions for evaluation) a row may be just a prompt, or end on a user turn."""
    if not isinstance(obj, dict):
        raise CakeError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if not reply_required and "prompt" in obj and "completion" not in obj and "messages" not in obj:
        obj = {**obj, "completion": []}
    if "messages" in obj:
        messages = obj["messages"]
    elif "prompt" in obj and "completion" in obj:
        prompt, completion = obj["prompt"], obj["completion"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
        if not isinstance(prompt, list) or not isinstance(completion, list):
            raise CakeError(f'{where}: "prompt" and "completion" must be strings or lists of messages')
        messages = prompt + completion
    else:
        raise CakeError(f'{where}: expected "messages" or "prompt" and "completion" (got keys: '
                        f'{", ".join(sorted(obj)) or "none"})')
    messages = validate(messages, where)
    if messages[-1]["role"] != "assistant" and reply_required:
        raise CakeError(f"{where}: the conversation ends on a {messages[-1]['role']} turn; it must end with an "
                        "assistant reply (there is nothing to learn after it)")
    if not any(m["role"] == "user" for m in messages):
        raise CakeError(f"{where}: no user message")
    answer = obj.get("answer")
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
        raise CakeError(f'{where}: "answer" must be a string or a number')
    extra = {k: v for k, v in obj.items() if k not in ("messages", "prompt", "completion", "answer")}
    return Example(where, messages, None if answer is None else str(answer), extra)


def read_chat_jsonl(path: str | Path, skip_bad_lines: bool = False, reply_required: bool = True
                    ) -> tuple[list[Example], int]:
    """Examples of a JSONL file and the number of bad lines skipped (always 0 unless skip_bad_lines)."""
    p = Path(path)
    if not p.is_file():
        raise CakeError(f"{p}: no such file")
    examples, skipped = [], 0
    for where, obj in jsonl_rows(p):
        try:
            if isinstance(obj, CakeError):
                raise obj
            examples.append(parse_row(obj, where, reply_required))
        except CakeError:
            if not skip_bad_lines:
                raise
            skipped += 1
    if not examples:
        raise CakeError(f"{p}: no conversations" + (f" ({skipped} bad lines skipped)" if skipped else ""))
    return examples, skipped


def chitchat_examples() -> list[Example]:
    """The chitchat conversations: consecutive messages of one sender form a turn; the first sender is the user.
    A final user turn is dropped (a conversation must end with the assistant)."""
    archive = fetch_package(CHITCHAT)
    cache = cakelm_home() / "downloads" / "chitchat.jsonl"
    if not cache.is_file() or cache.stat().st_mtime < archive.stat().st_mtime:
        with zipfile.ZipFile(archive) as z:
            raw = json.loads(z.read(CHITCHAT.members))
        with atomic_path(cache) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            for conv_id in sorted(raw):
                turns = [" ".join(m["text"].strip() for m in turn if m["text"].strip())
                         for turn in raw[conv_id]["messages"]]
                turns = [t for t in turns if t]
                if len(turns) % 2:
                    turns = turns[:-1]
                if not turns:
                    continue
                msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
                fh.write(json.dumps({"id": conv_id, "messages": msgs}, ensure_ascii=False) + "\n")
    out = []
    with open(cache, encoding="utf-8") as fh:
        for line in fh:
            obj = json.loads(line)
            out.append(Example(f"chitchat/{obj['id']}", obj["messages"]))
    return out


def task_examples(task: str, split: str, n: int, seed: int = 0) -> list[Example]:
    return [Example(f"{task}/{split}/{i}", [{"role": "user", "content": p.question},
                                            {"role": "assistant", "content": p.solution}], p.answer,
                    {"task": task, **({"entry": p.entry} if p.entry is not None else {})})
            for i, p in enumerate(make_problems(task, split, n, seed))]


def _hf_examples(spec: str, skip_bad_lines: bool, reply_required: bool = True) -> tuple[list[Example], int]:
    name, _, split = spec.removeprefix("hf:").partition(":")
    try:
        import datasets
    except ImportError:
        raise CakeError(f"--data {spec}: Hugging Face datasets need `pip install datasets` (and internet)") from None
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # the hub raises many kinds; one line is what the user needs
        raise CakeError(f"--data {spec}: could not load the dataset ({type(e).__name__}: {e})") from None
    examples, skipped = [], 0
    for i, row in enumerate(ds):
        try:
            examples.append(parse_row(dict(row), f"{spec}[{i}]", reply_required))
        except CakeError:
            if not skip_bad_lines:
                raise
            skipped += 1
    return examples, skipped


def parse_weighted(spec: str) -> tuple[str, float]:
    """"chitchat=0.3" -> ("chitchat", 0.3); a spec without "=WEIGHT" has weight 1."""
    src, sep, w = spec.rpartition("=")
    if not sep:
        return spec, 1.0
    try:
        weight = float(w)
    except ValueError:
        return spec, 1.0  # an "=" that is part of a file name
    if not weight > 0 or weight == float("inf"):
        raise CakeError(f"--data {spec}: the weight must be a positive number")
    return src, weight


def read_chat_source(src: str, split: str = "train", task_size: int = 20000, seed: int = 0,
                     skip_bad_lines: bool = False, reply_required: bool = True) -> tuple[list[Example], int]:
    """(examples, bad lines skipped) of one source. Tasks are generated for `split` ("train": task_size
    problems; "eval": the held-out problems); other sources return all their conversations (split them with
    `split_examples`). reply_required=False accepts rows that only ask (prompts for RL)."""
    if src in TASKS:
        return task_examples(src, split, task_size, seed), 0
    if src == "chitchat":
        return chitchat_examples(), 0
    if src.startswith("hf:"):
        return _hf_examples(src, skip_bad_lines, reply_required)
    p = Path(src)
    if p.suffix != ".jsonl":
        raise CakeError(f"--data {src}: not a chat source (built-in: {', '.join(BUILTIN_CHAT)}; files: .jsonl; "
                        "hub: hf:NAME)" if not p.exists() else f"--data {src}: chat data must be a .jsonl file")
    return read_chat_jsonl(p, skip_bad_lines, reply_required)


def _content_hash(e: Example) -> str:
    return hashlib.sha256(json.dumps(e.messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def split_examples(examples: list[Example], val_fraction: float) -> tuple[list[Example], list[Example]]:
    """(train, val) by a hash of each conversation's content: deterministic, independent of the order, of the
    path a file was named by and of lines added elsewhere in it; equal conversations land on the same side.
    At least one example on each side."""
    if len(examples) < 2:
        raise CakeError(f"{examples[0].name if examples else 'chat data'}: need at least 2 conversations to hold "
                        "some out for validation")
    n_val = min(len(examples) - 1, max(1, round(val_fraction * len(examples))))
    ranked = sorted({_content_hash(e) for e in examples})
    val_keys = set(ranked[:max(1, round(len(ranked) * n_val / len(examples)))])
    if len(val_keys) == len(ranked):
        raise CakeError(f"{examples[0].name}: all conversations are the same; need at least 2 different ones")
    train, val = [], []
    for e in examples:
        (val if _content_hash(e) in val_keys else train).append(e)
    return train, val


def train_and_heldout(src: str, val_fraction: float = VAL_FRACTION, val_size: int = 200, task_size: int = 0,
                      seed: int = 0, skip_bad_lines: bool = False, reply_required: bool = True
                      ) -> tuple[list[Example], list[Example], int]:
    """(train, held-out, bad lines skipped) of one source: the one place that decides what is held out, for
    `cakelm sft` and `cakelm eval` alike. A task gives task_size generated training problems (none for 0) and
    val_size of its held-out problems; other sources hold out val_fraction of their conversations by content
    (at most val_size of them are returned)."""
    if src in TASKS:
        train = task_examples(src, "train", task_size, seed) if task_size else []
        return train, task_examples(src, "eval", val_size) if val_size else [], 0
    examples, skipped = read_chat_source(src, skip_bad_lines=skip_bad_lines, reply_required=reply_required)
    train, val = split_examples(examples, val_fraction)
    return train, val[:val_size], skipped


Source = tuple[str, float, list[Example], list[Example], "int | None"]


def openings(examples: Sequence[Example]) -> list[list[Message]]:
    """Each conversation up to its first user turn (the system message kept): what a model is asked to answer
    when its own replies are judged (`cakelm eval`'s chat replies, SFT's repetition penalty)."""
    out = []
    for ex in examples:
        first = next((j for j, m in enumerate(ex.messages) if m["role"] == "user"), None)
        if first is not None:
            out.append(ex.messages[:first + 1])
    return out


def saved_task_sizes(meta: dict[str, Any], key: str, where: str) -> dict[str, int]:
    """The problems generated per task source that a checkpoint recorded in meta.json[key] (what `load_sources`
    takes as task_sizes on --resume). An entry that is not {source: {"task_size": whole number or null, ...}} (a
    hand-edited or crafted meta.json) is refused in one line naming `where`."""
    entry = meta.get(key, {})
    if not isinstance(entry, dict) or not all(isinstance(c, dict) for c in entry.values()):
        raise CakeError(f"{where}/meta.json: {key!r} must map each source to its counts")
    sizes = {src: c.get("task_size") for src, c in entry.items()}
    for src, n in sizes.items():
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise CakeError(f"{where}/meta.json: {key}.{src}.task_size must be a whole number >= 0, got {n!r}")
    return {src: n for src, n in sizes.items() if n}


def load_sources(specs: Sequence[str], draws: int, task_size: int = 0, val_fraction: float = VAL_FRACTION,
                 val_size: int = 200, seed: int = 0, skip_bad_lines: bool = False, reply_required: bool = True,
                 task_sizes: dict[str, int] | None = None) -> tuple[list[Source], int]:
    """A weighted mixture of sources (`SRC[=W]` specs) for a training stage: [(source, weight, train examples,
    held-out examples, problems generated for a task)] and the number of bad lines skipped. A task generates
    task_size training problems, or (0) about as many as its share of `draws` (the examples the run will draw);
    `task_sizes` (saved in a checkpoint, on --resume) pins them, so raising --max-steps continues on the same
    data."""
    specs_w = [parse_weighted(spec) for spec in specs]
    names = [src for src, _ in specs_w]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise CakeError(f"--data lists {twice} twice; give each source once, with a weight (SRC=W)")
    total = sum(w for _, w in specs_w)
    out, skipped = [], 0
    for src, weight in specs_w:
        n = None
        if src in TASKS:
            n = (task_sizes or {}).get(src) or task_size or math.ceil(1.1 * draws * weight / total) + 64
        train, val, bad = train_and_heldout(src, val_fraction, val_size, n or 0, seed, skip_bad_lines,
                                            reply_required)
        skipped += bad
        out.append((src, weight, train, val, n))
    return out, skipped
