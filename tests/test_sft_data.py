"""SFT data: tasks and answer checking, chat readers and their errors, long conversations, the mixture, packing."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch

from cakelm.common import CakeError
from cakelm.data.chat import parse_weighted, read_chat_jsonl, read_chat_source, split_examples
from cakelm.data.chat_batches import ChatBatches, Mixture, collate, encode_examples
from cakelm.data.sources import ARITHMETIC_LINES, arithmetic_docs
from cakelm.losses import IGNORE_INDEX, lm_loss
from cakelm.model import Transformer, segment_mask
from cakelm.tasks import equations, final_number, is_correct, make_problems, parse_key, worked_solution
from cakelm.tokenizer import Tokenizer
from tests.conftest import tiny_model_config


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.load(tok_dir)


@pytest.mark.parametrize("text,expected", [
    ("The answer is 85.", "85"), ("37 + 48 = 85", "85"), ("It costs 1,234 dollars.", "1234"), ("x = -7", "-7"),
    ("2.50", "2.5"), ("3.0 apples", "3"), ("no number here", None), ("", None), ("first 3 then 4!", "4"),
])
def test_final_number(text, expected) -> None:
    assert final_number(text) == expected


def test_is_correct() -> None:
    assert is_correct("So 37 + 48 = 85.", "85") and is_correct("1,000", "1000") and is_correct("4.0", "4")
    assert not is_correct("85 or 86", "85") and not is_correct("I don't know", "85")


def test_arithmetic_answers_are_right_and_splits_never_overlap() -> None:
    train = make_problems("arithmetic", "train", 20000, seed=0)
    held = make_problems("arithmetic", "eval", 500, seed=0)
    for p in train[:2000] + held:
        a, op, b = parse_key(p.key)
        assert int(p.answer) == {"+": a + b, "-": a - b, "*": a * b}[op] >= 0
        assert is_correct(p.solution, p.answer) and p.solution.endswith(f"{a} {op} {b} = {p.answer}.")
    assert not {p.key for p in train} & {p.key for p in held}
    # nor with the operands swapped: 7 * 8 held out means 8 * 7 is too
    swapped = {re.sub(r"(\d+)([+*])(\d+)", r"\3\2\1", p.key) for p in held}
    assert not {p.key for p in train} & swapped
    assert not {p.question for p in train} & {p.question for p in held}
    assert len({p.question.split()[0] for p in train}) >= 5  # varied phrasings
    # the pretraining equations are training problems only
    eq = equations(5000, seed=0)
    assert re.fullmatch(r"\d+ [-+*] \d+ = \d+", eq[0])
    assert not set(eq) & {p.solution.rstrip(".").split("So ")[-1] for p in held}
    assert sum(len(d.text.splitlines()) for d in arithmetic_docs()) == ARITHMETIC_LINES
    assert make_problems("arithmetic", "eval", 50) == held[:50]  # deterministic


@pytest.mark.parametrize("a,op,b,expected", [
    (37, "+", 48, "7 + 8 = 15, carry 1. 3 + 4 + 1 = 8. So 37 + 48 = 85."),
    (3, "+", 4, "3 + 4 = 7. So 3 + 4 = 7."),
    (99, "+", 99, "9 + 9 = 18, carry 1. 9 + 9 + 1 = 19. So 99 + 99 = 198."),
    (52, "-", 17, "12 - 7 = 5, borrow 1. 5 - 1 - 1 = 3. So 52 - 17 = 35."),
    (90, "-", 9, "10 - 9 = 1, borrow 1. 9 - 0 - 1 = 8. So 90 - 9 = 81."),
    (7, "*", 8, "7 * 8 = 56."),
    # products by a digit, worked by columns
    (37, "*", 6, "7 * 6 = 42, carry 4. 3 * 6 = 18, 18 + 4 = 22. So 37 * 6 = 222."),
    (30, "*", 6, "0 * 6 = 0. 3 * 6 = 18. So 30 * 6 = 180."),
    (12, "*", 3, "2 * 3 = 6. 1 * 3 = 3. So 12 * 3 = 36."),
    (15, "*", 2, "5 * 2 = 10, carry 1. 1 * 2 = 2, 2 + 1 = 3. So 15 * 2 = 30."),
    (99, "*", 9, "9 * 9 = 81, carry 8. 9 * 9 = 81, 81 + 8 = 89. So 99 * 9 = 891."),
])
def test_worked_solutions(a, op, b, expected) -> None:
    assert worked_solution(a, op, b) == expected


def test_gsm_train_and_eval_questions_are_disjoint() -> None:
    train = make_problems("gsm", "train", 1500, seed=0)
    held = make_problems("gsm", "eval", 200)
    assert not {p.question for p in train} & {p.question for p in held}
    assert all(p.solution.endswith(f"The answer is {p.answer}.") and is_correct(p.solution, p.answer)
               for p in train[:200])
    with pytest.raises(CakeError, match="at most 1000"):
        make_problems("gsm", "eval", 1001)


def _write(path, lines) -> str:
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return str(path)


GOOD = json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello."}]})


def test_read_chat_formats(tmp_path) -> None:
    path = _write(tmp_path / "c.jsonl", [
        GOOD, "", json.dumps({"prompt": "What is 2 + 2?", "completion": "4.", "answer": 4}),
        json.dumps({"prompt": [{"role": "user", "content": "Q"}],
                    "completion": [{"role": "assistant", "content": "A"}]}),
    ])
    examples, skipped = read_chat_jsonl(path)
    assert skipped == 0 and len(examples) == 3
    assert examples[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert examples[1].messages == [{"role": "user", "content": "What is 2 + 2?"},
                                    {"role": "assistant", "content": "4."}]
    assert examples[1].answer == "4" and examples[1].name.endswith("c.jsonl:3")


@pytest.mark.parametrize("line,message", [
    (b"{not json", r"c.jsonl:2: not valid JSON"),
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', r"c.jsonl:2: message 0 has unknown role 'wizard'"),
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}',
     r"c.jsonl:2: message 1 \(assistant\) has empty content"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', r"c.jsonl:2: the conversation ends on a user turn"),
    (b'{"text": "hello"}', r'c.jsonl:2: expected "messages" or "prompt" and "completion"'),
    (b'{"messages": []}', r"c.jsonl:2: expected a non-empty list of messages"),
    (b'["a list"]', r"c.jsonl:2: expected a JSON object"),
    (b'{"prompt": "q", "completion": 5}', r'c.jsonl:2: "prompt" and "completion" must be strings'),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', r"c.jsonl:2: not UTF-8"),
])
def test_bad_lines_are_named_or_skipped(tmp_path, line, message) -> None:
    path = _write(tmp_path / "c.jsonl", [GOOD, line, GOOD])
    with pytest.raises(CakeError, match=message):
        read_chat_jsonl(path)
    examples, skipped = read_chat_jsonl(path, skip_bad_lines=True)
    assert (len(examples), skipped) == (2, 1)


def test_missing_and_empty_sources(tmp_path) -> None:
    with pytest.raises(CakeError, match="no such file"):
        read_chat_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(CakeError, match="no conversations"):
        read_chat_jsonl(_write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(CakeError, match="not a chat source"):
        read_chat_source("nonsense")
    with pytest.raises(CakeError, match="must be a .jsonl file"):
        read_chat_source(_write(tmp_path / "x.txt", ["hi"]))


def test_parse_weighted_and_split() -> None:
    assert parse_weighted("chitchat=0.3") == ("chitchat", 0.3)
    assert parse_weighted("data/a=b.jsonl") == ("data/a=b.jsonl", 1.0)
    assert parse_weighted("arithmetic") == ("arithmetic", 1.0)
    with pytest.raises(CakeError, match="positive"):
        parse_weighted("arithmetic=0")
    examples, _ = read_chat_source("arithmetic", task_size=300)
    train, val = split_examples(examples, 0.1)
    assert 20 <= len(val) <= 40 and len(train) + len(val) == 300
    assert not {json.dumps(e.messages) for e in train} & {json.dumps(e.messages) for e in val}
    assert split_examples(list(reversed(examples)), 0.1)[1] == list(reversed(val))


def test_split_does_not_depend_on_how_a_file_is_named(tmp_path, monkeypatch) -> None:
    rows = [json.dumps({"prompt": f"Question {i}?", "completion": f"Answer {i}."}) for i in range(200)]
    _write(tmp_path / "c.jsonl", rows)
    monkeypatch.chdir(tmp_path)
    a = split_examples(read_chat_jsonl("c.jsonl")[0], 0.1)[1]
    b = split_examples(read_chat_jsonl(tmp_path / "c.jsonl")[0], 0.1)[1]
    _write(tmp_path / "c.jsonl", [json.dumps({"prompt": "New?", "completion": "Yes."}), *rows])  # a line added
    c = split_examples(read_chat_jsonl(tmp_path / "c.jsonl")[0], 0.1)[1]
    assert [e.messages for e in a] == [e.messages for e in b]
    assert {json.dumps(e.messages) for e in a} - {json.dumps(e.messages) for e in c} == set()


def test_long_conversations_are_cut_at_user_turns(tok) -> None:
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"question number {i} about the king"},
                  {"role": "assistant", "content": f"the answer to {i} is the queen and the crown"}]
    conv = [{"role": "system", "content": "Be brief."}, *turns]
    from cakelm.data.chat import Example
    full = len(encode_examples([Example("x", conv)], tok, "chat", 10_000)[0][0][0])
    seqs, counts = encode_examples([Example("x", conv)], tok, "chat", full // 2)
    assert counts["sequences"] == len(seqs) >= 2 and counts["truncated"] == 0
    for ids, mask in seqs:
        assert len(ids) <= full // 2
        assert ids[:2] == [tok.bos_id, tok.system_id]  # every piece keeps the system message
        assert ids.count(tok.assistant_id) >= 1 and sum(mask) > 0
    assert sum(ids.count(tok.assistant_id) for ids, _ in seqs) == 6  # every exchange lands in exactly one piece
    # an exchange longer than the limit is truncated (and counted)
    ids = encode_examples([Example("y", turns[:2])], tok, "chat", 10_000)[0][0][0]
    limit = ids.index(tok.assistant_id) + 3
    seqs, counts = encode_examples([Example("y", turns[:2])], tok, "chat", limit)
    assert counts["truncated"] == 1 and seqs[0][0] == ids[:limit]
    # one whose reply does not start within the limit has nothing to learn: dropped, and counted
    seqs, counts = encode_examples([Example("y", turns[:2])], tok, "chat", limit - 3)
    assert seqs == [] and counts["dropped"] == 1


def test_mixture_is_deterministic_weighted_and_prefix_stable() -> None:
    a = Mixture([10, 1000], [1.0, 3.0], seed=5)
    slots = a.slots(0, 8000)
    counts = Counter(s for s, _ in slots)
    assert abs(counts[1] / 8000 - 0.75) < 0.02
    small = [i for s, i in slots if s == 0]
    for e in range(len(small) // 10):  # each epoch visits every example of a source once
        assert sorted(small[10 * e:10 * e + 10]) == list(range(10))
    b = Mixture([10, 1000], [1.0, 3.0], seed=5)
    assert b.slots(4000, 100) == slots[4000:4100]  # a fresh sampler gives the same slots from the middle
    assert Mixture([10, 1000], [1.0, 3.0], seed=6).slots(0, 100) != slots[:100]


def test_segment_mask() -> None:
    mask, pos = segment_mask(torch.tensor([[0, 0, 1, 1, 1, -1]]))
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0]]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)


def test_packing_gives_the_unpacked_loss() -> None:
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(max_seq_len=40)).eval()
    seqs = [(torch.randint(6, 320, (n,)).tolist(), [0] * (n // 2) + [1] * (n - n // 2)) for n in (5, 12, 30, 9, 17, 3)]
    flat, packed = collate(seqs, 1, False, 40), collate(seqs, 1, True, 40)
    assert packed["input"].shape[0] < flat["input"].shape[0] and packed["input"].shape[1] <= 40
    assert flat["n"] == packed["n"] == sum(sum(m[1:]) for _, m in seqs)
    with torch.no_grad():
        a, na = lm_loss(model(flat["input"]), flat["target"])
        b, nb = lm_loss(model(packed["input"], segments=packed["segments"]), packed["target"])
        # and each sequence alone, one at a time
        alone = sum(lm_loss(model(torch.tensor([ids[:-1]])),
                            torch.tensor([[t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]]))[0]
                    for ids, mask in seqs)
    assert int(na) == int(nb) == flat["n"]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(a, alone, rtol=1e-5, atol=1e-4)


def test_chat_batches_split_ranks_like_accumulation() -> None:
    seqs = [[([0, 7, i, 5], [0, 0, 1, 1]) for i in range(10, 60)],
            [([0, 8, i, 5], [0, 0, 1, 1]) for i in range(60, 90)]]
    one = ChatBatches(seqs, [1.0, 2.0], 4, 2, 0, 1, seed=3, pack=False, row_len=8, pad_id=1)
    ranks = [ChatBatches(seqs, [1.0, 2.0], 4, 1, r, 2, seed=3, pack=False, row_len=8, pad_id=1) for r in range(2)]
    for step in range(3):
        for m in range(2):
            assert torch.equal(one.get(step, m)["input"], ranks[m].get(step, 0)["input"])
    assert not torch.equal(one.get(0, 0)["input"], one.get(1, 0)["input"])


@pytest.mark.slow
def test_chitchat_from_pypi() -> None:
    """The real package (pip download, sha256-pinned): alternating turns, ending with the assistant."""
    from cakelm.data.chat import chitchat_examples

    examples = chitchat_examples()
    assert len(examples) == 4017  # of 7,168 conversations, those with at least one reply
    for ex in examples[:500]:
        roles = [m["role"] for m in ex.messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and all(m["content"].strip() for m in ex.messages)
    train, val = split_examples(examples, 0.02)
    assert 78 <= len(val) <= 82 and not {e.name for e in train} & {e.name for e in val}  # 2%, by content


def test_hub_datasets_go_through_the_same_checks(monkeypatch) -> None:
    """hf:NAME[:SPLIT] loads with `datasets.load_dataset` (stubbed here: no internet) and parses like JSONL."""
    import sys
    import types

    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
                {"prompt": "Q", "completion": "A"}, {"messages": [{"role": "user", "content": "dangling"}]}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(CakeError, match=r"hf:org/chats:test_sft\[2\]: the conversation ends on a user turn"):
        read_chat_source("hf:org/chats:test_sft")
    examples, skipped = read_chat_source("hf:org/chats", skip_bad_lines=True)
    assert calls == [("org/chats", "test_sft"), ("org/chats", "train")]
    assert len(examples) == 2 and skipped == 1 and examples[1].messages[1]["content"] == "A"
