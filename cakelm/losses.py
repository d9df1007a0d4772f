"""Loss functions and training-signal formulas, as small pure functions.

Every function takes tensors and returns tensors (or floats); none touches a model, an optimizer or a file, so
each is unit-tested against hand-computed values in tests/test_losses.py. Losses return a *sum* over their units
together with the unit count, so the shared loop can normalise by the number of units in the whole
accumulation window across all ranks (accumulating or sharding then does not change the gradient).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_nll(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """-log p(target) at every position, (B, T); 0 where targets == ignore_index.

    logits (B, T, V), targets (B, T). Computed in fp32 whatever the autocast dtype (a bf16 log-softmax over a
    large vocabulary loses precision)."""
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                          ignore_index=ignore_index, reduction="none")
    return nll.view(targets.shape)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy, summed: (sum of -log p(target) over scored positions, number scored)."""
    return token_nll(logits, targets, ignore_index).sum(), (targets != ignore_index).sum()


def bits_per_byte(nats: float, n_bytes: int) -> float:
    """Cross-entropy in bits per UTF-8 byte of text: total nats / (ln 2 * total bytes). Independent of the
    tokenizer, so models with different vocabularies compare fairly (nanochat's val bpb; Gao et al. 2020,
    "The Pile", bits per byte)."""
    if n_bytes <= 0:
        return float("nan")
    return nats / (math.log(2) * n_bytes)
