"""Loss functions and training-signal formulas, as small pure functions.

Every function takes tensors and returns tensors (or floats); none touches a model, an optimizer or a file, so
each is unit-tested against hand-computed values in tests/test_losses.py. Losses return a *sum* over their units
together with the unit count, so the shared loop can normalise by the number of units in the whole
accumulation window across all ranks (accumulating or sharding then does not change the gradient).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F

from cakelm import kernels

IGNORE_INDEX = -100


def token_nll(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """-log p(target) at every position, (B, T); 0 where targets == ignore_index.

    logits (B, T, V), targets (B, T). Computed in fp32 whatever the autocast dtype (a bf16 log-softmax over a
    large vocabulary loses precision)."""
    flat, tgt = logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1)
    nll = kernels.cross_entropy(flat, tgt, ignore_index)  # fp32 on a CPU: one fused pass each way (kernels.c)
    if nll is None:
        nll = F.cross_entropy(flat, tgt, ignore_index=ignore_index, reduction="none")
    return nll.view(targets.shape)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy, summed: (sum of -log p(target) over scored positions, number scored)."""
    return token_nll(logits, targets, ignore_index).sum(), (targets != ignore_index).sum()


def unlikelihood_loss(logits: torch.Tensor, targets: torch.Tensor, segments: torch.Tensor | None = None,
                      ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Token-level unlikelihood, summed over scored positions (Welleck et al. 2019, "Neural Text Generation with
    Unlikelihood Training", eq. 4): at each scored position t, -sum over c in C_t of log(1 - p(c)), where the
    negative candidates C_t are the tokens already scored before t in the same segment (here: the reply's own
    earlier tokens), minus the target y_t. It pushes down repeating what was said unless the data repeats it.

    logits (B, T, V), targets (B, T) with ignore_index off the scored tokens, segments (B, T) or None (one
    segment per row; packed rows keep conversations apart). Pairs of positions, not the vocabulary, carry the
    sets: memory (B, T, T), so a 150k-token vocabulary costs no more than a small one."""
    B, T, _ = logits.shape
    valid = targets != ignore_index
    tgt = targets.clamp(min=0)
    seg = segments if segments is not None else torch.zeros_like(tgt)
    # pair[b, t, s]: s < t, both scored, in the same segment; same[b, t, s]: the same target token
    pair = (seg.unsqueeze(2) == seg.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)
    pair &= torch.ones(T, T, dtype=torch.bool, device=targets.device).tril(-1)
    same = tgt.unsqueeze(2) == tgt.unsqueeze(1)
    first = ~(pair & same).any(2)  # (B, T): position s is its token's first scored occurrence in the segment
    negative = pair & ~same & first.unsqueeze(1)  # each candidate token counted once per position t
    lse = torch.logsumexp(logits.float(), -1, keepdim=True)  # (B, T, 1)
    p = (logits.gather(2, tgt.unsqueeze(1).expand(B, T, T)).float() - lse).exp()  # p[b, t, s] = p_t(y_s)
    return -(torch.log1p(-p.clamp(max=1 - 1e-6)) * negative).sum()


def repeated_ngram_tokens(ids: Sequence[Hashable], n: int = 4) -> list[bool]:
    """Which items of a sequence (token ids, or words) belong to an n-gram that occurred earlier in it: the negative
    candidates of sequence-level unlikelihood (Welleck et al. 2019, Sec. 5.2: C_t = {x_t} when x_t is part of a
    repeated n-gram), and what `rewards.has_repeated_ngram` asks of words. [5, 6, 7, 8, 5, 6, 7, 8] with n = 4
    marks the second 5, 6, 7, 8."""
    marks, seen = [False] * len(ids), set()
    for i in range(len(ids) - n + 1):
        gram = tuple(ids[i:i + n])
        if gram in seen:
            marks[i:i + n] = [True] * n
        seen.add(gram)
    return marks


def target_unlikelihood(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
                        ) -> torch.Tensor:
    """Sequence-level unlikelihood, summed: -sum over scored positions t of log(1 - p_t(y_t)) (Welleck et al.
    2019, eq. 7), where y_t is a token the model itself generated and should not have (`repeated_ngram_tokens`).
    logits (B, T, V), targets (B, T) with ignore_index elsewhere; p is clamped at 1 - 1e-6 as in
    `unlikelihood_loss`."""
    valid = targets != ignore_index
    logp = torch.log_softmax(logits[valid].float(), -1).gather(-1, targets[valid].unsqueeze(-1)).squeeze(-1)  # (M,)
    return -torch.log(-torch.expm1(logp.clamp(max=math.log1p(-1e-6)))).sum()


def bits_per_byte(nats: float, n_bytes: int) -> float:
    """Cross-entropy in bits per UTF-8 byte of text: total nats / (ln 2 * total bytes). Independent of the
    tokenizer, so models with different vocabularies compare fairly (nanochat's val bpb; Gao et al. 2020,
    "The Pile", bits per byte)."""
    if n_bytes <= 0:
        return float("nan")
    return nats / (math.log(2) * n_bytes)


# ----------------------------------------------------------------------------------------------------------------
# RL from verifiable rewards (GRPO and its variants). Shapes: N completions (G per prompt, consecutive), T tokens.

ADVANTAGE_SCALES = ("group", "batch", "none")
AGGREGATIONS = ("token_mean", "sequence_mean", "constant")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
                     ) -> tuple[torch.Tensor, int]:
    """Group-relative advantages of N = P * G rewards (each prompt's G completions consecutive), and the number
    of groups whose rewards are all equal (they carry no signal: every advantage is 0).

    A_i = (r_i - mean_group) / (std + eps), std the Bessel-corrected standard deviation of the group (scale
    "group": DeepSeekMath's GRPO, Shao et al. 2024, arXiv 2402.03300) or of the whole batch ("batch": the
    "Lite PPO" of Liu et al. 2025, "Tricks or Traps? A Deep Dive into RL for LLM Reasoning"). "none" keeps
    r_i - mean_group (Dr. GRPO, Liu et al. 2025, arXiv 2503.20783, which shows that dividing by the group's std
    over-weights too easy and too hard prompts).
    eps = 1e-4 as in TRL."""
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if group_size < 2 or rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"need a 1-d tensor of groups of {group_size} >= 2 rewards, got shape {tuple(rewards.shape)}")
    groups = rewards.float().view(-1, group_size)  # (P, G)
    flat = groups.amax(dim=1, keepdim=True) == groups.amin(dim=1, keepdim=True)  # (P, 1): all rewards equal
    # (tested by equality, not std == 0: the mean of seven 0.7s is not exactly 0.7 in floating point)
    centred = (groups - groups.mean(dim=1, keepdim=True)).masked_fill(flat, 0.0)
    zero_signal = int(flat.sum())
    if scale == "group":
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (rewards.float().std() + eps)
    return centred.reshape(-1), zero_signal


def dynamic_sampling_rows(rewards: torch.Tensor, group_size: int, keep: int) -> torch.Tensor:
    """The row indices of the `keep` groups to train on out of N = P * G rewards (each prompt's G completions
    consecutive, keep <= P): the first `keep` groups whose rewards differ, in order; when fewer than `keep` differ,
    the first groups whose rewards are all equal fill the rest (they carry no signal, but keep the batch's size).

    DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476, section 3.2: "over-sample and filter out prompts
    with the accuracy equal to 1 and 0"), as one over-sampled draw instead of repeated draws until the batch is
    full, so every phase costs the same and the run stays reproducible."""
    if group_size < 2 or rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"need a 1-d tensor of groups of {group_size} >= 2 rewards, got shape {tuple(rewards.shape)}")
    groups = rewards.view(-1, group_size)  # (P, G)
    if not 0 < keep <= groups.size(0):
        raise ValueError(f"keep must be in [1, {groups.size(0)}], got {keep}")
    differ = groups.amax(dim=1) != groups.amin(dim=1)  # (P,)
    order = torch.cat([differ.nonzero().flatten(), (~differ).nonzero().flatten()])[:keep].sort().values
    return (order[:, None] * group_size + torch.arange(group_size)).flatten()  # (keep * G,)


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """RLOO's advantages of N = P * G rewards (each prompt's G completions consecutive), and the number of groups
    whose rewards are all equal (no signal). Each completion's baseline is the mean reward of the other G - 1:

        A_i = r_i - (sum_j r_j - r_i) / (G - 1)  =  G / (G - 1) * (r_i - mean_group)

    (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback in LLMs", arXiv 2402.14740; Kool et al. 2019; TRL's RLOOTrainer). Unbiased: the baseline of a
    completion does not depend on it."""
    if group_size < 2 or rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"need a 1-d tensor of groups of {group_size} >= 2 rewards, got shape {tuple(rewards.shape)}")
    groups = rewards.view(-1, group_size)  # (P, G)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    flat = groups.amax(dim=1) == groups.amin(dim=1)
    return (groups - baseline).reshape(-1), int(flat.sum())


def kl_penalized_rewards(rewards: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float) -> torch.Tensor:
    """(N,) sequence rewards minus kl_coef x each completion's KL to the reference, estimated as the sum over its
    tokens of log pi_old - log pi_ref (k1 at the sequence level: RLOO's reward shaping, Ahmadian et al. 2024;
    TRL's RLOOTrainer subtracts beta x this from the reward, with no gradient through it). logp, ref_logp and mask
    are (N, T)."""
    kl = ((logp - ref_logp) * mask).sum(dim=1)
    return rewards - kl_coef * kl.to(rewards.dtype)


def first_error_advantages(advantages: torch.Tensor, first_error: torch.Tensor, width: int) -> torch.Tensor:
    """Per-token advantages (N, width) from one per completion (N,), sparing the right start of a wrong reply.

    A row with A_i < 0 whose reply first went wrong at column first_error[i] (the first token of its first false
    step) gets 0 before that column and A_i from it on; every other row (A_i >= 0, or first_error[i] = 0: no step
    known to be wrong) gets A_i everywhere. A worked solution is wrong from its first wrong step (PRM800K's labels,
    Lightman et al. 2023, "Let's Verify Step by Step"): pushing down the steps before it, which were right, is
    what sequence-level credit does to every wrong reply."""
    cols = torch.arange(width, device=advantages.device)  # (width,)
    spared = (advantages[:, None] < 0) & (cols[None, :] < first_error[:, None])  # (N, width)
    return advantages[:, None].expand(-1, width).masked_fill(spared, 0.0)


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        eps_low: float = 0.2, eps_high: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate loss and where the clip was active, both (N, T).

    loss_t = -min(rho_t * A, clip(rho_t, 1 - eps_low, 1 + eps_high) * A) with rho_t = exp(logp_t - old_logp_t)
    (PPO, Schulman et al. 2017, arXiv 1707.06347; separate low/high bounds: DAPO's "clip-higher", Yu et al.
    2025, arXiv 2503.14476). advantages is (N,) (one per completion) or (N, T). The log-ratio is clamped to
    +-20 before exp so a masked or stale position cannot overflow (verl and OpenRLHF do the same)."""
    adv = advantages[:, None] if advantages.ndim == 1 else advantages
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    return -torch.minimum(unclipped, clipped), (clipped < unclipped)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy: k3 = exp(d) - d - 1 with
    d = ref_logp - logp; unbiased and always >= 0 (Schulman 2020, "Approximating KL Divergence"; the GRPO
    loss's KL term). d is clamped to +-20 so exp cannot overflow."""
    d = (ref_logp - logp).clamp(-20.0, 20.0)
    return torch.exp(d) - d - 1.0


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, max_new_tokens: int = 0
              ) -> tuple[torch.Tensor, float]:
    """Sum a (N, T) per-token loss over the completions of this micro-batch, with the units the shared loop
    divides the whole step's sum by (so every mode is exact under accumulation and DDP):
    - token_mean: sum over tokens / all completion tokens of the step (DAPO's token-level mean);
    - sequence_mean: sum over completions of each one's token mean / completions of the step (GRPO's original
      per-sequence mean, which weighs a long completion's tokens less);
    - constant: sum over tokens / (completions of the step x max_new_tokens) (Dr. GRPO: no length bias)."""
    mask = mask.to(per_token.dtype)
    if mode == "token_mean":
        return (per_token * mask).sum(), float(mask.sum())
    if mode == "sequence_mean":
        per_seq = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return per_seq.sum(), float(per_token.size(0))
    if mode == "constant":
        if max_new_tokens < 1:
            raise ValueError("constant aggregation needs max_new_tokens >= 1")
        return (per_token * mask).sum(), float(per_token.size(0) * max_new_tokens)
    raise ValueError(f"mode must be one of {AGGREGATIONS}, got {mode!r}")


# ----------------------------------------------------------------------------------------------------------------
# RLHF: reward model, DPO, PPO. Shapes: P preference pairs; N rollouts of T tokens.

DPO_LOSSES = ("sigmoid", "ipo")


def bradley_terry(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float = 0.0,
                  center: float = 0.0) -> torch.Tensor:
    """Per-pair reward-model loss -log sigmoid(r_chosen - r_rejected - margin) (Bradley & Terry 1952; the
    InstructGPT reward model, Ouyang et al. 2022, arXiv 2203.02155; the margin of Llama 2, arXiv 2307.09288),
    plus center * (r_chosen + r_rejected)^2, which pins the scale-free rewards near 0 (TRL's
    center_rewards_coefficient, Eisenstein et al. 2023). All (P,)."""
    loss = -F.logsigmoid(r_chosen - r_rejected - margin)
    if center:
        loss = loss + center * (r_chosen + r_rejected) ** 2
    return loss


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid"
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss and the implicit rewards beta * (log pi - log pi_ref) of the chosen and rejected
    replies, all (P,), from sequence log-probs (summed over reply tokens) of the policy and the reference.

    h = (log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r));
    sigmoid: -log sigmoid(beta * h) (Rafailov et al. 2023, arXiv 2305.18290), ln 2 when policy = reference;
    ipo: (h - 1 / (2 beta))^2 (Azar et al. 2023, "A General Theoretical Paradigm...", arXiv 2310.12036; TRL feeds
    it per-token mean log-probs, the caller decides)."""
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"loss_type must be one of {DPO_LOSSES}, got {loss_type!r}")
    chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    h = chosen - rejected
    loss = -F.logsigmoid(beta * h) if loss_type == "sigmoid" else (h - 1.0 / (2.0 * beta)) ** 2
    return loss, beta * chosen.detach(), beta * rejected.detach()


def rpo_nll(policy_chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """(P,) per-token negative log-likelihood of each chosen reply, -log pi(y_c) / |y_c|, from its summed log-prob
    and its token count: the term RPO adds to the DPO loss with weight alpha (Pang et al. 2024, "Iterative
    Reasoning Preference Optimization", arXiv 2404.19733, which normalises by length per sequence; TRL's
    `rpo_alpha` averages over all the batch's chosen tokens instead). Plain DPO only widens the margin and often
    makes both replies less likely; this keeps the chosen one likely."""
    return -policy_chosen / chosen_tokens.clamp(min=1)


def replay_loss(nll_sum: torch.Tensor, n_tokens: torch.Tensor, coef: float, units: torch.Tensor | float
                ) -> torch.Tensor:
    """The pretraining-mix term of InstructGPT's PPO-ptx objective (Ouyang et al. 2022, arXiv 2203.02155, eq. 2:
    gamma x E[log pi(x)] over pretraining data), here with SFT's conversations replayed: coef x the per-token
    NLL of one micro-batch of them (`nll_sum` over its `n_tokens` target tokens), times the micro-batch's own
    loss units. The shared loop divides a step's summed loss by all its units, so this makes the step's term coef
    x the units-weighted mean of the micro-batches' (and ranks') per-token NLL: coef x the replayed NLL exactly
    with one micro-batch, as in a single process, whatever the split."""
    return coef * nll_sum / n_tokens.clamp(min=1) * units


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k1 estimate of KL(policy || reference), logp - ref_logp: unbiased, can be negative per sample;
    the per-token penalty PPO puts into the reward (Schulman 2020, "Approximating KL Divergence")."""
    return logp - ref_logp


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (N, T) per-token rewards and values, mask 1 on the reply's tokens
    (a contiguous run starting anywhere). Returns (advantages, returns = advantages + values), 0 off the mask.

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1} (Schulman et al. 2016, arXiv
    1506.02438), where "t+1" is the next reply token: values at masked positions never enter (V after the last
    reply token is 0), as in TRL's and OpenRLHF's PPO."""
    mask = mask.to(values.dtype)
    values = values * mask
    adv = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in range(values.size(1) - 1, -1, -1):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m
        # off the mask, carry the next reply token's value and advantage through unchanged
        next_value = torch.where(m > 0, values[:, t], next_value)
        next_adv = torch.where(m > 0, a, next_adv)
    return adv, (adv + values) * mask


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[n, sum, sum of squares] of x where mask is 1, float64: what `masked_whiten` needs, summable over ranks."""
    m = mask.double()
    xd = x.double() * m
    return torch.stack([m.sum(), xd.sum(), (xd * xd).sum()])


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  moments: torch.Tensor | None = None) -> torch.Tensor:
    """(x - mean) / std over the positions where mask is 1 (std with Bessel's correction, as TRL's
    masked_whiten); shift_mean=False keeps the mean (rescales only). 0 off the mask. `moments` (`masked_moments`
    summed over every rank's x) whitens by the statistics of the whole distributed batch instead of x's own."""
    n, s1, s2 = (moments if moments is not None else masked_moments(x, mask)).tolist()
    mask = mask.to(x.dtype)
    mean = s1 / n
    var = max(s2 - n * mean * mean, 0.0) / max(n - 1.0, 1.0)
    out = (x - mean) * (var + eps) ** -0.5
    if not shift_mean:
        out = out + mean
    return out * mask


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float = 0.2
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO value loss 0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2) and where the clipped
    term was the larger (PPO2's value clipping, OpenAI baselines; TRL's PPO)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    a, b = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * torch.maximum(a, b), b > a


def ppo_token_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float) -> torch.Tensor:
    """Per-token PPO rewards (N, T): -kl_coef * (logp - ref_logp) at every reply token (the k1 KL penalty) plus
    the sequence score (N,) at the reply's last token; 0 off the mask (Ziegler et al. 2019, arXiv 1909.08593;
    InstructGPT; TRL's and OpenRLHF's PPO)."""
    mask = mask.to(logp.dtype)
    rewards = -kl_coef * kl_k1(logp, ref_logp) * mask
    T = mask.size(1)
    last = T - 1 - mask.flip(1).argmax(1)  # (N,) the last reply position
    return rewards.scatter_add(1, last[:, None], score.to(rewards.dtype)[:, None] * mask.gather(1, last[:, None]))


def adaptive_kl_coef(coef: float, kl: float, target: float, n_steps: int, horizon: int) -> float:
    """The adaptive KL controller of Ziegler et al. 2019 (arXiv 1909.08593, section 2.2; TRL's AdaptiveKLController):
    e = clip(kl / target - 1, -0.2, 0.2); coef <- coef * (1 + e * n_steps / horizon). It raises the coefficient
    while the policy's KL exceeds the target and lowers it below."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)
