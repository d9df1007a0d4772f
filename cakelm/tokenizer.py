"""Byte-level BPE tokenizer (trained and run by Hugging Face `tokenizers`) with the special tokens every stage uses.

Byte-level means every string, in any script, encodes losslessly (no unknown token), and any id sequence decodes
(bytes that are not valid UTF-8, e.g. half of a Japanese character, become U+FFFD). The saved `tokenizer.json`
loads in `transformers.PreTrainedTokenizerFast` unchanged.

Special tokens (ids 0..5, reserved now so later stages never change the vocabulary):
    <|bos|>  starts every document and every conversation      <|pad|>  padding
    <|system|> <|user|> <|assistant|>  open a chat turn          <|end|>  ends a chat turn

An imported model (`cakelm import`) keeps its own vocabulary and special tokens; its `ChatTemplate` says which
of them start a document, pad and end a turn, and how its chat turns look (e.g. ChatML's
"<|im_start|>user\n...<|im_end|>\n"). A checkpoint stores that template in `tokenizer_config.json` beside
`tokenizer.json` (cakelm's own tokenizers need none).

    tok = Tokenizer.train(texts, vocab_size=2048); tok.save("tokenizer.json")
    ids = tok.encode("To be, or not to be")
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from cakelm.common import CakeError

SPECIAL_TOKENS = ["<|bos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CONFIG_FILE = "tokenizer_config.json"  # beside tokenizer.json: the chat template of an imported tokenizer

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

# Pre-tokenizers of the byte-level BPE vocabularies a GGUF file may name (`tokenizer.ggml.pre`), as llama.cpp
# splits text for them. smollm: digits one by one, then GPT-2's split (as SmolLM2's own tokenizer.json does).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    """Split text by a regex (each match a piece), then map each piece to byte-level characters."""
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


_QWEN2_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
    "llama-bpe": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    # Qwen2's split: GPT-4's with single digits, which is ours (SPLIT_PATTERN) written without possessive
    # quantifiers; GGUF export names our tokenizer's pre-tokenizer "qwen2" so llama.cpp splits text as we do
    "qwen2": lambda: _split_then_bytes(_QWEN2_SPLIT),
}


def pre_tokenizer_name(tok: Tokenizer) -> str | None:
    """The GGUF (llama.cpp) name of the tokenizer's pre-tokenizer: "qwen2" for ours, else the PRE_TOKENIZERS entry
    it was built from; None when it is none of them."""
    mine = tok.hf.pre_tokenizer.__getstate__()
    if mine == _split_then_bytes(SPLIT_PATTERN).__getstate__():
        return "qwen2"
    return next((name for name, make in PRE_TOKENIZERS.items() if make().__getstate__() == mine), None)


@dataclass
class ChatTemplate:
    """How a conversation is laid out, as text in which special tokens appear by name. `chat_format.render` is
    the one place that reads it: a conversation is `prefix`, then (when it has no system message and
    `default_system` is set) that system message, then for every message
        headers[role] + content + end + after_end
    and a prompt for a reply ends with headers["assistant"]. A model learns content + end of its replies."""

    bos: str  # starts a document (a playscript prompt, a pretraining document)
    pad: str  # fills batches (never attended to)
    end: str  # ends a turn: generation stops on it
    prefix: str = ""  # text before the first message
    headers: dict[str, str] = field(default_factory=dict)  # role -> the text that opens its turn ({}: no chat)
    after_end: str = ""  # text after `end` that closes a turn (ChatML: "\n")
    default_system: str = ""  # the system message the model's template adds when a conversation has none
    jinja: str = ""  # the model's own Hugging Face chat template (kept for export)


# cakelm's own format: every marker is one special token.
CAKELM_TEMPLATE = ChatTemplate(bos="<|bos|>", pad="<|pad|>", end="<|end|>", prefix="<|bos|>",
                               headers={"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"})


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer`: plain-text encode (special-token strings in the text stay
    text), byte-exact decode, per-token byte lengths for bits-per-byte, and the chat template's special tokens
    (`bos_id`, `pad_id`, `end_id`; `system_id`, `user_id`, `assistant_id` in cakelm's format, else None)."""

    def __init__(self, hf: HFTokenizer, template: ChatTemplate | None = None) -> None:
        self.template = template or CAKELM_TEMPLATE
        needed = SPECIAL_TOKENS if template is None else [self.template.bos, self.template.pad, self.template.end]
        missing = [t for t in needed if hf.token_to_id(t) is None]
        if missing:
            raise CakeError(f"tokenizer lacks the special tokens {', '.join(missing)}")
        self.hf = hf
        # User text that happens to contain "<|end|>" must not become the control token.
        self.hf.encode_special_tokens = True
        self.bos_id, self.pad_id, self.end_id = (hf.token_to_id(t) for t in (self.template.bos, self.template.pad,
                                                                             self.template.end))
        self.system_id, self.user_id, self.assistant_id = (
            hf.token_to_id(h) if (h := self.template.headers.get(r)) in self.special_tokens else None
            for r in ("system", "user", "assistant"))
        self._template_ids: dict[str, list[int]] = {}

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
        """Train byte-level BPE on an iterator of documents. vocab_size counts the 256 bytes and the specials."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise CakeError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least "
                            f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = _split_then_bytes(SPLIT_PATTERN)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @classmethod
    def from_bpe(cls, tokens: list[str], merges: list[str], special: list[str], pre: str,
                 template: ChatTemplate) -> Tokenizer:
        """A byte-level BPE tokenizer from its vocabulary (token strings in GPT-2's byte alphabet, id = index),
        merges ("a b"), special tokens and the name of its pre-tokenizer (PRE_TOKENIZERS): what a GGUF file
        stores."""
        if pre not in PRE_TOKENIZERS:
            raise CakeError(f"unsupported pre-tokenizer {pre!r} (supported: {', '.join(PRE_TOKENIZERS)})")
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise CakeError("the vocabulary lists a token twice")
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=False))
        hf.pre_tokenizer = PRE_TOKENIZERS[pre]()
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        return cls(hf, template)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (or a directory containing it), with the chat template in the
        tokenizer_config.json beside it when there is one (an imported model's)."""
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise CakeError(f"tokenizer not found: {p}")
        try:
            hf = HFTokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CakeError(f"{p}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        template, cfg = None, p.with_name(CONFIG_FILE)
        if cfg.is_file():
            try:
                saved = json.loads(cfg.read_text(encoding="utf-8")).get("cakelm_chat_template")
                template = ChatTemplate(**saved) if saved is not None else None
            except (json.JSONDecodeError, TypeError, AttributeError) as e:
                raise CakeError(f"{cfg}: not a valid tokenizer config ({e})") from None
        return cls(hf, template)

    def save(self, path: str | Path) -> None:
        from cakelm.common import write_text_atomic

        write_text_atomic(path, self.hf.to_str(pretty=True))

    def config(self) -> dict[str, Any]:
        """tokenizer_config.json: the Hugging Face keys (special tokens, chat template) and our template."""
        t = self.template
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": t.bos, "eos_token": t.end,
                "pad_token": t.pad, "clean_up_tokenization_spaces": False, "chat_template": t.jinja or None,
                "cakelm_chat_template": asdict(t)}

    # -- use ---------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Token ids of `text` (treated as plain text), optionally preceded by <|bos|>."""
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos else ids

    def encode_template(self, text: str) -> list[int]:
        """Ids of a piece of chat-template text, where special-token names ARE the special tokens (unlike
        `encode`, which treats everything as plain text). Cached: templates have few distinct pieces."""
        if text not in self._template_ids:
            ids: list[int] = []
            for i, piece in enumerate(self._special_split.split(text)):
                ids += [self.hf.token_to_id(piece)] if i % 2 else (self.encode(piece) if piece else [])
            self._template_ids[text] = ids
        return list(self._template_ids[text])  # a copy: callers extend it

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
    def special_tokens(self) -> frozenset[str]:
        """The control tokens (cakelm's six, or an imported vocabulary's, e.g. <|im_start|>)."""
        return frozenset(t.content for t in self.hf.get_added_tokens_decoder().values() if t.special)

    @cached_property
    def _special_ids(self) -> frozenset[int]:
        return frozenset(self.hf.token_to_id(t) for t in self.special_tokens)

    @cached_property
    def _special_split(self) -> re.Pattern:
        names = sorted(self.special_tokens, key=len, reverse=True)  # longest first: "<|a|>x" before "<|a|>"
        return re.compile("(" + "|".join(map(re.escape, names)) + ")" if names else "(?!)")

    @cached_property
    def _bytes_table(self) -> list[bytes]:
        table = []
        for i in range(self.vocab_size):
            piece = self.hf.id_to_token(i)
            if i in self._special_ids or piece is None:
                table.append(b"")
            elif all(c in UNICODE_TO_BYTE for c in piece):
                table.append(bytes(UNICODE_TO_BYTE[c] for c in piece))
            else:  # an added (non-special) token is stored as its text, not in the byte alphabet
                table.append(piece.encode("utf-8"))
        return table

    def bytes_per_token(self) -> np.ndarray:
        """int32 array (vocab,) of each token's UTF-8 byte length; 0 for specials (they carry no text), so they
        drop out of bits-per-byte."""
        return np.array([len(b) for b in self._bytes_table], dtype=np.int32)
