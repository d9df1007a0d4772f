"""Chat formatting: exact ids and loss masks, the playscript text, prompts, stop rules, history fitting."""

from __future__ import annotations

import pytest

from cakelm.chat_format import PLAYSCRIPT_HEADER, fit_history, format_of, render, render_prompt, stop_rules, validate
from cakelm.common import CakeError
from cakelm.tokenizer import Tokenizer

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye."}]


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.load(tok_dir)


def test_chat_format_ids_and_mask(tok: Tokenizer) -> None:
    ids, mask = render(CONV[:3], tok, "chat")
    e = tok.encode
    assert ids == [tok.bos_id, tok.system_id, *e("Be brief."), tok.end_id, tok.user_id, *e("Hi!"), tok.end_id,
                   tok.assistant_id, *e("Hello."), tok.end_id]
    learned = [i for i, m in zip(ids, mask) if m]
    assert learned == [*e("Hello."), tok.end_id]  # the reply and its end-of-turn token, nothing else
    assert len(mask) == len(ids)


def test_chat_prompt_and_stops(tok: Tokenizer) -> None:
    prompt = render_prompt(CONV, tok, "chat")
    assert prompt[-1] == tok.assistant_id and prompt[-2] == tok.end_id
    assert stop_rules(tok, "chat") == ((tok.end_id, tok.bos_id), ())


def test_playscript(tok: Tokenizer) -> None:
    prompt = render_prompt(CONV, tok, "playscript")
    assert prompt[0] == tok.bos_id
    assert tok.decode(prompt[1:]) == (f"{PLAYSCRIPT_HEADER}\nBe brief.\n\nUSER: Hi!\nASSISTANT: Hello.\nUSER: Bye."
                                      "\nASSISTANT:")
    ids, mask = render(CONV[1:3], tok, "playscript")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == " Hello."
    assert stop_rules(tok, "playscript") == ((tok.bos_id,), ("\nUSER:", "\nASSISTANT:"))


@pytest.mark.parametrize("bad, match", [
    ([], "non-empty list"),
    ([{"role": "robot", "content": "x"}], "message 0 has unknown role 'robot'"),
    ([{"role": "user", "content": "  "}], "message 0 .user. has empty content"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only the first message"),
    ([{"role": "user"}], "message 0 must be"),
])
def test_validation(bad, match) -> None:
    with pytest.raises(CakeError, match=match):
        validate(bad)


def test_prompt_must_end_with_user(tok: Tokenizer) -> None:
    with pytest.raises(CakeError, match="end with a user message"):
        render_prompt(CONV[:3], tok, "chat")


def test_fit_history_drops_oldest_turns(tok: Tokenizer) -> None:
    conv = [CONV[0]] + [{"role": r, "content": f"turn {i} " + "word " * 10}
                        for i, r in enumerate(["user", "assistant"] * 3 + ["user"])]
    full = len(render_prompt(conv, tok, "chat"))
    kept, dropped = fit_history(conv, tok, "chat", full)
    assert dropped == 0 and kept == conv
    kept, dropped = fit_history(conv, tok, "chat", full - 1)
    assert dropped == 2 and kept[0] == CONV[0] and kept[1]["content"].startswith("turn 2")
    kept, dropped = fit_history(conv, tok, "chat", len(render_prompt([CONV[0], conv[-1]], tok, "chat")))
    assert kept == [CONV[0], conv[-1]] and dropped == 6
    with pytest.raises(CakeError, match="only 5 fit in the context"):
        fit_history(conv, tok, "chat", 5)


def test_format_of() -> None:
    assert format_of({}) == "playscript"
    assert format_of({"chat_format": "chat"}) == "chat"
    assert format_of({"chat_format": "chat"}, playscript=True) == "playscript"
    assert format_of({}, playscript=False) == "chat"
    with pytest.raises(CakeError, match="unknown chat format"):
        format_of({"chat_format": "chatml"})


def test_multi_turn_mask_covers_each_reply_and_its_end(tok: Tokenizer) -> None:
    from cakelm.chat_format import render_parts

    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again?"},
            {"role": "assistant", "content": "Yes, again."}]
    ids, mask = render(conv, tok, "chat")
    e = tok.encode
    learned = [i for i, m in zip(ids, mask) if m]
    assert learned == [*e("Hello."), tok.end_id, *e("Yes, again."), tok.end_id]
    # nothing of the system or user turns, nor the role tokens, is a target
    assert all(m == 0 for i, m in zip(ids, mask) if i in (tok.bos_id, tok.system_id, tok.user_id, tok.assistant_id))
    # the parts concatenate to the whole, one part per message after the opening
    parts = render_parts(conv, tok, "chat")
    assert len(parts) == 1 + len(conv)
    assert [i for p, _ in parts for i in p] == ids and [m for _, q in parts for m in q] == mask
    ids_p, mask_p = render(conv, tok, "playscript")
    assert tok.decode([i for i, m in zip(ids_p, mask_p) if m]) == " Hello. Yes, again."
