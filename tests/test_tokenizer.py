"""Tokenizer: lossless round trips on any Unicode, byte-exact token pieces, special tokens, HF loading."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cakelm.common import CakeError
from cakelm.tokenizer import SPECIAL_TOKENS, Tokenizer, _byte_to_unicode

BYTE_TO_UNICODE = _byte_to_unicode()

TEXTS = [
    "To be, or not to be, that is the question. " * 20,
    "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。" * 10,
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. 12345 + 678 = 13023\n" * 10,
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(iter(TEXTS), vocab_size=400)


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_round_trip_arbitrary_unicode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # every token is a byte string, and the pieces concatenate to exactly the UTF-8 encoding
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


@pytest.mark.parametrize("text", ["名前はまだ無い", "🐈‍⬛ emoji zwj", "e\u0301 combining", "\x00\x01\r\n\t ctrl", ""])
def test_round_trip_examples(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_japanese_merges_learned(tok: Tokenizer) -> None:
    text = "名前はまだ無い"
    assert len(tok.encode(text)) < len(text.encode("utf-8"))  # merged below one token per byte


def test_invalid_utf8_decodes_to_replacement_char(tok: Tokenizer) -> None:
    # "猫" is 3 bytes (E7 8C AB); decoding the tokens of only its first two bytes must not raise
    byte_ids = [tok.hf.token_to_id(BYTE_TO_UNICODE[b]) for b in "猫".encode()[:2]]
    assert all(i is not None for i in byte_ids)
    assert tok.decode(byte_ids + [tok.hf.token_to_id(BYTE_TO_UNICODE[0xAB])]) == "猫"
    assert tok.decode(byte_ids) == "\ufffd"
    assert tok.decode(byte_ids + tok.encode("ok")) == "\ufffdok"


def test_digits_split_individually(tok: Tokenizer) -> None:
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]


def test_special_tokens_reserved_and_not_injectable(tok: Tokenizer) -> None:
    assert [tok.hf.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    ids = tok.encode("a <|end|> b")
    assert tok.end_id not in ids  # user text spelling a control token stays text
    assert tok.decode(ids) == "a <|end|> b"
    assert tok.encode("hi", bos=True)[0] == tok.bos_id
    assert tok.decode([tok.bos_id, *tok.encode("hi")]) == "<|bos|>hi"
    assert tok.decode([tok.bos_id, *tok.encode("hi")], skip_special=True) == "hi"


def test_bytes_per_token(tok: Tokenizer) -> None:
    nb = tok.bytes_per_token()
    assert nb.shape == (tok.vocab_size,)
    assert (nb[: len(SPECIAL_TOKENS)] == 0).all() and (nb[len(SPECIAL_TOKENS):] >= 1).all()
    text = TEXTS[1]
    assert sum(nb[i] for i in tok.encode(text)) == len(text.encode("utf-8"))


def test_save_load_and_transformers_loads_it(tok: Tokenizer, tmp_path) -> None:
    from transformers import PreTrainedTokenizerFast

    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in TEXTS + ["mixed 日本 text 42"]:
        assert again.encode(text) == tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf.decode(tok.encode(text)) == text


def test_bad_inputs(tmp_path) -> None:
    with pytest.raises(CakeError, match="too small"):
        Tokenizer.train(iter(["abc"]), vocab_size=100)
    with pytest.raises(CakeError, match="not found"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CakeError, match="bad.json: not a valid tokenizer.json"):
        Tokenizer.load(tmp_path / "bad.json")
