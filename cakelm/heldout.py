"""Held-out language-modelling evaluation, in one place for every stage that reports it.

- `shard_evaluator`: validation loss (nats per token) and bits per byte over a token shard's windows: what
  `cakelm pretrain` logs as val_loss / val_bpb and `cakelm compare` races the two models on.
- `chat_loss` / `heldout_loss` / `chat_evaluator`: loss per assistant token of chat batches (the SFT loss mask):
  what `cakelm sft` logs as val_loss (and per source) and `cakelm eval` reports as the chat loss.

- `infill_spans` / `infill_exact_match`: fill-in-the-middle on held-out documents (a model pretrained with
  --fim-rate): the share of gaps whose greedy middle is exactly the text that was cut out.

Every evaluator splits its data over ranks and all-reduces sums, so a DDP run reports the numbers one process
would. The loop calls evaluators under no_grad and eval mode.

    evaluate = shard_evaluator(val_tokens, tok, seq_len, batch_size=16, max_tokens=0, device=device, info=info)
    evaluate(model)   # {"val_loss": 2.31, "val_bpb": 1.95}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from cakelm.common import DistInfo, all_reduce_sum
from cakelm.data.chat_batches import Seq, fixed_batches
from cakelm.data.fim import FimIds
from cakelm.data.shards import eval_batches
from cakelm.engine import Engine, SamplingParams
from cakelm.losses import IGNORE_INDEX, bits_per_byte, lm_loss, token_nll
from cakelm.tokenizer import Tokenizer

Evaluator = Callable[[torch.nn.Module], dict[str, float]]


def shard_evaluator(val_tokens: np.ndarray, tok: Tokenizer, seq_len: int, batch_size: int, max_tokens: int,
                    device: torch.device, info: DistInfo) -> Evaluator:
    """Validation loss (nats per token) and bits per byte over the (first `max_tokens`, 0 = all) tokens of the
    val shard, in consecutive windows of seq_len."""
    batches = eval_batches(val_tokens, seq_len, batch_size, max_tokens, info.rank, info.world_size)
    nbytes = torch.from_numpy(tok.bytes_per_token()).to(device)  # (V,)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        # [sum nll, tokens, sum nll over tokens that carry text, their bytes], in float64 for the sums
        acc = torch.zeros(4, dtype=torch.float64, device=device)
        for b in batches:
            target = b["target"].to(device)
            nll = token_nll(model(b["input"].to(device)), target)  # (B, T)
            tb = nbytes[target]  # (B, T) bytes of each target token; 0 for <|bos|>
            acc += torch.stack([nll.sum(), torch.tensor(float(target.numel()), device=device),
                                (nll * (tb > 0)).sum(), tb.sum()]).double()
        acc = all_reduce_sum(acc, info)
        return {"val_loss": (acc[0] / acc[1]).item(), "val_bpb": bits_per_byte(acc[2].item(), int(acc[3].item()))}

    return evaluate


def chat_logits(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Logits (B, T, V) of a chat batch, packed (attention kept inside each conversation) or not."""
    return model(batch["input"], segments=batch.get("segments"))


def chat_loss(model: torch.nn.Module, batch: dict[str, Any], device: torch.device | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed nll of the target tokens, their number) of a chat batch (packed or not).

    The output head runs only at the scored positions (the assistant's tokens; `Transformer.forward`'s `only_at`):
    the (B, T, V) logits of prompts and padding were computed, soft-maxed and differentiated for nothing, and with a
    real model's vocabulary of 49k-152k tokens they are most of a training step's memory."""
    if device is not None:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    target = batch["target"]  # (B, T), IGNORE_INDEX off the assistant's tokens
    scored = target != IGNORE_INDEX
    logits = model(batch["input"], segments=batch.get("segments"), only_at=scored)  # (M, V), M scored positions
    return lm_loss(logits, target[scored])


def heldout_loss(model: torch.nn.Module, batches: list[dict], device: torch.device) -> torch.Tensor:
    """[summed nll, number of target tokens] over chat batches, float64 (the loss is their ratio)."""
    acc = torch.zeros(2, dtype=torch.float64, device=device)
    for b in batches:
        loss_sum, n = chat_loss(model, b, device)
        acc += torch.stack([loss_sum.double(), n.double()])
    return acc


def chat_evaluator(val: dict[str, list[Seq]], pad_id: int, batch_size: int, pack: bool, row_len: int,
                   device: torch.device, info: DistInfo) -> Evaluator:
    """Validation loss per assistant token, overall ("val_loss") and per source ("val_loss/SOURCE") when there
    are several."""
    batches = {name: fixed_batches(seqs, batch_size, pad_id, pack, row_len, info.rank, info.world_size)
               for name, seqs in val.items()}

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        # [sum nll, tokens] per source, summed over ranks
        acc = torch.stack([heldout_loss(model, bs, device) for bs in batches.values()])
        acc = all_reduce_sum(acc, info)
        out = {"val_loss": (acc[:, 0].sum() / acc[:, 1].sum()).item()}
        if len(batches) > 1:
            out.update({f"val_loss/{name}": (acc[i, 0] / acc[i, 1]).item() for i, name in enumerate(batches)})
        return out

    return evaluate


def infill_spans(tokens: np.ndarray, fim: FimIds, n: int, seed: int = 0, max_middle: int = 3, before: int = 48,
                 after: int = 24) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Up to `n` (prefix, middle, suffix) token spans cut from held-out documents (seeded, distinct positions, at
    most 20 n draws): a middle of 1 to max_middle tokens, with up to `before` tokens of its document before it and
    `after` after; every cut (the prefix's start and the suffix's end included) where a character starts, none
    across a document's <|bos|>. Draws whose prefix or suffix would be empty are skipped."""
    rng = np.random.default_rng([seed, 7])
    out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    high = len(tokens) - after - max_middle - 1  # one token past the suffix is read: does a character start there?
    if high <= before:
        return out
    for a in dict.fromkeys(int(x) for x in rng.integers(before, high, size=20 * n)):  # distinct, in draw order
        if len(out) == n:
            break
        b = a + int(rng.integers(1, max_middle + 1))
        window = np.asarray(tokens[a - before: b + after + 1]).astype(np.int64)  # + the token after the suffix
        lo, hi, end = before, before + (b - a), len(window) - 1  # middle [lo, hi); the suffix ends by `end`
        bos = np.flatnonzero(window == fim.bos)
        first = int(bos[bos < lo].max()) + 1 if (bos < lo).any() else 0  # this document's start
        last = min(end, int(bos[bos >= lo].min())) if (bos >= lo).any() else end
        if last <= hi or not (fim.starts_char[window[lo]] and fim.starts_char[window[hi]]):
            continue  # the middle crosses a document boundary, or a cut falls inside a character
        while first < lo and not fim.starts_char[window[first]]:
            first += 1  # the prefix starts on a whole character
        while last > hi and not fim.starts_char[window[last]]:
            last -= 1  # and the suffix ends on one
        if first < lo and hi < last:
            out.append((window[first:lo], window[lo:hi], window[hi:last]))
    return out


@torch.no_grad()
def infill_nll(model: torch.nn.Module, spans: list[tuple[np.ndarray, np.ndarray, np.ndarray]], fim: FimIds
               ) -> dict[str, float]:
    """How well the model predicts each cut-out middle, teacher-forced, in nats per token: after the PSM prompt
    (it sees the suffix), and after <|bos|> prefix alone (left to right: what any model can do). The first lower than
    the second means the model uses what comes after the gap. Also the nats of ending the middle there (<|bos|>)."""
    device = next(model.parameters()).device
    acc = np.zeros(3)  # nats of middles with the suffix, without it, of the ends
    n_tokens = 0
    for prefix, middle, suffix in spans:
        psm = [fim.bos, fim.prefix, *prefix.tolist(), fim.suffix, *suffix.tolist(), fim.middle, *middle.tolist(),
               fim.bos]
        l2r = [fim.bos, *prefix.tolist(), *middle.tolist()]
        for k, (ids, scored) in enumerate(((psm, len(middle) + 1), (l2r, len(middle)))):
            idx = torch.tensor(ids, device=device)[None]
            nll = token_nll(model(idx[:, :-1]), idx[:, 1:])[0, -scored:].double().cpu().numpy()  # (scored,)
            acc[k] += nll[:len(middle)].sum()
            if k == 0:
                acc[2] += nll[-1]
        n_tokens += len(middle)
    n = max(len(spans), 1)
    return {"nll_with_suffix": acc[0] / max(n_tokens, 1), "nll_left_to_right": acc[1] / max(n_tokens, 1),
            "nll_end": acc[2] / n}


def infill_exact_match(engine: Engine, spans: list[tuple[np.ndarray, np.ndarray, np.ndarray]], fim: FimIds,
                       batch_size: int = 32) -> dict[str, Any]:
    """Greedy middles for `spans` (PSM prompts: <|bos|> <pre> prefix <suf> suffix <mid>, stopping at <|bos|> or
    a sentinel): the share whose text equals the cut-out middle's, the share that ended by themselves, and a few
    examples; with `infill_nll`'s numbers."""
    tok = engine.tok
    prompts = [[tok.bos_id, fim.prefix, *p.tolist(), fim.suffix, *s.tolist(), fim.middle] for p, _, s in spans]
    max_mid = max((len(m) for _, m, _ in spans), default=1)
    params = SamplingParams(max_new_tokens=max_mid + 8, temperature=0.0,
                            stop_ids=(tok.bos_id, fim.prefix, fim.suffix, fim.middle))
    right, ended, examples = 0, 0, []
    for i in range(0, len(prompts), batch_size):
        for c in engine.generate(prompts[i:i + batch_size], params):
            prefix, middle, suffix = spans[i + c.prompt_index]
            want = tok.decode(middle.tolist())
            right += c.text == want
            ended += c.finish_reason == "stop"
            if len(examples) < 5:
                examples.append({"prefix": tok.decode(prefix.tolist())[-40:], "middle": want, "reply": c.text,
                                 "suffix": tok.decode(suffix.tolist())[:30]})
    n = len(spans)
    return {"n": n, "exact_match": right / n if n else float("nan"), "ended": ended / n if n else float("nan"),
            **infill_nll(engine.model, spans, fim), "examples": examples}
