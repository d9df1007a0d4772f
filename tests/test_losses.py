"""Formulas against hand-computed values: LM loss, bits per byte, learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch

from cakelm.losses import IGNORE_INDEX, bits_per_byte, lm_loss, token_nll
from cakelm.optim import OptimConfig, lr_multiplier


def test_lm_loss_hand_computed() -> None:
    # one row, two positions, vocab 2. Position 0: logits (0, ln 3) -> p(1) = 3/4; position 1: uniform.
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, 5.0]]])
    targets = torch.tensor([[1, 0]])
    total, n = lm_loss(logits, targets)
    assert n.item() == 2
    assert total.item() == pytest.approx(-math.log(0.75) + math.log(2.0), abs=1e-6)
    nll = token_nll(logits, targets)
    assert nll.shape == (1, 2) and nll[0, 1].item() == pytest.approx(math.log(2.0), abs=1e-6)


def test_lm_loss_ignores_masked_targets() -> None:
    logits = torch.zeros(1, 3, 4)  # uniform over 4
    total, n = lm_loss(logits, torch.tensor([[1, IGNORE_INDEX, 2]]))
    assert n.item() == 2 and total.item() == pytest.approx(2 * math.log(4.0), abs=1e-6)


def test_bits_per_byte() -> None:
    assert bits_per_byte(8 * math.log(2), 8) == pytest.approx(1.0)  # 8 bits over 8 bytes
    assert bits_per_byte(math.log(256) * 10, 10) == pytest.approx(8.0)  # uniform over bytes = 8 bits/byte
    assert math.isnan(bits_per_byte(1.0, 0))


def test_warmup_then_cosine() -> None:
    cfg = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, 110, cfg) == pytest.approx(0.1)  # (0+1)/10
    assert lr_multiplier(9, 110, cfg) == pytest.approx(1.0)
    assert lr_multiplier(10, 110, cfg) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_multiplier(60, 110, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi/2) = 0
    assert lr_multiplier(110, 110, cfg) == pytest.approx(0.1)
    assert lr_multiplier(500, 110, cfg) == pytest.approx(0.1)  # past the end: stays at the floor


def test_wsd_and_constant() -> None:
    cfg = OptimConfig(warmup_steps=0, schedule="wsd", decay_frac=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(0, 100, cfg) == 1.0
    assert lr_multiplier(79, 100, cfg) == 1.0  # stable phase ends at step 80
    assert lr_multiplier(90, 100, cfg) == pytest.approx(0.5)  # linear decay over steps 80..100
    assert lr_multiplier(100, 100, cfg) == pytest.approx(0.0)
    const = OptimConfig(warmup_steps=4, schedule="constant")
    assert [lr_multiplier(s, 10, const) for s in (0, 3, 9)] == [0.25, 1.0, 1.0]
