"""The decoder-only Transformer, written so that it is exactly a Hugging Face `LlamaForCausalLM` (and, with a few
config fields, `Qwen2ForCausalLM`, `Qwen3ForCausalLM` and Llama 3.x's RoPE scaling: see ModelConfig).

Architecture (the Llama recipe; `hf_compat.py` maps the weights one-to-one):
- token embedding -> n_layers x [x += attn(rmsnorm(x)); x += mlp(rmsnorm(x))] -> rmsnorm -> lm_head
- RMSNorm with a learned gain, no biases (Qwen2: on q, k and v; Qwen3: RMSNorm on each head's q and k)
- rotary position embeddings (RoPE) in the "rotate half" layout HF uses, applied to queries and keys
- grouped-query attention: n_kv_heads key/value heads shared by n_heads query heads, computed with
  `F.scaled_dot_product_attention`
- SwiGLU MLP: down(silu(gate(x)) * up(x))
- optionally tied input embedding and output head

Shapes in comments: B batch, T time (tokens), C model width, H query heads, KV key/value heads, D head dim.

    from cakelm.model import ModelConfig, Transformer, PRESETS
    model = Transformer(ModelConfig(vocab_size=2048, **PRESETS["tiny"]))
    logits = model(idx)                       # (B, T, vocab)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from cakelm import kernels
from cakelm.common import CakeError
from cakelm.config import ConfigError, opt


@dataclass
class ModelConfig:
    """Shape of the Transformer. The defaults are the CPU "tiny" preset; `vocab_size` comes from the tokenizer."""

    vocab_size: int = opt(2048, "vocabulary size (set from the tokenizer when training from scratch)")
    dim: int = opt(128, "model width C")
    n_layers: int = opt(4, "number of Transformer blocks (the depth dial)")
    n_heads: int = opt(4, "query heads; head dim = dim / n_heads")
    n_kv_heads: int = opt(0, "key/value heads for grouped-query attention (0 = n_heads, i.e. plain multi-head)")
    ffn_dim: int = opt(0, "SwiGLU hidden width (0 = 8/3 * dim rounded down to a multiple of 32: GPT-2's MLP FLOPs)")
    max_seq_len: int = opt(256, "context length in tokens (training sequence length)")
    rope_theta: float = opt(10000.0, "RoPE base frequency")
    norm_eps: float = opt(1e-5, "RMSNorm epsilon")
    tie_embeddings: bool = opt(False, "share the input embedding and the output head")
    init_std: float = opt(0.02, "std of the normal init of weight matrices (see init_weights)")
    # Family differences (hf_compat maps them to and from Hugging Face's configs): all off for our own models
    head_dim: int = opt(0, "width of each attention head (0 = dim / n_heads; Qwen3 sets it on its own)")
    qkv_bias: bool = opt(False, "biases on the query, key and value projections (Qwen2 / Qwen2.5)")
    qk_norm: bool = opt(False, "RMSNorm over each head's queries and keys before RoPE (Qwen3)")
    rope_scale: float = opt(1.0, "Llama 3.x RoPE scaling factor (1 = none; see rope_frequencies)")
    rope_low_freq: float = opt(1.0, "Llama 3.x RoPE scaling: low_freq_factor")
    rope_high_freq: float = opt(4.0, "Llama 3.x RoPE scaling: high_freq_factor")
    rope_original_context: int = opt(8192, "Llama 3.x RoPE scaling: original_max_position_embeddings")

    def __post_init__(self) -> None:
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        if self.ffn_dim == 0:
            # SwiGLU's three matrices at 8/3 x dim cost what GPT-2's two at 4 x dim do; rounded down, never past
            # that, to a multiple of 32 (GGUF's q8_0/q4_0 quantise rows in blocks of 32). Llama's rule rounds up
            # to a multiple of 64: at width 128 its 384 made 8% more block FLOPs than GPT-2's and our step 6%
            # slower than nanoGPT's (benchmarks/block_ablation.py). SmolLM2's 576 -> 1536 and 960 -> 2560 agree.
            self.ffn_dim = max(32, 32 * (8 * self.dim // 96))
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len",
                     "rope_original_context"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ConfigError(f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads "
                              f"({self.n_kv_heads})")
        if self.head_dim < 0 or self.head_dim % 2:
            raise ConfigError(f"the head dim ({self.head_dim}) must be positive and even for RoPE")
        if not (self.rope_scale >= 1 and self.rope_high_freq > self.rope_low_freq > 0):
            raise ConfigError(f"model.rope_scale must be >= 1 and rope_high_freq > rope_low_freq > 0 (got "
                              f"{self.rope_scale}, {self.rope_high_freq}, {self.rope_low_freq})")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# Named shapes; stage presets pick one and the dials (n_layers, dim, ...) override it.
PRESETS: dict[str, dict] = {
    # CPU default: 1.3M parameters with a 2k vocab; the best validation bits-per-byte we found for ~3.5 minutes
    # of training on 2 cores (wider models see too few tokens in that time).
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=4, max_seq_len=256),
    # ~10M non-embedding parameters, nanoGPT's shakespeare_char GPU shape with Llama blocks.
    "10m": dict(dim=384, n_layers=6, n_heads=6, n_kv_heads=6, max_seq_len=256),
    # GPT-2 small sized (~100M with a 32k vocab and GQA), for one GPU.
    "gpt2-small": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, max_seq_len=1024, tie_embeddings=True),
    # GPT-2 medium sized (~300M with a 32k vocab and GQA), for several GPUs under torchrun.
    "gpt2-medium": dict(dim=1024, n_layers=24, n_heads=16, n_kv_heads=4, max_seq_len=1024, tie_embeddings=True),
}


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward): 6 * matmul params + attention (PaLM appendix B, as in
    nanoGPT's estimate_mfu). Matmul params count the output head but not the input embedding lookup."""
    T = seq_len or cfg.max_seq_len
    hd = cfg.head_dim
    attn = cfg.dim * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)  # q, o: H*D each; k, v: KV*D each
    mlp = 3 * cfg.dim * cfg.ffn_dim
    n_matmul = cfg.n_layers * (attn + mlp) + cfg.dim * cfg.vocab_size
    # Attention scores QK^T and the weighted sum AV: 2 * 2*T*D FLOPs per head per token forward, x3 with the
    # backward pass. Like nanoGPT/PaLM, the causal mask's savings are not subtracted.
    return 6 * n_matmul + 12 * cfg.n_layers * cfg.n_heads * hd * T


# ----------------------------------------------------------------------------------------------------------------
# Rotary embeddings


def rope_frequencies(cfg: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """The D/2 rotation frequencies theta^(-2i/D). With Llama 3.x scaling (rope_scale > 1; Meta's
    `apply_scaling` in llama-models, HF's `_compute_llama3_parameters`): wavelengths longer than
    original_context / low_freq are slowed down by the factor, those shorter than original_context / high_freq
    kept, and those between interpolated smoothly."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
    if cfg.rope_scale == 1:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = cfg.rope_original_context / cfg.rope_low_freq
    high_wavelen = cfg.rope_original_context / cfg.rope_high_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / cfg.rope_scale, inv_freq)
    smooth = (cfg.rope_original_context / wavelen - cfg.rope_low_freq) / (cfg.rope_high_freq - cfg.rope_low_freq)
    between = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(between, (1 - smooth) * scaled / cfg.rope_scale + smooth * scaled, scaled)


def rope_cache(cfg: ModelConfig, length: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin of shape (length, D): with a = position * frequency i (rope_frequencies), cos = [cos a,
    cos a] as in HF Llama (which repeats the D/2 angles twice to size D), and sin = [-sin a, sin a], the sign
    rotate_half would apply, so that apply_rope is two products and a sum."""
    inv_freq = rope_frequencies(cfg, device)
    t = torch.arange(length, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)  # (length, D/2)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, D) by position: with x = [x1, x2] (halves of D), [x1*cos - x2*sin, x2*cos + x1*sin],
    which is HF's x*cos + rotate_half(x)*sin. Here x.roll(D/2) = [x2, x1] and the sign lives in the table
    (rope_cache), so it is 4 passes over x where halves, 4 products, a sum, a difference and a concatenation
    were 7: the same numbers bit for bit (-a*b is exact), about 20% less time for RoPE's forward and backward on
    a CPU (0.89 -> 0.70 ms a layer at nanoGPT's small shape), within the noise of a whole training step."""
    return x * cos + x.roll(x.size(-1) // 2, -1) * sin


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope on a projection's heads x (B, T, H, D), returned as (B, H, T, D) for attention: on a CPU in
    float32 one fused pass (cakelm/kernels.c, bit for bit apply_rope) whose result is a transposed view of
    (B, T, H, D) memory, else apply_rope."""
    if kernels.rope_applies(x, cos, sin):
        return kernels.rope(x, cos, sin)
    return apply_rope(x.transpose(1, 2), cos, sin)


# ----------------------------------------------------------------------------------------------------------------
# KV cache: the hook the inference engine uses. Training never passes one.


class KVCache:
    """Preallocated keys and values for every layer, (n_layers, B, KV, max_len, D) each.

    Rows share one write slot `pos`: a forward of T tokens writes slots [pos, pos+T) and advances `pos`. Prompts
    of different lengths are left-padded to a common length, and `pad[b]` says how many leading slots of row b
    are padding: row b's token in slot s sits at position s - pad[b] (for RoPE) and never attends to padding."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype = torch.float32, pad: list[int] | None = None) -> None:
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.max_pos = cfg.max_seq_len - 1
        self.pos = 0
        self.pad = torch.tensor(pad, device=device) if pad is not None and any(pad) else None  # (B,) or None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, KV, T, D) at [pos, pos+T); return all keys/values so far, (B, KV, pos+T, D)."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def repeat_rows(self, n: int) -> None:
        """Turn each row into n copies (row b -> rows b*n .. b*n+n-1): n samples continue one prefill."""
        self.k, self.v = self.k.repeat_interleave(n, dim=1), self.v.repeat_interleave(n, dim=1)
        if self.pad is not None:
            self.pad = self.pad.repeat_interleave(n)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these rows (indices (B',)), in this order: finished rows leave a batch."""
        self.k, self.v = self.k.index_select(1, rows), self.v.index_select(1, rows)
        if self.pad is not None:
            self.pad = self.pad[rows]

    def mask(self, T: int) -> tuple[torch.Tensor | None, bool]:
        """(attn_mask, is_causal) for T new tokens: None/True for a fresh unpadded prefill, None/False for one
        decoded token without padding, else a boolean mask (T, S) or (B, 1, T, S) with S = pos + T."""
        start = self.pos
        if self.pad is None:
            if start == 0 or T == 1:
                return None, start == 0 and T > 1
            # query i (slot start+i) sees slots 0..start+i; SDPA's is_causal would align the square top-left
            return torch.ones(T, start + T, dtype=torch.bool, device=self.k.device).tril(diagonal=start), False
        slots = torch.arange(start, start + T, device=self.k.device)[None, :, None]  # (1, T, 1)
        keys = torch.arange(start + T, device=self.k.device)[None, None, :]  # (1, 1, S)
        real = keys >= self.pad[:, None, None]  # (B, 1, S): not padding
        # A padding slot attends to itself only: its output is never used, but must stay finite.
        return ((real & (keys <= slots)) | (keys == slots))[:, None], False  # (B, 1, T, S)

    def positions(self, T: int) -> torch.Tensor:
        """RoPE positions of the T new tokens: (T,) without padding, (B, T) with. With padding, rows may be
        given different numbers of tokens: a row past the context (the engine ignores its output) is clamped to
        the last position instead of indexing past the RoPE table."""
        if self.pad is None and self.pos + T > self.max_pos + 1:
            raise ValueError(f"sequence of {self.pos + T} tokens is longer than the context ({self.max_pos + 1})")
        slots = torch.arange(self.pos, self.pos + T, device=self.k.device)
        return slots if self.pad is None else (slots[None, :] - self.pad[:, None]).clamp(0, self.max_pos)

    def advance(self, T: int) -> None:
        """After a forward of T tokens: the next one writes the slots after them."""
        self.pos += T


class SlotKVCache:
    """Keys and values for continuous batching (`cakelm.batching`): (n_layers, slots, KV, length, D) each, every
    slot (one sequence) at a position of its own. A sequence's tokens sit at [0, its length) of its slot, so the
    index is the RoPE position and no padding is needed. Before each forward the scheduler says which slots run
    from which positions (`view`): one slot's next T tokens (a prefill chunk), prompts from position 0 together,
    or one token for each of the slots [0, B) (a decode step). Entries past a slot's position are stale (an
    earlier sequence's) and masked out. `length` grows by doubling, up to the context, as longer sequences arrive
    (`reserve`)."""

    def __init__(self, cfg: ModelConfig, slots: int, device: torch.device | str, dtype: torch.dtype = torch.float32,
                 length: int = 256) -> None:
        self.cfg, self.slots, self.device, self.dtype = cfg, slots, torch.device(device), dtype
        self.length = min(length, cfg.max_seq_len)
        shape = (cfg.n_layers, slots, cfg.n_kv_heads, self.length, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def reserve(self, length: int) -> None:
        """Make room for `length` positions in every slot (at least doubling, so growth costs O(1) per token)."""
        if length <= self.length:
            return
        if length > self.cfg.max_seq_len:
            raise ValueError(f"{length} positions are more than the context ({self.cfg.max_seq_len})")
        new = min(max(length, 2 * self.length), self.cfg.max_seq_len)
        grow = (0, 0, 0, new - self.length)  # F.pad pads the last dims first: D by 0, then length
        self.k, self.v, self.length = F.pad(self.k, grow), F.pad(self.v, grow), new

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Slot dst continues from slot src's first `length` positions (n samples share one prefill)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def view(self, slots: list[int], starts: list[int]) -> SlotView:
        """The cache as the next forward sees it: row b of the batch is slot slots[b], writing from position
        starts[b] (see SlotView for the shapes a forward may take)."""
        return SlotView(self, slots, starts)


class SlotView:
    """One forward's window on a SlotKVCache, with KVCache's hooks (update, mask, positions, advance), in one of
    three shapes: one slot takes T tokens from its start (a prefill chunk); B slots take one token each from their
    own starts (a decode step over the slots [first, first + B)); or B slots take their first T tokens from
    position 0 (prompts prefilled together, right-padded to T: a padded position lies beyond its prompt, where
    the slot's next tokens overwrite it, and causal attention keeps it out of the prompt's own positions)."""

    def __init__(self, cache: SlotKVCache, slots: list[int], starts: list[int]) -> None:
        self.cache, self.slots, self.starts = cache, slots, starts
        self.start = torch.tensor(starts, device=cache.device)  # (B,)
        self.fresh = len(slots) > 1 and not any(starts)  # the third shape (if T > 1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, KV, T, D) at each slot's start; return the (B, KV, S, D) keys/values attention reads,
        S = max(start) + T."""
        B, _, T, _ = k.shape
        end = max(self.starts) + T
        if end > self.cache.length:
            raise ValueError(f"KV cache overflow: {end} positions > length {self.cache.length}")
        if self.fresh and T > 1:  # nothing before them: attention reads the new keys alone
            rows = torch.tensor(self.slots, device=k.device)
            self.cache.k[layer, rows, :, :T] = k
            self.cache.v[layer, rows, :, :T] = v
            return k, v
        first = self.slots[0]
        if self.slots != list(range(first, first + B)):
            raise ValueError("a decode step runs over consecutive slots")
        kc, vc = self.cache.k[layer, first:first + B], self.cache.v[layer, first:first + B]  # (B, KV, length, D)
        if B == 1:
            kc[:, :, self.starts[0]:end] = k
            vc[:, :, self.starts[0]:end] = v
        elif T == 1:  # slot b's one new entry at position start[b]
            rows = torch.arange(B, device=k.device)
            kc[rows, :, self.start] = k[:, :, 0]  # (B, KV, D)
            vc[rows, :, self.start] = v[:, :, 0]
        else:
            raise ValueError("several slots take several tokens only from position 0")
        return kc[:, :, :end], vc[:, :, :end]

    def mask(self, T: int) -> tuple[torch.Tensor | None, bool]:
        """One slot: as KVCache without padding (no mask from position 0 or for one token, else (T, S)). Slots
        from position 0: causal. Several slots' one token: a boolean (B, 1, 1, S) mask letting slot b see
        positions 0 .. start[b]."""
        if len(self.starts) == 1 or (self.fresh and T > 1):
            s = self.starts[0]
            if s == 0 or T == 1:
                return None, s == 0 and T > 1
            return torch.ones(T, s + T, dtype=torch.bool, device=self.start.device).tril(diagonal=s), False
        keys = torch.arange(max(self.starts) + T, device=self.start.device)[None, None, :]  # (1, 1, S)
        last = self.start[:, None, None] + torch.arange(T, device=self.start.device)[None, :, None]  # (B, T, 1)
        return (keys <= last)[:, None], False

    def positions(self, T: int) -> torch.Tensor:
        """(T,) for one slot or slots from position 0, (B, T) for several: each slot's positions from its start."""
        if max(self.starts) + T > self.cache.cfg.max_seq_len:
            raise ValueError(f"sequence of {max(self.starts) + T} tokens is longer than the context "
                             f"({self.cache.cfg.max_seq_len})")
        t = torch.arange(T, device=self.start.device)
        return t + self.starts[0] if len(self.starts) == 1 or self.fresh else self.start[:, None] + t[None, :]

    def advance(self, T: int) -> None:
        """The scheduler keeps each slot's length itself."""


def segment_mask(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed rows, segments (B, T) of sequence ids (each sequence contiguous): the attention mask
    (B, 1, T, T), True where query i may see key j (same sequence, j <= i), and the position of every token
    within its own sequence (B, T)."""
    B, T = segments.shape
    t = torch.arange(T, device=segments.device)
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    mask = same & (t[None, :, None] >= t[None, None, :])
    # a sequence starts where the id changes; position = t - (start of the sequence t belongs to)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values  # (B, T)
    return mask[:, None], t - first


# ----------------------------------------------------------------------------------------------------------------
# Modules


def _rms_inverse(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dimension, (..., 1)."""
    ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.size(-1))  # mean(x^2): (..., 1)
    return torch.rsqrt(ms.add_(eps))


class _RMSNormFunction(torch.autograd.Function):
    """y = x / sqrt(mean(x^2) + eps) * w with a hand-written backward (Zhang & Sennrich 2019, "Root Mean Square
    Layer Normalization"). Same numbers as F.rms_norm, but on CPU torch runs F.rms_norm as ~16 separate
    elementwise passes; this takes ~8, which is 2-3% of a small model's training step."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        r = _rms_inverse(x, eps)
        ctx.save_for_backward(x, w, r)
        return (x * r).mul_(w)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, w, r = ctx.saved_tensors
        xhat = x * r
        dw = (g * xhat).sum(dim=tuple(range(g.ndim - 1)))
        gw = g * w
        # d/dx of x*r: r * (gw - xhat * mean(gw * xhat)), the usual normalisation Jacobian without the mean term
        dot = (gw * xhat).mean(-1, keepdim=True)
        return gw.sub_(xhat.mul_(dot)).mul_(r), dw, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.applies(x, self.weight):  # one pass each way (cakelm/kernels.c); equal to the code below to rounding
            return kernels.rms_norm(x, self.weight, self.eps)
        if x.device.type == "cpu" and x.dtype == torch.float32:
            if not torch.is_grad_enabled():  # generation, evaluation: the same ops without the Function's overhead
                return (x * _rms_inverse(x, self.eps)).mul_(self.weight)
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)  # fused kernels on GPUs; autocast-aware


def packs(x: torch.Tensor, *layers: nn.Module) -> bool:
    """Whether these linear layers of input x run as one product, the fused kernels reading its columns in place:
    in float32 training on a CPU (gradients on, no autocast) of plain nn.Linear layers (not LoRA-wrapped) with the
    kernels loaded. Not when decoding or evaluating: concatenating the weights would cost more than it saves."""
    return (torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)
            and all(type(m) is nn.Linear for m in layers) and kernels.applies(x, *(m.weight for m in layers)))


class _PackedLinear(torch.autograd.Function):
    """x @ cat(weights).T + bias (B, T, sum of the weights' rows), keeping the layers' own weights for the
    backward, not their concatenation (which F.linear over torch.cat(weights) keeps alive from the forward to the
    backward: a copy of every packed weight, 266 MB for a SmolLM2-135M step of 128 tokens). The backward
    concatenates them again, for the input's gradient only, and hands each weight its rows of the one weight
    gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, *weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, *weights)
        ctx.has_bias = bias is not None
        return F.linear(x, torch.cat(weights), bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *weights = ctx.saved_tensors
        g2, x2 = g.reshape(-1, g.size(-1)), x.reshape(-1, x.size(-1))  # (N, rows), (N, C)
        dx = (g2 @ torch.cat(weights)).view(x.shape) if ctx.needs_input_grad[0] else None
        dw = (g2.t() @ x2).split([w.size(0) for w in weights]) if any(ctx.needs_input_grad[2:]) else \
            (None,) * len(weights)
        db = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return dx, db, *dw


def packed_linear(x: torch.Tensor, layers: tuple[nn.Linear, ...]) -> torch.Tensor:
    """The outputs of these linear layers of x side by side, (..., sum of their out_features), as one product
    (call when packs(x, *layers))."""
    bias = torch.cat([m.bias for m in layers]) if layers[0].bias is not None else None
    weights = [m.weight for m in layers]
    if sum(w.size(0) for w in weights) <= x.numel() // x.size(-1):
        # The concatenation autograd keeps for the backward is no larger than x, which it keeps too: F.linear,
        # whose backward runs in C++ (_PackedLinear's Python costs 1-2% of a step at nanoGPT's small shape).
        return F.linear(x, torch.cat(weights), bias)
    return _PackedLinear.apply(x, bias, *weights)  # more weight rows than tokens: the copy would cost memory


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # Qwen3: each head's queries and keys are RMS-normalised (one gain vector of size D) before RoPE
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: KVCache | SlotView | None = None, mask: torch.Tensor | None = None,
                causal: bool = True) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        if (kv_cache is None and self.q_norm is None and packs(x, self.q, self.k, self.v)
                and kernels.rope_tables_apply(B, T, D, cos, sin)):
            # Training on a CPU in float32: q, k and v as one product (B, T, (H + 2 KV) * D), as nanoGPT's c_attn,
            # whose q and k columns the fused RoPE reads in place (README, Benchmarks).
            qkv = packed_linear(x, (self.q, self.k, self.v))
            q, k, v = kernels.qkv_rope(qkv, cos, sin, H, KV)  # (B, H, T, D), (B, KV, T, D), (B, KV, T, D)
        else:
            q, k = self.q(x).view(B, T, H, D), self.k(x).view(B, T, KV, D)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # (B, H, T, D), (B, KV, T, D)
            v = self.v(x).view(B, T, KV, D).transpose(1, 2)  # (B, KV, T, D)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, KV, S, D), S = cached + T
        if KV != H:
            # (B, KV, S, D) -> (B, H, S, D); each KV head serves H/KV consecutive query heads.
            k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, H, T, D)
        return self.o(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if packs(x, self.gate, self.up):
            # Training on a CPU in float32: gate and up as one product, (B, T, 2 * ffn_dim) = [a | u], which the
            # fused SwiGLU reads in place: one product of 2 x ffn_dim columns runs faster than two of ffn_dim
            # (README, Benchmarks).
            return self.down(kernels.swiglu_packed(packed_linear(x, (self.gate, self.up))))
        return self.two_products(x)

    def two_products(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP with gate and up as two products: decoding, evaluation, autocast and LoRA-wrapped layers (and
        what benchmarks/block_ablation.py's `unpacked` times, packs made false)."""
        a, u = self.gate(x), self.up(x)  # (B, T, ffn_dim) each
        h = kernels.swiglu(a, u) if a.shape == u.shape and kernels.applies(a, u) else F.silu(a) * u
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: KVCache | SlotView | None = None, mask: torch.Tensor | None = None,
                causal: bool = True) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, kv_cache, mask, causal)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_cache(cfg, cfg.max_seq_len)
        self.register_buffer("cos", cos, persistent=False)  # (max_seq_len, D)
        self.register_buffer("sin", sin, persistent=False)
        # Gradient (activation) checkpointing: in training, keep only each block's input and recompute the
        # block in the backward pass. Memory for activations drops from ~all blocks' intermediates to one
        # block's, for one more forward pass (~1/3 more compute). Set by the loop (--loop.grad-checkpoint).
        self.grad_checkpoint = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 style init, which trains stably at every preset size:
        - embedding and every Linear weight ~ N(0, init_std);
        - the two projections that write into the residual stream (attn.o, mlp.down) ~ N(0, init_std /
          sqrt(2 * n_layers)), so the residual's variance does not grow with depth;
        - RMSNorm gains = 1, biases (Qwen2's q/k/v) = 0; the RoPE tables are recomputed (they are buffers, not
          parameters)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith(("attn.o.weight", "mlp.down.weight")):
                p.normal_(0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                p.normal_(0.0, std)
        cos, sin = rope_cache(self.cfg, self.cfg.max_seq_len, self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        return n - self.embed.weight.numel() if exclude_embedding else n

    def forward(self, idx: torch.Tensor, kv_cache: KVCache | SlotView | None = None,
                segments: torch.Tensor | None = None, hidden: bool = False, only_at: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids idx (B, T), or with `hidden` the final normed hidden states (B, T, C)
        that the output head reads (scalar heads read them too: `cakelm.rlhf.ScalarModel`). With a KV cache, idx
        holds the tokens for cache slots [kv_cache.pos, kv_cache.pos + T) and the cache position advances by T.

        `segments` (B, T) packs several sequences into one row (training only): equal ids mark one sequence,
        which must be contiguous. Attention stays inside a sequence and positions restart at 0 in each, so
        every sequence gets exactly the logits it would get alone.

        `only_at` (B, T) bool: the output at those positions only, (M, vocab) (or (M, C) with `hidden`) in row-major
        order: training log-probs need the completion's positions, not vocabulary-wide logits at every prompt and
        padding position (with a 49k-152k vocabulary those dominate a real model's training memory)."""
        B, T = idx.shape
        if kv_cache is None and T > self.cfg.max_seq_len:  # (a cache's `positions` checks its own)
            raise ValueError(f"sequence of {T} tokens is longer than the context ({self.cfg.max_seq_len})")
        if segments is not None:
            if kv_cache is not None:
                raise ValueError("segments (packed sequences) cannot be combined with a KV cache")
            mask, pos = segment_mask(segments)  # (B, 1, T, T), (B, T)
            causal = False
            cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # (B, 1, T, D)
        elif kv_cache is None:
            mask, causal = None, T > 1
            cos, sin = self.cos[:T], self.sin[:T]  # (T, D)
        else:
            mask, causal = kv_cache.mask(T)
            pos = kv_cache.positions(T)  # (T,) or (B, T)
            cos, sin = self.cos[pos], self.sin[pos]  # (T, D), or (B, T, D) -> (B, 1, T, D) below
            if pos.ndim == 2:
                cos, sin = cos[:, None], sin[:, None]
        x = self.embed(idx)  # (B, T, C)
        recompute = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, kv_cache, mask, causal, use_reentrant=False)
            else:
                x = layer(x, cos, sin, kv_cache, mask, causal)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = self.norm(x)
        if only_at is not None:
            x = x[only_at]  # (M, C)
        return x if hidden else self.lm_head(x)  # (B, T, C) or (B, T, vocab), or (M, ...) with only_at


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter of a Transformer with this config, by name (built on the meta device: no memory;
    check the layer count against the file first, see check_layer_count)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_layer_count(names: Iterable[str], pattern: str, declared: int, key: str, where: str | Path) -> None:
    """A weights file's tensors hold exactly `declared` layers (their names' largest index + 1, by the regex
    `pattern` with one group): checked before any per-layer structure is built from a file that may come from
    elsewhere, so a declared count of a billion costs nothing."""
    found = 1 + max((int(mt.group(1)) for n in names if (mt := re.match(pattern, n))), default=-1)
    if found != declared:
        raise CakeError(f"{where}: {key} is {declared} but the file's tensors hold {found} layers")


# ours -> HF; {i} is the layer index. The output head is absent when tied to the embedding.
_GLOBAL = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "lm_head.weight": "lm_head.weight"}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight", "attn.q.weight": "self_attn.q_proj.weight",
    "attn.k.weight": "self_attn.k_proj.weight", "attn.v.weight": "self_attn.v_proj.weight",
    "attn.o.weight": "self_attn.o_proj.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight", "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
_QKV_BIAS = {"attn.q.bias": "self_attn.q_proj.bias", "attn.k.bias": "self_attn.k_proj.bias",
             "attn.v.bias": "self_attn.v_proj.bias"}  # Qwen2
_QK_NORM = {"attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight"}  # Qwen3


def hf_names(cfg: ModelConfig) -> dict[str, str]:
    """Every tensor name of ours -> its name in HF Llama / Qwen2 / Qwen3 (the same names, plus q/k/v biases or q/k
    norms): the weight-name map of import/export (`cakelm.hf_compat`) and of LoRA adapters (`cakelm.lora`)."""
    names = dict(_GLOBAL)
    if cfg.tie_embeddings:
        del names["lm_head.weight"]
    layer = {**_LAYER, **(_QKV_BIAS if cfg.qkv_bias else {}), **(_QK_NORM if cfg.qk_norm else {})}
    for i in range(cfg.n_layers):
        names.update({f"layers.{i}.{ours}": f"model.layers.{i}.{theirs}" for ours, theirs in layer.items()})
    return names
