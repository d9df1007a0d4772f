"""Held-out language-modelling evaluation, in one place for every stage that reports it.

- `shard_evaluator`: validation loss (nats per token) and bits per byte over a token shard's windows: what
  `cakelm pretrain` logs as val_loss / val_bpb and `cakelm compare` races the two models on.
- `chat_loss` / `heldout_loss` / `chat_evaluator`: loss per assistant token of chat batches (the SFT loss mask):
  what `cakelm sft` logs as val_loss (and per source) and `cakelm eval` reports as the chat loss.

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
from cakelm.data.shards import eval_batches
from cakelm.losses import bits_per_byte, lm_loss, token_nll
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


def chat_loss(model: torch.nn.Module, batch: dict[str, Any], device: torch.device | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed nll of the target tokens, their number) of a chat batch (packed or not)."""
    if device is not None:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return lm_loss(model(batch["input"], segments=batch.get("segments")), batch["target"])


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
