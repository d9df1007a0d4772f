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
