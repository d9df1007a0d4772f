"""Generation: greedy equals step-by-step argmax of the full forward, seeds reproduce, limits are enforced."""

from __future__ import annotations

import pytest
import torch

from cakelm.common import CakeError
from cakelm.engine import generate, sample_next
from cakelm.model import Transformer
from tests.conftest import tiny_model_config


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_model_config(max_seq_len=48)).eval()


def test_greedy_matches_full_forward(model: Transformer) -> None:
    prompt = [0, 17, 42, 99]
    out = list(generate(model, prompt, max_new_tokens=20, temperature=0))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt):]


def test_seed_reproducible_and_top_k_one_is_greedy(model: Transformer) -> None:
    a = list(generate(model, [0, 5], 15, temperature=1.0, seed=7))
    b = list(generate(model, [0, 5], 15, temperature=1.0, seed=7))
    c = list(generate(model, [0, 5], 15, temperature=1.0, seed=8))
    assert a == b and a != c
    assert list(generate(model, [0, 5], 15, temperature=1.0, top_k=1, seed=3)) == \
        list(generate(model, [0, 5], 15, temperature=0))


def test_limits_and_stop(model: Transformer) -> None:
    assert len(list(generate(model, [0] * 40, 100, temperature=0))) == 8  # cut to the 48-token context
    with pytest.raises(CakeError, match="context is 48"):
        list(generate(model, [0] * 48, 5))
    with pytest.raises(CakeError, match="empty prompt"):
        list(generate(model, [], 5))
    first = next(generate(model, [0, 5], 10, temperature=0))
    assert list(generate(model, [0, 5], 10, temperature=0, stop_ids=(first,))) == [first]


def test_top_p_keeps_smallest_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    draws = {int(sample_next(logits, 1.0, top_p=0.4, generator=g)) for _ in range(50)}
    assert draws == {0}
