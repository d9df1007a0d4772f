"""The LSTM language model that `cakelm compare` races against the Transformer.

The recurrent baseline of the pre-Transformer years (Hochreiter & Schmidhuber 1997; the word-level LSTM LMs of
Zaremba et al. 2014 and Merity et al. 2017, "AWD-LSTM"): token embedding -> n_layers of `torch.nn.LSTM` ->
linear output head. It reads position t only after positions 1..t-1 (the hidden state carries the past), so a
sequence of T tokens costs T steps one after another however many cores there are; attention computes all T
positions at once. That difference is what `compare` measures.

`lstm_for_params` sizes the LSTM so that its parameter count matches a Transformer's (within a few per cent),
so the race is fair in parameters:

    from cakelm.rnn import LSTMLM, lstm_for_params
    cfg = lstm_for_params(transformer.num_params(), vocab_size=2048, n_layers=2)
    lstm = LSTMLM(cfg)
    logits = lstm(idx)                             # (B, T, vocab) for idx (B, T)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class LSTMConfig:
    """Shape of the LSTM LM. The embedding width equals the hidden width (as in Zaremba et al. 2014)."""

    vocab_size: int
    hidden: int
    n_layers: int = 2

    def __post_init__(self) -> None:
        if self.vocab_size < 1 or self.hidden < 1 or self.n_layers < 1:
            raise ValueError(f"LSTM vocab_size, hidden and n_layers must be >= 1, got {self}")


def lstm_num_params(vocab_size: int, hidden: int, n_layers: int) -> int:
    """Parameters of LSTMLM(vocab_size, hidden, n_layers), by formula (tested against the module):
    embedding V*h + per layer 4 gates x (input weights h*h + recurrent weights h*h + two biases 2h), as
    torch.nn.LSTM stores them (bias_ih and bias_hh) + output head h*V (no bias)."""
    return 2 * vocab_size * hidden + n_layers * 4 * (2 * hidden * hidden + 2 * hidden)


def lstm_for_params(target: int, vocab_size: int, n_layers: int = 2, multiple: int = 8) -> LSTMConfig:
    """The LSTM whose parameter count is closest to `target`. Solves 8L h^2 + (2V + 8L) h = target for h and
    rounds to a multiple of `multiple` (friendlier to matmul kernels) when that stays within 2% of the target,
    else to the nearest integer (tiny models, where a step of 8 is a large fraction of the width)."""
    a, b = 8 * n_layers, 2 * vocab_size + 8 * n_layers
    h = (-b + math.sqrt(b * b + 4 * a * target)) / (2 * a)

    def closest(step: int) -> int:
        candidates = {max(step, step * math.floor(h / step)), step * math.ceil(h / step)}
        return min(candidates, key=lambda c: abs(lstm_num_params(vocab_size, c, n_layers) - target))

    best = closest(multiple)
    if abs(lstm_num_params(vocab_size, best, n_layers) / target - 1) > 0.02:
        best = closest(1)
    return LSTMConfig(vocab_size=vocab_size, hidden=best, n_layers=n_layers)


class LSTMLM(nn.Module):
    def __init__(self, cfg: LSTMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.lstm = nn.LSTM(cfg.hidden, cfg.hidden, num_layers=cfg.n_layers, batch_first=True)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Embedding and head ~ N(0, 0.02) like the Transformer's; the LSTM keeps PyTorch's U(-1/sqrt(h),
        1/sqrt(h)), except that the forget-gate biases start at 1 so the cell remembers by default early in
        training (Gers et al. 2000; Jozefowicz et al. 2015). PyTorch orders the gates input, forget, cell,
        output, so the forget gate is the second quarter of each bias vector."""
        nn.init.normal_(self.embed.weight, 0.0, 0.02)
        nn.init.normal_(self.lm_head.weight, 0.0, 0.02)
        self.lstm.reset_parameters()
        h = self.cfg.hidden
        for name, p in self.lstm.named_parameters():
            if name.startswith("bias_ih"):
                p[h:2 * h].fill_(1.0)  # bias_hh keeps its small random values; the two are summed

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids idx (B, T), from a zero initial state."""
        x = self.embed(idx)  # (B, T, h)
        y, _ = self.lstm(x)  # (B, T, h): the top layer's hidden state at every position
        return self.lm_head(y)  # (B, T, vocab)
