"""Optimizers and learning-rate schedules shared by every training stage.

- AdamW with two parameter groups: weight decay on matrices (linear weights, embeddings), none on the 1-D RMSNorm
  gains. Fused kernels when the device supports them.
- Muon (orthogonalised momentum) for the 2-D weights inside the blocks, AdamW for the rest (embedding, output
  head, norms), as in modded-nanogpt and nanochat. The update is `torch.optim.Muon`'s, rescaled to AdamW's RMS
  (`adjust_lr_fn="match_rms_adamw"`), so one `--lr` serves both; see `Muon` for why we carry our own copy.
- Schedules: linear warmup then cosine decay, or warmup-stable-decay (WSD), or constant; as a multiplier of the
  base learning rate that the loop applies at every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from cakelm.config import ConfigError, opt


@dataclass
class OptimConfig:
    name: str = opt("adamw", "optimizer: adamw, or muon (Muon for block matrices, AdamW for the rest)",
                    choices=("adamw", "muon"))
    lr: float = opt(3e-3, "peak learning rate", alias="--lr")
    schedule: str = opt("cosine", "learning-rate schedule after warmup", choices=("cosine", "wsd", "constant"))
    warmup_steps: int = opt(20, "linear warmup steps")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of the peak (cosine and wsd)")
    decay_frac: float = opt(0.3, "wsd: fraction of the run spent in the final linear decay")
    weight_decay: float = opt(0.1, "decoupled weight decay on matrices")
    beta1: float = opt(0.9, "Adam beta1")
    beta2: float = opt(0.95, "Adam beta2")
    eps: float = opt(1e-8, "Adam epsilon")
    momentum: float = opt(0.95, "Muon momentum")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this value (0 = off)")

    def __post_init__(self) -> None:
        for name in ("lr", "min_lr_ratio", "decay_frac", "weight_decay", "beta1", "beta2", "eps", "momentum",
                     "grad_clip"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"optim.{name} must be a finite number, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("min_lr_ratio", "decay_frac", "beta1", "beta2", "momentum"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"optim.{name} must be in [0, 1], got {v}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("optim.weight_decay and optim.grad_clip must be >= 0")


def lr_multiplier(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based) of `max_steps`.

    warmup: (step+1)/warmup_steps for the first warmup_steps steps (never 0, so step 0 already learns);
    cosine: min + (1-min) * (1 + cos(pi * p)) / 2 with p the progress after warmup (Loshchilov & Hutter 2017,
            "SGDR"; nanoGPT's get_lr);
    wsd:    1 until the last decay_frac of the run, then linear to min (Hu et al. 2024, "MiniCPM", WSD);
    constant: 1."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    lo = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        p = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * p))
    decay_start = max(cfg.warmup_steps, max_steps - round(cfg.decay_frac * max_steps))
    if step < decay_start:
        return 1.0
    p = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    return 1.0 - (1.0 - lo) * p


def zeropower_newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately orthogonalise a matrix (push its singular values towards 1) with the quintic Newton-Schulz
    iteration X <- aX + (bA + cA^2)X, A = XX^T, a,b,c = (3.4445, -4.7750, 2.0315) (Jordan et al. 2024, "Muon";
    the same iteration as torch.optim.Muon). Runs on the wider orientation so A is the smaller Gram matrix.

    g: (rows, cols), or (N, rows, cols) for N matrices of one shape at once (each normalised and iterated on its
    own: the same numbers as N separate calls, in 3 batched matmuls per iteration instead of 3N)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    # addmm(M, P, Q, beta, alpha) = beta*M + alpha*PQ in one BLAS call; baddbmm is its batched form
    addmm = torch.baddbmm if x.ndim == 3 else torch.addmm
    for _ in range(steps):
        A = x @ x.mT  # (r, r) or (N, r, r), r = min(rows, cols)
        x = addmm(x, addmm(A, A, A, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights: Nesterov momentum, then the update orthogonalised by Newton-Schulz, decoupled weight
    decay, and the step scaled by 0.2 * sqrt(max(rows, cols)) to match AdamW's update RMS (Liu et al. 2025,
    "Muon is Scalable for LLM Training"). Step for step the update of torch.optim.Muon(adjust_lr_fn=
    "match_rms_adamw"), except that the iteration runs in `ns_dtype`: torch.optim.Muon always uses bf16, which
    is right on GPUs and ~25x slower than fp32 on CPUs without bf16 matrix units (it tripled our CPU step time)."""

    def __init__(self, params: list[torch.Tensor], lr: float, weight_decay: float = 0.0, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, ns_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps, ns_dtype=ns_dtype))

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            lr, mom = group["lr"], group["momentum"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
            torch._foreach_lerp_(bufs, grads, 1 - mom)
            updates = torch._foreach_lerp(grads, bufs, mom) if group["nesterov"] else bufs
            for p, update in zip(params, self._orthogonalise(updates, group["ns_steps"], group["ns_dtype"])):
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * 0.2 * math.sqrt(max(p.shape)))

    @staticmethod
    def _orthogonalise(updates: list[torch.Tensor], steps: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """Newton-Schulz of every update. Plain matrices of one shape (q, k, v and o of every layer; gate and up;
        down) go through one batched iteration: 3 matmuls per iteration and shape instead of 3 per matrix (84 for
        the tiny model's 28 matrices), which on a CPU made the whole training step ~2% faster (README,
        Benchmarks). The numbers are those of one call per matrix, bit for bit (so each is stacked as it is: a tall
        matrix turned into a wide copy would round differently). FSDP's sharded matrices (DTensors) go one by one."""
        out: list[torch.Tensor | None] = [None] * len(updates)
        same_shape: dict[tuple, list[int]] = {}
        for i, u in enumerate(updates):
            if isinstance(u, DTensor):
                out[i] = zeropower_newton_schulz(u, steps, dtype=dtype)
            else:
                same_shape.setdefault((tuple(u.shape), u.device, u.dtype), []).append(i)
        for idx in same_shape.values():
            ortho = zeropower_newton_schulz(torch.stack([updates[i] for i in idx]), steps, dtype=dtype)  # (N, r, c)
            for i, x in zip(idx, ortho.unbind()):
                out[i] = x
        return out


def _adamw(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, TypeError):  # older torch without fused kernels for this device
            pass
    return torch.optim.AdamW(groups, **kw)


def build_optimizers(model: nn.Module, cfg: OptimConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """The optimizers for `model` (one, or two with Muon). Every group remembers its "base_lr"."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # Tied weights appear once in named_parameters(), so nothing is optimised twice.
    if cfg.name == "muon":
        is_hidden_matrix = [p.ndim == 2 and not n.startswith(("embed.", "lm_head.")) for n, p in named]
        muon_params = [p for (n, p), m in zip(named, is_hidden_matrix) if m]
        rest = [(n, p) for (n, p), m in zip(named, is_hidden_matrix) if not m]
        muon = Muon(muon_params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                    ns_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        optimizers: list[torch.optim.Optimizer] = [muon]
        named = rest
    else:
        optimizers = []
    decay = [p for n, p in named if p.ndim >= 2]
    no_decay = [p for n, p in named if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    optimizers.insert(0, _adamw(groups, cfg, device))
    for o in optimizers:
        for g in o.param_groups:
            g["base_lr"] = cfg.lr
    return optimizers


def set_lr(optimizers: list[torch.optim.Optimizer], multiplier: float) -> float:
    """Apply a schedule multiplier to every group; returns the (first group's) learning rate."""
    for o in optimizers:
        for g in o.param_groups:
            g["lr"] = g["base_lr"] * multiplier
    return optimizers[0].param_groups[0]["lr"]
