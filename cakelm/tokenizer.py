"""Byte-level BPE tokenizer (trained and run by Hugging Face `tokenizers`) with the special tokens every stage uses.

Byte-level means every string, in any script, encodes losslessly (no unknown token), and any id sequence decodes
(bytes that are not valid UTF-8, e.g. half of a Japanese character, become U+FFFD). The saved `tokenizer.json`
loads in `transformers.PreTrainedTokenizerFast` unchanged.

Special tokens (ids 0..5, reserved now so later stages never change the vocabulary):
    <|bos|>  starts every document and every conversation      <|pad|>  padding
    <|system|> <|user|> <|assistant|>  open a chat turn          <|end|>  ends a chat turn

An imported model may instead have a SentencePiece-style BPE vocabulary (Llama 2, TinyLlama, Mistral: "▁" for a
space, <0x0A>-style byte tokens for what has no token of its own); `vocab_kind` is the one place that tells the two
kinds apart. SentencePiece puts a "▁" in front of every text it encodes and its decoder takes one off, so:
    decode(ids) is the text of `ids` on their own, exactly what transformers' `tokenizer.decode(ids)` gives, and
        decode(encode(t)) == t (except with a Metaspace pre-tokenizer, as transformers builds GGUF vocabularies:
        it adds no "▁" before a text that starts with a space, so that space is lost, in transformers too);
    token_bytes(id) is what a token adds after earlier text, its leading space kept ("▁the" -> b" the").
Generated text is built from token_bytes (the engine streams it so), so prompt text + reply text is the text of
prompt + reply: no space lost or added; `chat_format.Reply` drops a reply's leading whitespace anyway. A reply
decoded on its own (decode(reply_ids)) lacks that one leading space. Where bytes are not valid UTF-8, a stream
writes one U+FFFD per invalid sequence (Python's rule) while SentencePiece's decoder writes one per byte of a run
of byte tokens that does not decode, as transformers does.

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


BYTE_LEVEL, SENTENCEPIECE = "byte-level", "sentencepiece"  # the vocabulary kinds (`vocab_kind`)
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a SentencePiece byte token, as HF's ByteFallback reads one


def _sentencepiece_decoder(steps: list[dict[str, Any]]) -> bool:
    """Whether decoder steps are SentencePiece's (transformers' LlamaConverter writes Replace("▁", " "),
    ByteFallback, Fuse, Strip(" ", 1, 0); newer files may say Metaspace): what token_bytes reproduces, "▁" as a
    space and <0xNN> as its byte, with a strip only at the start of the fused text (the prefix space encode adds).
    A strip of every token, or anything else, would make decode differ from the tokens' bytes."""
    types = [s.get("type") for s in steps]
    fused = types.index("Fuse") if "Fuse" in types else len(types)
    known = all(
        (t == "Replace" and s.get("pattern") == {"String": "▁"} and s.get("content") == " ")
        or t in ("ByteFallback", "Fuse") or (t == "Metaspace" and s.get("replacement") == "▁")
        or (t == "Strip" and s.get("content") == " " and s.get("stop") == 0 and i > fused)
        for i, (t, s) in enumerate(zip(types, steps)))
    return known and "ByteFallback" in types and ("Replace" in types or "Metaspace" in types)


def vocab_kind(hf: HFTokenizer) -> str:
    """How a vocabulary spells text, read off tokenizer.json's model and decoder (the one place that decides it):
    BYTE_LEVEL, BPE over GPT-2's byte alphabet (GPT-2, Llama 3, SmolLM, Qwen, cakelm's own), or SENTENCEPIECE, BPE
    over text with "▁" for a space and <0xNN> byte tokens (Llama 2, TinyLlama, Mistral). Anything else (WordPiece,
    Unigram, other decoders) is refused with one line naming it: token_bytes could not be exact for it."""
    model = type(hf.model).__name__
    state = json.loads(hf.decoder.__getstate__()) if hf.decoder is not None else {}
    steps = (state.get("decoders") or []) if state.get("type") == "Sequence" else ([state] if state else [])
    if model == "BPE" and [s.get("type") for s in steps] == ["ByteLevel"]:
        return BYTE_LEVEL
    if model == "BPE" and _sentencepiece_decoder(steps):
        return SENTENCEPIECE
    raise CakeError(f"unsupported tokenizer: a {model} model with the decoder "
                    f"{' + '.join(str(s.get('type')) for s in steps) or 'none'} (cakelm reads byte-level BPE, as "
                    "GPT-2, Llama 3 and Qwen have, and SentencePiece-style BPE with byte fallback, as Llama 2 and "
                    "Mistral have)")


def _is_text(text: Any) -> bool:
    """Whether `text` is a str that is Unicode text (UTF-8 encodable: no lone surrogate such as "\\ud800")."""
    if not isinstance(text, str):
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _not_text(text: Any) -> CakeError:
    """The error for what `encode` cannot take (tokenizers raises a bare TypeError, as transformers does)."""
    at = next((i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF), -1) if isinstance(text, str) else -1
    if at < 0:
        return CakeError(f"can only encode text (str), not {type(text).__name__}")
    return CakeError(f"cannot encode text holding a lone surrogate (U+{ord(text[at]):04X} at character {at}): "
                     "it is not Unicode text")


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The merges of a SentencePiece vocabulary that lists none (a GGUF file may not), recovered as transformers'
    `generate_merges` recovers them for its GGUF loader, so ids match it: every split of a token into two tokens,
    ranked by the token's score, then the longer left part first."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[str, str, float]] = []
    for token, score in dict(zip(tokens, scores)).items():
        local = [(token[:k], token[k:], score) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)  # stable, as transformers' sorted()
    return [(a, b) for a, b, _ in merges]


def pre_tokenizer_name(tok: Tokenizer) -> str | None:
    """The GGUF (llama.cpp) name of the tokenizer's pre-tokenizer: "qwen2" for ours, else the PRE_TOKENIZERS entry
    it was built from; None when it is none of them (and for a SentencePiece-style vocabulary)."""
    if tok.kind != BYTE_LEVEL or tok.hf.pre_tokenizer is None:
        return None
    mine = tok.hf.pre_tokenizer.__getstate__()
    if mine == _split_then_bytes(SPLIT_PATTERN).__getstate__():
        return "qwen2"
    return next((name for name, make in PRE_TOKENIZERS.items() if make().__getstate__() == mine), None)


@dataclass
class ChatTemplate:
    """How a conversation is laid out, as text in which special tokens appear by name. `chat_format` is the one
    place that reads it: a conversation is `prefix`, then (when it has no system message and `always_system` or
    `default_system` is set) a system turn with `default_system`, then for every message
        headers[role] + content + end + after_end
    where content is stripped when `trim` is set, and the last message, when it is an assistant's reply to a
    user, opens with headers["assistant"] + final_reply and loses any leading `final_lstrip` characters. A prompt
    for a reply ends with headers["assistant"]. A model learns content + end of its replies."""

    bos: str  # starts a document (a playscript prompt, a pretraining document)
    pad: str  # fills batches (never attended to)
    end: str  # ends a turn: generation stops on it
    prefix: str = ""  # text before the first message
    # role -> the text that opens its turn ({}: no chat). A system header may carry fixed text before the content
    # (Llama 3.1's "Cutting Knowledge Date: ...\nToday Date: ...\n\n", as the template wrote it when it was read)
    headers: dict[str, str] = field(default_factory=dict)
    after_end: str = ""  # text after `end` that closes a turn (ChatML: "\n")
    default_system: str = ""  # the system message the model's template adds when a conversation has none
    always_system: bool = False  # that system turn is there even when default_system is "" (Llama 3.1)
    trim: bool = False  # contents are stripped of surrounding whitespace (Llama 3's `| trim`)
    final_reply: str = ""  # opens the last reply after its header (Qwen3's empty "<think>\n\n</think>\n\n")
    final_lstrip: str = ""  # characters stripped from the start of that last reply (Qwen3: "\n")
    jinja: str = ""  # the model's own Hugging Face chat template (kept for export)


# cakelm's own format: every marker is one special token.
CAKELM_TEMPLATE = ChatTemplate(bos="<|bos|>", pad="<|pad|>", end="<|end|>", prefix="<|bos|>",
                               headers={"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"})


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer`: plain-text encode (special-token strings in the text stay
    text), byte-exact decode, per-token byte lengths for bits-per-byte, and the chat template's special tokens
    (`bos_id`, `pad_id`, `end_id`; `system_id`, `user_id`, `assistant_id` in cakelm's format, else None)."""

    def __init__(self, hf: HFTokenizer, template: ChatTemplate | None = None) -> None:
        self.kind = vocab_kind(hf)  # BYTE_LEVEL or SENTENCEPIECE: how token_bytes and decode read tokens
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
    def from_sentencepiece(cls, tokens: list[str], scores: list[float] | None, merges: list[str] | None,
                           special: list[str], user: list[str], template: ChatTemplate) -> Tokenizer:
        """A SentencePiece-style BPE tokenizer from what a GGUF file of type "llama" stores (pieces with "▁" for a
        space and <0xNN> byte tokens, id = index; scores; merges "a b" or none), built as transformers' GGUF
        loader builds it (its LlamaTokenizer), so ids match transformers: byte-fallback BPE with merges from the
        file or recovered from the scores, a Metaspace pre-tokenizer that puts "▁" before the text unless it
        starts with a space, Llama's decoder; `special` (control tokens and the named bos/eos/unk/pad) become
        special tokens, `user` (user-defined ones) plain added tokens. llama.cpp itself adds "▁" even before a
        leading space; transformers does not."""
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise CakeError("the vocabulary lists a token twice")
        if merges is not None:
            pairs = [tuple(m.split(" ", 1)) for m in merges]
        elif scores is not None and len(scores) == len(tokens):
            pairs = _merges_from_scores(tokens, scores)
        else:
            raise CakeError("a SentencePiece vocabulary without merges needs one score per token")
        try:  # transformers' LlamaTokenizer sets no unk token on the model: byte fallback covers every character
            hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True))
        except Exception as e:  # tokenizers raises a bare Exception on merges of unknown tokens
            raise CakeError(f"the merges do not fit the vocabulary ({str(e).splitlines()[0][:200]})") from None
        hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        hf.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
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

    def with_special_tokens(self, names: Iterable[str]) -> Tokenizer:
        """A copy with these special tokens added at the end of the vocabulary (those it already has stay where
        they are): every existing id keeps its meaning, so data encoded before reads the same."""
        hf = HFTokenizer.from_str(self.hf.to_str())
        new = [n for n in names if hf.token_to_id(n) is None]
        hf.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in new])
        return Tokenizer(hf, self.template if self.template is not CAKELM_TEMPLATE else None)

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
        """Token ids of `text` (treated as plain text), optionally preceded by <|bos|>. A SentencePiece-style
        vocabulary puts its "▁" before the text, as transformers' encode(text, add_special_tokens=False) does."""
        try:
            ids = self.hf.encode(text, add_special_tokens=False).ids
        except TypeError:  # tokenizers' message ("TextInputSequence must be str") names neither cause
            raise _not_text(text) from None
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
        # tokenizers >= 0.20: the same ids without the character offsets, for about 40% less work
        encode = getattr(self.hf, "encode_batch_fast", None) or self.hf.encode_batch
        try:
            return [e.ids for i in range(0, len(texts), chunk)
                    for e in encode(texts[i:i + chunk], add_special_tokens=False)]
        except TypeError:
            raise _not_text(next(t for t in texts if not _is_text(t))) from None

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (b"" for special tokens, and for ids past the vocabulary, which a
        model whose embedding is padded beyond the tokenizer can still produce)."""
        return self._bytes_table[token_id] if 0 <= token_id < len(self._bytes_table) else b""

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Decode ids to text. Specials are rendered by name unless skipped; invalid UTF-8 becomes U+FFFD. A
        SentencePiece-style vocabulary's text is what transformers' decode gives (the module docstring says how
        it differs from the tokens' bytes: the leading space its encoder added is dropped)."""
        if self.kind == SENTENCEPIECE:  # its own decoder, which transformers runs too; ids past the vocabulary
            n = self.vocab_size  # carry no text (a padded embedding's rows), as token_bytes says
            return self.hf.decode([int(i) for i in ids if 0 <= i < n], skip_special_tokens=skip_special)
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
            elif self.kind == SENTENCEPIECE:  # "▁" is a space (kept: see the module docstring), <0xNN> a byte
                byte = _BYTE_TOKEN.fullmatch(piece)
                table.append(bytes([int(byte[1], 16)]) if byte else piece.replace("▁", " ").encode("utf-8"))
            elif all(c in UNICODE_TO_BYTE for c in piece):
                table.append(bytes(UNICODE_TO_BYTE[c] for c in piece))
            else:  # an added (non-special) token is stored as its text, not in the byte alphabet
                table.append(piece.encode("utf-8"))
        return table

    def bytes_per_token(self) -> np.ndarray:
        """int32 array (vocab,) of each token's UTF-8 byte length; 0 for specials (they carry no text), so they
        drop out of bits-per-byte. (A SentencePiece-style text counts its prefix space: one byte per document.)"""
        return np.array([len(b) for b in self._bytes_table], dtype=np.int32)
