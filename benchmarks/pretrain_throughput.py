"""Pretraining throughput: ms/step, tokens/s, MFU and peak memory of the cakelm training step.

    python benchmarks/pretrain_throughput.py                 # both shapes, prints a table
    python benchmarks/pretrain_throughput.py --shapes a --steps 30

Shapes (a) and (b) use vocabulary 65 (character level, as in nanoGPT's shakespeare_char):
  (a)  nanoGPT's CPU example: 4 layers, 4 heads, width 128, context 64, batch 12
  (b)  nanoGPT's GPU config:  6 layers, 6 heads, width 384, context 256, batch 8
  cpu  our default CPU preset: 4 layers, width 128, context 256, batch 16, BPE vocabulary 2048

MFU is achieved FLOP/s (model.flops_per_token: 6 x matmul params + attention, the PaLM/nanoGPT formula) over the
fp32 matmul peak this script measures on the machine (best of several 2048x2048 matmuls).

Shared cloud CPUs drift in speed from minute to minute, so comparing against numbers measured at another time
misleads. The script therefore also times a GPT-2-architecture reference written here (nanoGPT's model:
LayerNorm, GELU MLP, learned positions, tied head, fused qkv, SDPA; AdamW without fused kernels, as nanoGPT
uses on CPU) at the same shape, interleaving the two in short rounds, and reports the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from cakelm.common import keep_freed_memory, peak_memory_mb
from cakelm.losses import lm_loss
from cakelm.model import ModelConfig, Transformer, flops_per_token
from cakelm.optim import OptimConfig, build_optimizers

SHAPES = {
    "a": dict(n_layers=4, n_heads=4, dim=128, max_seq_len=64, batch=12, vocab=65),
    "b": dict(n_layers=6, n_heads=6, dim=384, max_seq_len=256, batch=8, vocab=65),
    # the `cpu` preset that `cakelm pipeline` trains (BPE vocabulary 2048)
    "cpu": dict(n_layers=4, n_heads=4, dim=128, max_seq_len=256, batch=16, vocab=2048),
}


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 matmul FLOP/s over a few timed runs."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - t) / 4)
    return 2 * n**3 / best


# ----------------------------------------------------------------------------------------------------------------
# GPT-2 architecture reference (the model nanoGPT trains), for a same-machine, same-minute comparison.


class RefBlock(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc, self.proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class RefGPT(nn.Module):
    def __init__(self, vocab: int, d: int, h: int, layers: int, T: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.blocks = nn.ModuleList(RefBlock(d, h) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


def ref_flops_per_token(m: RefGPT, L: int, d: int, T: int) -> float:
    n = sum(p.numel() for p in m.parameters()) - m.wpe.weight.numel()  # nanoGPT's get_num_params()
    return 6 * n + 12 * L * d * T


# ----------------------------------------------------------------------------------------------------------------


def make_step(model: nn.Module, optimizers: list[torch.optim.Optimizer], x: torch.Tensor, y: torch.Tensor):
    def step() -> None:
        loss, n = lm_loss(model(x), y)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for o in optimizers:
            o.step()
            o.zero_grad(set_to_none=True)
    return step


def bench_shape(name: str, steps: int, rounds: int, peak: float, compile: bool) -> dict:
    s = SHAPES[name]
    B, T, V = s["batch"], s["max_seq_len"], s["vocab"]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"], max_seq_len=T)
    ours, ref = Transformer(cfg), RefGPT(V, s["dim"], s["n_heads"], s["n_layers"], T)
    # the cpu preset trains with Muon; nanoGPT's shapes are compared optimizer for optimizer (AdamW)
    ours_opt = build_optimizers(ours, OptimConfig(name="muon" if name == "cpu" else "adamw"), torch.device("cpu"))
    ref_opt = [torch.optim.AdamW(ref.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)]
    wrap = torch.compile if compile else (lambda m: m)
    ours_step = make_step(wrap(ours), ours_opt, torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T)))
    ref_step = make_step(wrap(ref), ref_opt, torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T)))
    for fn in (ours_step, ref_step):
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {"ours": [], "ref": []}
    for _ in range(rounds):  # interleave so both see the same machine speed
        for key, fn in (("ours", ours_step), ("ref", ref_step)):
            for _ in range(steps):
                t = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t)
    dt_ours, dt_ref = statistics.median(times["ours"]), statistics.median(times["ref"])
    tok = B * T
    fpt_ours, fpt_ref = flops_per_token(cfg, T), ref_flops_per_token(ref, s["n_layers"], s["dim"], T)
    return {
        "shape": name, "params_M": ours.num_params() / 1e6, "ms_per_step": 1000 * dt_ours,
        "tok_per_s": tok / dt_ours, "mfu": fpt_ours * tok / dt_ours / peak,
        "ref_ms_per_step": 1000 * dt_ref, "ref_tok_per_s": tok / dt_ref, "ref_mfu": fpt_ref * tok / dt_ref / peak,
        "speedup": dt_ref / dt_ours,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["a", "b", "cpu"], choices=list(SHAPES))
    ap.add_argument("--compile", action="store_true", help="torch.compile both models (minutes of compiling)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per round (default: 20 for a, 3 for b)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of ours / reference")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the training loop does on CPU
    peak = matmul_peak()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 matmul peak {peak / 1e9:.1f} GFLOP/s"
          f"{', torch.compile' if args.compile else ', eager'}")
    print(f"{'shape':<6}{'params':>8}{'ms/step':>10}{'tok/s':>10}{'MFU':>7} | {'ref ms':>8}{'ref tok/s':>10}"
          f"{'ref MFU':>8} | {'speedup':>7}")
    for name in args.shapes:
        steps = args.steps or {"a": 20, "b": 3, "cpu": 5}[name]
        r = bench_shape(name, steps, args.rounds, peak, args.compile)
        print(f"{r['shape']:<6}{r['params_M']:>7.2f}M{r['ms_per_step']:>10.1f}{r['tok_per_s']:>10,.0f}"
              f"{r['mfu']:>7.1%} | {r['ref_ms_per_step']:>8.1f}{r['ref_tok_per_s']:>10,.0f}{r['ref_mfu']:>8.1%} | "
              f"{r['speedup']:>6.2f}x", flush=True)
    print(f"peak memory (RSS) {peak_memory_mb():.0f} MB; fp32 matmul peak re-measured "
          f"{matmul_peak() / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
