"""Formulas against hand-computed values: LM loss, bits per byte, learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch

from cakelm import losses
from cakelm.losses import IGNORE_INDEX, bits_per_byte, lm_loss, token_nll, unlikelihood_loss
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


def test_group_advantages_hand_computed() -> None:
    from cakelm.losses import group_advantages

    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    # group 1: mean 0.25, Bessel std sqrt(0.75 / 3) = 0.5; group 2 has no signal
    adv, zero = group_advantages(rewards, 4, "group")
    assert zero == 1
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]) / torch.tensor(
        [0.5001] * 4 + [1e-4] * 4) * torch.tensor([1.0] * 4 + [0.0] * 4))
    adv, _ = group_advantages(rewards, 4, "none")  # Dr. GRPO: centred only
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    adv, _ = group_advantages(rewards, 4, "batch")  # batch std: sqrt(1.875 / 7)
    assert adv[0].item() == pytest.approx(0.75 / (math.sqrt(1.875 / 7) + 1e-4), rel=1e-5)
    with pytest.raises(ValueError):
        group_advantages(rewards, 3)
    # equal rewards that are not exact in binary (the mean of seven 0.7s is not 0.7): still no signal
    adv, zero = group_advantages(torch.full((7,), 0.7), 7, "group")
    assert zero == 1 and torch.equal(adv, torch.zeros(7))


def test_first_error_advantages_hand_computed() -> None:
    from cakelm.losses import first_error_advantages

    adv = torch.tensor([1.0, -1.0, -0.5, -2.0, 0.0])
    first = torch.tensor([2, 2, 0, 9, 3])  # row 2: no false step known; row 3: the error past the last column
    out = first_error_advantages(adv, first, 4)
    torch.testing.assert_close(out, torch.tensor([
        [1.0, 1.0, 1.0, 1.0],  # a better-than-average reply: every token, whatever its steps
        [0.0, 0.0, -1.0, -1.0],  # pushed down from column 2 on, its right start spared
        [-0.5, -0.5, -0.5, -0.5],  # wrong with no false equation: the whole reply, as sequence credit does
        [0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0]]))


def test_dynamic_sampling_rows_hand_computed() -> None:
    from cakelm.losses import dynamic_sampling_rows

    # 5 groups of 2: all right, mixed, all wrong, mixed, mixed
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.5, 0.0])
    assert dynamic_sampling_rows(rewards, 2, 2).tolist() == [2, 3, 6, 7]  # the first two mixed groups
    assert dynamic_sampling_rows(rewards, 2, 3).tolist() == [2, 3, 6, 7, 8, 9]
    # only 3 groups differ: the first flat group (group 0) fills the fourth place, the batch keeps its order
    assert dynamic_sampling_rows(rewards, 2, 4).tolist() == [0, 1, 2, 3, 6, 7, 8, 9]
    assert dynamic_sampling_rows(torch.zeros(6), 3, 1).tolist() == [0, 1, 2]  # no signal anywhere: still a batch
    for bad in (0, 6):
        with pytest.raises(ValueError):
            dynamic_sampling_rows(rewards, 2, bad)
    with pytest.raises(ValueError):
        dynamic_sampling_rows(rewards, 3, 1)


def test_clipped_policy_loss_hand_computed() -> None:
    from cakelm.losses import clipped_policy_loss

    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 1.25]]))
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    loss, clipped = clipped_policy_loss(logp, old, adv, eps_low=0.2, eps_high=0.28)
    # ratio 1.5, A=+1: clipped to 1.28; A=-1: the unclipped -1.5 is the min; ratio 0.5, A=-1: clipped to 0.8;
    # ratio 1.25 < 1.28: not clipped (clip-higher)
    torch.testing.assert_close(loss, torch.tensor([[-1.28, 1.5, 0.8, -1.25]]))
    assert clipped.tolist() == [[True, False, True, False]]
    # one advantage per completion broadcasts; with A > 0 a ratio below 1 - eps stays unclipped (the min is
    # pessimistic: the objective never gains from moving further)
    loss1, clipped1 = clipped_policy_loss(logp, old, torch.tensor([2.0]))
    torch.testing.assert_close(loss1, torch.tensor([[-2.4, -2.4, -1.0, -2.4]]))
    assert clipped1.tolist() == [[True, True, False, True]]


def test_kl_k3_hand_computed() -> None:
    from cakelm.losses import kl_k3

    kl = kl_k3(torch.log(torch.tensor([0.5, 0.3])), torch.log(torch.tensor([0.25, 0.3])))
    torch.testing.assert_close(kl, torch.tensor([0.5 + math.log(2.0) - 1.0, 0.0]))
    assert torch.isfinite(kl_k3(torch.tensor([-1000.0]), torch.tensor([0.0]))).all()  # clamped, no overflow


def test_aggregation_modes_hand_computed() -> None:
    from cakelm.losses import aggregate

    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert [round(x.item() if torch.is_tensor(x) else x, 6) for x in aggregate(per_token, mask, "token_mean")] \
        == [7.0, 3.0]
    total, units = aggregate(per_token, mask, "sequence_mean")  # (1 + 2) / 2 + 4 / 1
    assert (total.item(), units) == (5.5, 2.0)
    total, units = aggregate(per_token, mask, "constant", max_new_tokens=4)  # / (2 completions x 4)
    assert (total.item(), units) == (7.0, 8.0)
    with pytest.raises(ValueError):
        aggregate(per_token, mask, "constant")


def test_on_policy_loss_is_zero_but_its_gradient_is_not() -> None:
    from cakelm.losses import aggregate, clipped_policy_loss

    # ratio 1 (logp = old_logp) and advantages centred over the group: the loss is sum(A) = 0 ...
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.8], [0.5, 0.4, 0.9]])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    per_token, clipped = clipped_policy_loss(logp, logp.detach(), adv)
    loss, units = aggregate(per_token, torch.ones(2, 3), "token_mean")
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and units == 6.0 and not clipped.any()
    # ... but d loss / d logp_t = -A_i * ratio = -A_i: push up completion 0's tokens, down completion 1's
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0] * 3, [1.0] * 3]))


def test_shifting_rewards_changes_nothing_and_equal_rewards_give_no_gradient() -> None:
    from cakelm.losses import aggregate, clipped_policy_loss, group_advantages

    rewards = torch.tensor([0.0, 1.0, 0.5, 0.25, 0.3, 0.3, 0.3, 0.3])
    for scale in ("group", "batch", "none"):
        a, za = group_advantages(rewards, 4, scale)
        b, zb = group_advantages(rewards + 7.0, 4, scale)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert za == zb == 1
        # the second group's rewards are all equal: its completions get no gradient, whatever the ratio
        logp = torch.randn(8, 5, requires_grad=True)
        per_token, _ = clipped_policy_loss(logp, logp.detach() + 0.1 * torch.randn(8, 5), a)
        aggregate(per_token, torch.ones(8, 5), "token_mean")[0].backward()
        assert torch.count_nonzero(logp.grad[4:]) == 0 and torch.count_nonzero(logp.grad[:4]) > 0


def test_bradley_terry_hand_computed() -> None:
    from cakelm.losses import bradley_terry

    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    torch.testing.assert_close(bradley_terry(rc, rr), torch.tensor([math.log(1 + math.exp(-1)), math.log(2.0)]))
    torch.testing.assert_close(bradley_terry(rc, rr, margin=1.0), torch.tensor([math.log(2.0), math.log(1 + math.e)]))
    # centring adds 0.1 * (r_c + r_r)^2: 0.9 for the first pair, 0 for the second
    torch.testing.assert_close(bradley_terry(rc, rr, center=0.1) - bradley_terry(rc, rr), torch.tensor([0.9, 0.0]))


def test_dpo_loss_hand_computed_and_ln2_at_the_start() -> None:
    from cakelm.losses import dpo_loss

    same = torch.tensor([-3.0, -7.5])
    loss, rc, rr = dpo_loss(same, same - 1, same, same - 1, beta=0.1)
    torch.testing.assert_close(loss, torch.full((2,), math.log(2.0)))  # policy = reference: ln 2, rewards 0
    assert rc.abs().max() == 0 and rr.abs().max() == 0
    # chosen up 1 nat and rejected down 1 nat vs the reference: h = 2
    args = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]))
    loss, rc, rr = dpo_loss(*args, beta=0.5)
    torch.testing.assert_close(loss, torch.tensor([math.log(1 + math.exp(-1.0))]))  # -log sigmoid(0.5 * 2)
    torch.testing.assert_close((rc, rr), (torch.tensor([0.5]), torch.tensor([-0.5])))
    loss, _, _ = dpo_loss(*args, beta=0.5, loss_type="ipo")
    torch.testing.assert_close(loss, torch.tensor([1.0]))  # (h - 1/(2 beta))^2 = (2 - 1)^2
    with pytest.raises(ValueError):
        dpo_loss(*args, loss_type="hinge")


def test_replay_loss_hand_computed() -> None:
    """coef x summed NLL / tokens x units: 2 x 6 / 4 x 3 = 9; no tokens counts as one (no division by zero); and
    over two micro-batches the loop's division by all units gives coef x their units-weighted mean NLL."""
    from cakelm.losses import replay_loss
    assert replay_loss(torch.tensor(6.0), torch.tensor(4), 2.0, 3).item() == pytest.approx(9.0)
    assert replay_loss(torch.tensor(0.0), torch.tensor(0), 2.0, 3).item() == 0.0
    # micro-batches with per-token NLL 1.5 (6 / 4) and 0.5 (1 / 2), 3 and 1 units: (3 x 1.5 + 1 x 0.5) / 4 = 1.25
    both = replay_loss(torch.tensor(6.0), torch.tensor(4), 2.0, 3) + replay_loss(torch.tensor(1.0), torch.tensor(2),
                                                                                 2.0, 1)
    assert (both / 4).item() == pytest.approx(2.0 * 1.25)


def test_rpo_nll_hand_computed() -> None:
    from cakelm.losses import rpo_nll

    # -(-6) / 3 tokens = 2 nats per token; an empty reply counts as one token (no division by zero)
    torch.testing.assert_close(rpo_nll(torch.tensor([-6.0, -1.5, 0.0]), torch.tensor([3, 1, 0])),
                               torch.tensor([2.0, 1.5, 0.0]))


def test_gae_hand_computed_and_masked_values_change_nothing() -> None:
    from cakelm.losses import gae, kl_k1

    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[9.0, 0.5, 0.6, 0.7, 50.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0]])  # a prompt token, three reply tokens, padding
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # delta_3 = 1 - 0.7 = 0.3; delta_2 = 0.7 - 0.6 = 0.1, A_2 = 0.1 + 0.5 * 0.3; delta_1 = 0.1, A_1 = 0.1 + 0.5 * 0.25
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.225, 0.25, 0.3, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, 0.725, 0.85, 1.0, 0.0]]))
    other = values.clone()
    other[0, 0], other[0, 4] = -100.0, 1e6  # values where the mask is 0 never enter
    torch.testing.assert_close(gae(rewards, other, mask, 1.0, 0.5)[0], adv)
    # gamma < 1 discounts the next value: delta_2 = 0.9 * 0.7 - 0.6 = 0.03, A_2 = 0.03 + 0.9 * 1 * 0.3
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    assert adv[0, 2].item() == pytest.approx(0.3)
    torch.testing.assert_close(kl_k1(torch.tensor([-1.0]), torch.tensor([-1.5])), torch.tensor([0.5]))


def test_masked_whiten_and_clipped_value_loss() -> None:
    from cakelm.losses import clipped_value_loss, masked_whiten

    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 1000.0])
    mask = torch.tensor([1, 1, 1, 1, 0])  # the masked 1000 is not part of the statistics
    w = masked_whiten(x, mask)
    torch.testing.assert_close(w, torch.tensor([-1.5, -0.5, 0.5, 1.5, 0.0]) / math.sqrt(5 / 3))
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False)[:4], w[:4] + 2.5)
    # old value 1, return 2, clip 0.2: V = 1.5 is pulled back to 1.2, whose error (0.64) is the larger
    loss, clipped = clipped_value_loss(torch.tensor([1.5, 1.1]), torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(loss, torch.tensor([0.32, 0.405]))
    assert clipped.tolist() == [True, False]


def test_ppo_token_rewards_hand_computed() -> None:
    # row 0: reply at positions 1..3; row 1: reply at 0..1 (then padding)
    mask = torch.tensor([[0.0, 1, 1, 1], [1, 1, 0, 0]])
    logp = torch.tensor([[9.0, -1.0, -2.0, -0.5], [-1.0, -1.0, 7.0, 7.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, -0.5], [-2.0, -0.5, 0.0, 0.0]])
    r = losses.ppo_token_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    # -0.1 * (logp - ref) on the reply; the score added at the last reply token; 0 off the mask
    expected = torch.tensor([[0.0, -0.05, 0.1, 0.0 + 2.0], [-0.1, 0.05 - 1.0, 0.0, 0.0]])
    torch.testing.assert_close(r, expected)
    # a row with no reply tokens gets nothing, not the score
    empty = losses.ppo_token_rewards(torch.tensor([5.0]), torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3), 0.1)
    assert empty.abs().sum() == 0


def test_adaptive_kl_coef_hand_computed() -> None:
    # KL 12 against a target of 6: error clipped to +0.2; 256 replies over a horizon of 10,000
    assert losses.adaptive_kl_coef(0.1, 12.0, 6.0, 256, 10_000) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    # KL 5.4 against 6: error -0.1
    assert losses.adaptive_kl_coef(0.1, 5.4, 6.0, 1000, 10_000) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    assert losses.adaptive_kl_coef(0.1, 6.0, 6.0, 1000, 10_000) == pytest.approx(0.1)


def test_masked_whiten_with_the_moments_of_a_larger_batch() -> None:
    # two "ranks" whitened by the moments of both equal the whole batch whitened at once
    x, mask = torch.tensor([[1.0, 2.0, 7.0], [3.0, 4.0, 9.0]]), torch.tensor([[1, 1, 0], [1, 1, 0]])
    moments = losses.masked_moments(x[:1], mask[:1]) + losses.masked_moments(x[1:], mask[1:])
    assert moments.tolist() == [4.0, 10.0, 30.0]  # n, sum, sum of squares of 1, 2, 3, 4
    whole = losses.masked_whiten(x, mask)
    parts = torch.cat([losses.masked_whiten(x[i:i + 1], mask[i:i + 1], moments=moments) for i in (0, 1)])
    torch.testing.assert_close(parts, whole)
    torch.testing.assert_close(whole[0], torch.tensor([-1.5, -0.5, 0.0]) / math.sqrt(5 / 3))


def test_leave_one_out_advantages_hand_computed() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv, zero = losses.leave_one_out_advantages(rewards, 4)
    # group 1: each baseline is the mean of the other three: 1 - 1/3, 0 - 2/3, 0 - 2/3, 1 - 1/3
    torch.testing.assert_close(adv[:4], torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    assert zero == 1 and torch.equal(adv[4:], torch.zeros(4))  # equal rewards: no signal
    # the identity RLOO = G / (G - 1) x the group-centred reward (Dr. GRPO's advantage)
    centred, _ = losses.group_advantages(rewards, 4, "none")
    torch.testing.assert_close(adv, centred * 4 / 3)
    adv2, _ = losses.leave_one_out_advantages(torch.tensor([3.0, 1.0]), 2)  # G = 2: r_i - r_other
    assert adv2.tolist() == [2.0, -2.0]
    with pytest.raises(ValueError):
        losses.leave_one_out_advantages(rewards, 3)


def test_kl_penalized_rewards_hand_computed() -> None:
    mask = torch.tensor([[0.0, 1, 1], [1, 1, 0]])
    logp = torch.tensor([[5.0, -1.0, -2.0], [-1.0, -0.5, 9.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0], [-2.0, -0.5, 0.0]])
    # KL per reply: (0.5 - 1.0) = -0.5 and (1.0 + 0.0) = 1.0 (positions off the mask do not count)
    out = losses.kl_penalized_rewards(torch.tensor([1.0, 2.0], dtype=torch.float64), logp, ref, mask, 0.1)
    torch.testing.assert_close(out, torch.tensor([1.05, 1.9], dtype=torch.float64))


def test_unlikelihood_by_hand() -> None:
    """Welleck et al. 2019, token level: each scored position pays -log(1 - p(c)) for every token c already scored
    earlier in its segment, except its own target. Uniform p over 3 tokens: each candidate costs log(3/2)."""
    c = math.log(1.5)
    logits = torch.zeros(1, 4, 3)
    # t=1: {0} ; t=2: {0,1} minus target 0 ; t=3: {0,1}
    assert math.isclose(unlikelihood_loss(logits, torch.tensor([[0, 1, 0, 2]])).item(), 4 * c, rel_tol=1e-5)
    # a new segment at t=2 forgets what came before it: t=1 {0}, t=3 {0}
    seg = torch.tensor([[0, 0, 1, 1]])
    assert math.isclose(unlikelihood_loss(logits, torch.tensor([[0, 1, 0, 2]]), seg).item(), 2 * c, rel_tol=1e-5)
    # unscored positions neither pay nor count as said: t=2 has only its own target before it, t=3 pays for 0
    assert math.isclose(unlikelihood_loss(logits, torch.tensor([[0, -100, 0, 2]])).item(), c, rel_tol=1e-5)
    # a confident repeat costs more: p(0) = 0.8 at t=3 -> -log(0.2) for token 0, -log(0.9) for token 1
    logits[0, 3] = torch.tensor([0.8, 0.1, 0.1]).log()
    want = 2 * c - math.log(0.2) - math.log(0.9)
    assert math.isclose(unlikelihood_loss(logits, torch.tensor([[0, 1, 0, 2]])).item(), want, rel_tol=1e-5)


def test_unlikelihood_matches_its_definition_on_random_rows() -> None:
    """The (B, T, T) pair form equals eq. 4 written out with Python sets, on rows with segments and unscored
    positions, and its gradient is finite."""
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 12, 5
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[torch.rand(B, T, generator=g) < 0.25] = -100
    segments = torch.randint(0, 2, (B, T), generator=g).cummax(1).values + torch.arange(B).unsqueeze(1) * 10
    p = logits.detach().softmax(-1)
    want = 0.0
    for b in range(B):
        for t in range(T):
            if targets[b, t] < 0:
                continue
            cands = {int(targets[b, s]) for s in range(t) if targets[b, s] >= 0 and segments[b, s] == segments[b, t]}
            want += sum(-math.log(1 - p[b, t, c].item()) for c in cands - {int(targets[b, t])})
    got = unlikelihood_loss(logits, targets, segments)
    assert want > 1.0 and math.isclose(got.item(), want, rel_tol=1e-6)  # the loss is computed in fp32
    got.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_repeated_ngram_tokens_by_hand() -> None:
    """Welleck et al. 2019, sequence level: every token of an n-gram seen earlier in the sequence is a candidate."""
    assert losses.repeated_ngram_tokens([5, 6, 7, 8, 5, 6, 7, 8]) == [False] * 4 + [True] * 4
    assert losses.repeated_ngram_tokens([5, 6, 7, 8, 9, 5, 6, 7, 1]) == [False] * 9  # only 3 tokens repeat
    # overlapping: a token said six times holds the 4-gram (1, 1, 1, 1) at 0, 1 and 2
    assert losses.repeated_ngram_tokens([2, 1, 1, 1, 1, 1, 1]) == [False, False, True, True, True, True, True]
    assert losses.repeated_ngram_tokens([3, 4, 3, 4, 3], n=2) == [False, False, True, True, True]
    assert losses.repeated_ngram_tokens([1, 2, 3]) == [False] * 3 and losses.repeated_ngram_tokens([]) == []


def test_target_unlikelihood_by_hand() -> None:
    """-sum log(1 - p(y_t)) over the scored positions only; a confident repeat costs more; p near 1 stays finite."""
    logits = torch.zeros(1, 3, 4, requires_grad=True)  # uniform: p = 1/4 -> -log(3/4) per scored position
    got = losses.target_unlikelihood(logits, torch.tensor([[2, IGNORE_INDEX, 0]]))
    assert math.isclose(got.item(), 2 * -math.log(0.75), rel_tol=1e-6)
    got.backward()  # pushing p(y) down: the target's logit gets a positive gradient (descent lowers it)
    assert logits.grad[0, 0, 2] > 0 and logits.grad[0, 1].abs().sum() == 0
    sharp = torch.tensor([[[0.9, 0.05, 0.05]]]).log()
    assert math.isclose(losses.target_unlikelihood(sharp, torch.tensor([[0]])).item(), -math.log(0.1), rel_tol=1e-5)
    certain = torch.tensor([[[100.0, 0.0, 0.0]]])
    assert math.isclose(losses.target_unlikelihood(certain, torch.tensor([[0]])).item(), -math.log(1e-6), rel_tol=1e-3)
    assert losses.target_unlikelihood(logits, torch.full((1, 3), IGNORE_INDEX)).item() == 0.0
