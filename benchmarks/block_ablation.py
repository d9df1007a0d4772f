"""Where our pretraining step loses time against nanoGPT's: one piece of the Llama block swapped out at a time.

    python benchmarks/block_ablation.py --nanogpt /tmp/nanoGPT                 # nanoGPT's small shape (a)
    python benchmarks/block_ablation.py --nanogpt /tmp/nanoGPT --shape b --rounds 4
    python benchmarks/block_ablation.py --variants ours layernorm ffn384      # our GPT-2 reference instead

Our Transformer differs from nanoGPT's GPT-2 blocks in a few pieces; this times a full fp32 training step
(forward, backward, clip, AdamW) of our model as it is, and of copies of it with one piece replaced, next to the
reference (nanoGPT's own model.py from --nanogpt, else `pretrain_throughput.py`'s GPT-2 reference), in
interleaved rounds in one process (shared CPUs drift from minute to minute; only ratios measured together mean
anything). Variants:
  ours        the model as `cakelm pretrain` trains it (with the fused CPU kernels of cakelm/kernels.c)
  plain       the same model without the fused kernels (plain PyTorch, as before them or without a compiler)
  unpacked    q, k and v as three matrix products in training and gate and up as two, not one each (model.packs
              false): what packing gains
  qkv3        q, k and v as three products, gate and up still one: what packing q/k/v gains
  layernorm   torch's fused LayerNorm (no bias) in place of our RMSNorm: what RMSNorm's separate passes cost
  no-rope     RoPE skipped (`model.rotate` only transposes, `kernels.qkv_rope` only splits): what rotating
              q and k costs
  gelu-mlp    GPT-2's MLP (4 x width, GELU) in place of SwiGLU: what the SwiGLU product costs at its width
  ffnN        SwiGLU of hidden width N (e.g. ffn384): what another rounding of 8/3 x width would cost (at width
              128 the default is 320, 8/3 x 128 = 341 rounded down to a multiple of 32; Llama's rule, up to a
              multiple of 64, gives 384: 8% more block FLOPs than GPT-2's MLP)
A variant is not a model we train (layernorm and no-rope change what the model computes); it says where time goes.
Each row: median ms per step and the reference's time over it (> 1: faster than the reference).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import cakelm.model as model_module
from cakelm import kernels
from cakelm.common import hardware_info, keep_freed_memory
from cakelm.losses import lm_loss
from cakelm.model import ModelConfig, Transformer
from cakelm.optim import OptimConfig, build_optimizers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_throughput import (  # noqa: E402  (the step and the reference it times)
    SHAPES,
    load_nanogpt,
    make_step,
    reference,
    reference_loss,
)

VARIANTS = ("ours", "plain", "unpacked", "qkv3", "layernorm", "no-rope", "gelu-mlp")


class GeluMLP(nn.Module):
    """GPT-2's MLP: 4 x width, GELU, no bias."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc, self.proj = nn.Linear(dim, 4 * dim, bias=False), nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


def build_variant(name: str, s: dict) -> Transformer:
    """Our Transformer at shape `s` with one piece replaced as `name` says (the same seed for every variant)."""
    torch.manual_seed(0)
    ffn = int(name[3:]) if name.startswith("ffn") else 0
    m = Transformer(ModelConfig(vocab_size=s["vocab"], dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"],
                                max_seq_len=s["max_seq_len"], ffn_dim=ffn))
    for block in m.layers:
        if name == "layernorm":
            block.attn_norm, block.mlp_norm = nn.LayerNorm(s["dim"], bias=False), nn.LayerNorm(s["dim"], bias=False)
        elif name == "gelu-mlp":
            block.mlp = GeluMLP(s["dim"])
    if name == "layernorm":
        m.norm = nn.LayerNorm(s["dim"], bias=False)
    return m


def unrotated_qkv(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                  kv_heads: int) -> tuple[torch.Tensor, ...]:
    """kernels.qkv_rope without the rotation (no-rope): q, k and v as (B, heads, T, D) views of the columns of the
    packed product y (B, T, (heads + 2 kv_heads) * D)."""
    B, T, n = y.shape
    D = n // (heads + 2 * kv_heads)
    return tuple(t.reshape(B, T, -1, D).transpose(1, 2) for t in y.split([heads * D, kv_heads * D, kv_heads * D], -1))


@contextmanager
def variant_context(name: str) -> Iterator[None]:
    """What a variant changes while it steps, beyond its modules (build_variant): the fused kernels off (plain),
    model.packs false for both packings (unpacked) or for q, k and v's (qkv3), RoPE skipped (no-rope)."""
    if name == "plain":
        kernels.set_enabled(False)
        try:
            yield
        finally:
            kernels.set_enabled(True)
    elif name in ("unpacked", "qkv3"):  # model.packs, asked by Attention for 3 layers and by MLP for 2
        packs = model_module.packs
        with mock.patch.object(model_module, "packs",
                               lambda x, *layers: name == "qkv3" and len(layers) == 2 and packs(x, *layers)):
            yield
    elif name == "no-rope":  # both paths Attention takes: rotate (separate products) and qkv_rope (packed)
        with mock.patch.object(model_module, "rotate", lambda t, cos, sin: t.transpose(1, 2)), \
                mock.patch.object(kernels, "qkv_rope", unrotated_qkv):
            yield
    else:
        yield


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="a", choices=list(SHAPES))
    ap.add_argument("--variants", nargs="+", default=[*VARIANTS, "ffn384"],
                    help=f"{', '.join(VARIANTS)} or ffnN (SwiGLU hidden width N)")
    ap.add_argument("--rounds", type=int, default=6, help="alternating rounds over the variants and the reference")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per round (default: 20 for a, 3 for b, 5 cpu)")
    ap.add_argument("--nanogpt", type=Path, default=None, help="a nanoGPT checkout: time its own model.py")
    args = ap.parse_args()
    bad = [v for v in args.variants if v not in VARIANTS and not (v.startswith("ffn") and v[3:].isdigit()
                                                                  and int(v[3:]) > 0)]
    if bad or args.rounds < 1 or args.steps < 0:
        raise SystemExit(f"block_ablation: need variants from {', '.join(VARIANTS)} or ffnN with N >= 1 "
                         f"(got {', '.join(bad) or 'them'}), --rounds >= 1 and --steps >= 0")
    keep_freed_memory()  # as the training loop does on CPU
    s = SHAPES[args.shape]
    B, T, V = s["batch"], s["max_seq_len"], s["vocab"]
    x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    steps: dict[str, Callable[[], None]] = {}
    for name in args.variants:
        m = build_variant(name, s)
        opt = build_optimizers(m, OptimConfig(name="adamw"), torch.device("cpu"))  # nanoGPT's shapes: AdamW

        def loss(m: Transformer = m) -> torch.Tensor:
            total, n = lm_loss(m(x), y)
            return total / n
        steps[name] = make_step(loss, m.parameters(), opt, torch.float32)
    nanogpt, ref_name = None, "our GPT-2-architecture reference (no --nanogpt given)"
    if args.nanogpt is not None:
        nanogpt, commit = load_nanogpt(args.nanogpt)
        ref_name = f"nanoGPT's model.py (commit {commit})"
    ref, ref_opt, _ = reference(s, nanogpt)
    steps["reference"] = make_step(lambda: reference_loss(ref, x, y, nanogpt), ref.parameters(), ref_opt,
                                   torch.float32)

    n = args.steps or {"a": 20, "b": 3, "cpu": 5}[args.shape]
    times: dict[str, list[float]] = {k: [] for k in steps}
    for name, step in steps.items():  # warm-up
        with variant_context(name):
            for _ in range(3):
                step()
    for _ in tqdm(range(args.rounds), desc="interleaved rounds", unit="round", leave=False):
        for name, step in steps.items():
            with variant_context(name):
                for _ in range(n):
                    t = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - t)
    print(f"cpu: {hardware_info(torch.device('cpu'))['cpu']}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; shape {args.shape}: {s}")
    print(f"reference: {ref_name}; {args.rounds} rounds x {n} steps, fp32, AdamW; fused CPU kernels: "
          f"{'on' if kernels.lib() is not None else 'off (' + kernels.why() + ')'}")
    ref_ms = 1000 * statistics.median(times["reference"])
    print(f"{'variant':<12}{'ms/step':>10}{'reference / it':>16}")
    for name, ts in times.items():
        ms = 1000 * statistics.median(ts)
        print(f"{name:<12}{ms:>10.1f}{ref_ms / ms:>15.3f}x")


if __name__ == "__main__":
    main()
