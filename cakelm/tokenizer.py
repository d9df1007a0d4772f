"""Byte-level BPE tokenizer (trained and run by Hugging Face `tokenizers`) with the special tokens every stage uses.

Byte-level means every string, in any script, encodes losslessly (no unknown token), and any id sequence decodes
(bytes that are not valid UTF-8, e.g. half of a Japanese character, become U+FFFD). The saved `tokenizer.json`
loads in `transformers.PreTrainedTokenizerFast` unchanged.

Special tokens (ids 0..5, reserved now so later stages never change the vocabulary):
    <|bos|>  starts every document and every conversation      <|pad|>  padding
    <|system|> <|user|> <|assistant|>  open a chat turn          <|end|>  ends a chat turn

    tok = Tokenizer.train(texts, vocab_size=2048); tok.save("tokenizer.json")
    ids = tok.encode("To be, or not to be")
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

import numpy as np
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from cakelm.common import CakeError

SPECIAL_TOKENS = ["<|bos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# GPT-4's pre-tokenizer split, except that numbers split into single digits (as in Llama): small models learn
# arithmetic far more easily when 1234 is always 1 2 3 4 rather than an arbitrary merge like 12 34.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)


def _byte_to_unicode() -> dict[int, str]:
    """The byte-level alphabet: each of the 256 bytes as a printable character (GPT-2's mapping, which HF
    `ByteLevel` uses). Printable Latin-1 bytes map to themselves, the rest to chr(256 + k)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


UNICODE_TO_BYTE = {c: b for b, c in _byte_to_unicode().items()}


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer`: plain-text encode (special-token strings in the text stay
    text), byte-exact decode, per-token byte lengths for bits-per-byte."""

    def __init__(self, hf: HFTokenizer) -> None:
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            raise CakeError(f"tokenizer lacks the special tokens {', '.join(missing)}")
        self.hf = hf
        # User text that happens to contain "<|end|>" must not become the control token.
        self.hf.encode_special_tokens = True
        self.bos_id, self.pad_id, self.system_id, self.user_id, self.assistant_id, self.end_id = (
            hf.token_to_id(t) for t in SPECIAL_TOKENS
        )

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
        """Train byte-level BPE on an iterator of documents. vocab_size counts the 256 bytes and the specials."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise CakeError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least "
                            f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (or a directory containing it)."""
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise CakeError(f"tokenizer not found: {p}")
        try:
            return cls(HFTokenizer.from_file(str(p)))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CakeError(f"{p}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None

    def save(self, path: str | Path) -> None:
        from cakelm.common import write_text_atomic

        write_text_atomic(path, self.hf.to_str(pretty=True))

    # -- use ---------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Token ids of `text` (treated as plain text), optionally preceded by <|bos|>."""
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos else ids

    def encode_batch(self, texts: list[str], chunk: int = 1024) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads), `chunk` at a time: an HF Encoding also holds offsets,
        token strings and masks, and 100k of them at once take gigabytes."""
        return [e.ids for i in range(0, len(texts), chunk)
                for e in self.hf.encode_batch(texts[i:i + chunk], add_special_tokens=False)]

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (b"" for special tokens, and for ids past the vocabulary, which a
        model whose embedding is padded beyond the tokenizer can still produce)."""
        return self._bytes_table[token_id] if 0 <= token_id < len(self._bytes_table) else b""

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Decode ids to text. Specials are rendered by name unless skipped; invalid UTF-8 becomes U+FFFD."""
        out, buf = [], bytearray()
        for i in ids:
            b = self.token_bytes(i)
            if b or i not in self._special_ids:
                buf += b
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special:
                out.append(self.hf.id_to_token(i))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    @cached_property
    def _special_ids(self) -> frozenset[int]:
        return frozenset(self.hf.token_to_id(t) for t in SPECIAL_TOKENS)

    @cached_property
    def _bytes_table(self) -> list[bytes]:
        table = []
        for i in range(self.vocab_size):
            piece = self.hf.id_to_token(i)
            if i in self._special_ids or piece is None:
                table.append(b"")
            else:
                table.append(bytes(UNICODE_TO_BYTE[c] for c in piece))
        return table

    def bytes_per_token(self) -> np.ndarray:
        """int32 array (vocab,) of each token's UTF-8 byte length; 0 for specials (they carry no text), so they
        drop out of bits-per-byte."""
        return np.array([len(b) for b in self._bytes_table], dtype=np.int32)
