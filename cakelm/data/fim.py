"""Fill-in-the-middle (FIM) pretraining: rows in which a document's middle is moved to its end, so that a
left-to-right model learns to fill a gap from what comes before and after it (Bavarian et al. 2022, "Efficient
Training of Language Models to Fill in the Middle"; code models such as StarCoder and Qwen2.5-Coder train so).

    cakelm pretrain --fim-rate 0.5                          # half of the documents in every row, PSM and SPM
    cakelm sample runs/default/base --prefix "To be, or " --suffix " to be"   # fills the middle

A document d = prefix + middle + suffix, cut at two random points, becomes

    PSM: <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle
    SPM: <|fim_prefix|> <|fim_suffix|> suffix <|fim_middle|> prefix middle      (the paper's "SPM mode")

and the loss is the usual next-token loss over the whole row. The transform is applied to each document piece of
a training window (the paper's "context-level FIM", applied after the corpus is cut into rows) with probability
`rate`, choosing SPM over PSM with probability `spm_rate` (the paper trains both, 50/50); a row grows by 3 tokens
per transformed piece and is cut back to its length, as the paper truncates; a middle is followed by a <|bos|>
(the paper's end-of-text after the middle: see `fim_row`). The cuts fall on token boundaries
where a character starts (a byte-level BPE token can hold part of a character), so the transform is a permutation
of the document's own tokens (exactly invertible: `fim_unpermute`) and never splits a character. At inference the
prompt is `<|bos|> <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|>` and the middle ends where the model
starts a new document (`<|bos|>`), as training rows show it.

The three tokens are special tokens added to the tokenizer's vocabulary (at its end) by `cakelm pretrain
--fim-rate` when it trains from scratch with a tokenizer that lacks them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cakelm.common import CakeError
from cakelm.tokenizer import Tokenizer

FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")


@dataclass(frozen=True)
class FimIds:
    """The sentinel ids, <|bos|>, and which tokens may start a piece (not a UTF-8 continuation byte first)."""

    prefix: int
    suffix: int
    middle: int
    bos: int
    starts_char: np.ndarray  # (vocab,) bool

    @classmethod
    def of(cls, tok: Tokenizer) -> FimIds:
        ids = [tok.hf.token_to_id(t) for t in FIM_TOKENS]
        if any(i is None for i in ids):
            raise CakeError(f"the tokenizer has no fill-in-the-middle tokens ({', '.join(FIM_TOKENS)}): the model was "
                            "not pretrained with --fim-rate")
        # a token whose first byte is 10xxxxxx continues a character; specials (no bytes) start nothing mid-text
        starts = np.array([not b or (b[0] & 0xC0) != 0x80 for b in (tok.token_bytes(i) for i in
                                                                   range(tok.vocab_size))])
        return cls(*ids, bos=tok.bos_id, starts_char=starts)


def cut_points(doc: np.ndarray, fim: FimIds) -> np.ndarray:
    """Where a document (token ids, without its <|bos|>) may be cut: 0, len(doc), and every position whose token
    starts a character."""
    inner = np.flatnonzero(fim.starts_char[doc[1:]]) + 1
    return np.concatenate([[0], inner, [len(doc)]])


def fim_permute(doc: np.ndarray, a: int, b: int, spm: bool, fim: FimIds) -> np.ndarray:
    """doc cut at a <= b into prefix doc[:a], middle doc[a:b], suffix doc[b:], in PSM or SPM order (3 tokens
    longer)."""
    if not 0 <= a <= b <= len(doc):
        raise ValueError(f"cuts {a}, {b} outside a document of {len(doc)} tokens")
    pre, suf, mid = np.array([fim.prefix]), np.array([fim.suffix]), np.array([fim.middle])
    doc = doc.astype(np.int64)  # the sentinels' ids may not fit the data's uint16
    if spm:
        return np.concatenate([pre, suf, doc[b:], mid, doc[:a], doc[a:b]])
    return np.concatenate([pre, doc[:a], suf, doc[b:], mid, doc[a:b]])


def fim_unpermute(ids: np.ndarray, fim: FimIds) -> np.ndarray:
    """The document a whole (not truncated) fim_permute output came from: PSM -> prefix + middle + suffix;
    SPM -> (prefix + middle) + suffix."""
    ids = np.asarray(ids)
    if len(ids) < 3 or ids[0] != fim.prefix:
        raise ValueError("not a fill-in-the-middle sequence (it must start with <|fim_prefix|>)")
    s = int(np.flatnonzero(ids == fim.suffix)[0])
    m = int(np.flatnonzero(ids == fim.middle)[0])
    if s == 1:  # SPM: <pre> <suf> suffix <mid> prefix+middle
        return np.concatenate([ids[m + 1:], ids[2:m]])
    return np.concatenate([ids[1:s], ids[m + 1:], ids[s + 1:m]])


def fim_row(row: np.ndarray, rng: np.random.Generator, rate: float, spm_rate: float, fim: FimIds) -> np.ndarray:
    """A training window (T+1 token ids, documents each starting with <|bos|>, the first one possibly cut) with
    each document piece FIM-transformed with probability `rate` (SPM with probability `spm_rate`), as int64 (the
    sentinels' ids may not fit the data's dtype), of the window's length. A piece's leading <|bos|> stays in front;
    pieces of fewer than 2 tokens stay as they are.

    A transformed middle must be seen to end, or a model never learns where to stop filling: inside the window the
    next piece's <|bos|> follows it; the last piece (usually the only one: a document is longer than a window) is
    shortened, at a character start, so that it ends with a <|bos|> of its own within the window. Earlier pieces'
    3 added tokens push the window's end out, as the paper truncates."""
    starts = np.flatnonzero(row == fim.bos)
    bounds = np.unique(np.concatenate([[0], starts, [len(row)]]))
    out: list[np.ndarray] = []
    length = 0
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        piece = row[lo:hi].astype(np.int64)
        head, doc = (piece[:1], piece[1:]) if piece[0] == fim.bos else (piece[:0], piece)
        last = i == len(bounds) - 2
        if len(doc) >= 2 and rng.random() < rate:
            tail = np.empty(0, dtype=np.int64)
            if last:  # fit [head, <pre>, <suf>, <mid>, doc..., <|bos|>] into what is left of the window
                room = len(row) - length - len(head) - 4
                cuts = cut_points(doc, fim)
                keep = int(cuts[cuts <= room].max()) if room >= 2 else 0
                doc, tail = (doc[:keep], np.array([fim.bos])) if keep >= 2 else (doc, tail)
            if len(tail) or not last:
                a, b = np.sort(rng.choice(cut_points(doc, fim), size=2))
                doc = np.concatenate([fim_permute(doc, int(a), int(b), bool(rng.random() < spm_rate), fim), tail])
        out += [head, doc]
        length += len(head) + len(doc)
    return np.concatenate(out)[:len(row)]


def infill_prompt(tok: Tokenizer, prefix: str, suffix: str) -> list[int]:
    """The ids that ask a FIM-trained model for the middle between `prefix` and `suffix` (PSM)."""
    fim = FimIds.of(tok)
    return [tok.bos_id, fim.prefix, *tok.encode(prefix), fim.suffix, *tok.encode(suffix), fim.middle]
