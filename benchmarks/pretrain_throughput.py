"""Pretraining throughput: ms/step, tokens/s, MFU and peak memory of the cakelm training step, against nanoGPT.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT          # once (not part of this repository)
    python benchmarks/pretrain_throughput.py --nanogpt /tmp/nanoGPT      # nanoGPT's own model.py as the reference
    python benchmarks/pretrain_throughput.py                             # our GPT-2 reference instead
    python benchmarks/pretrain_throughput.py --shapes b --dtype auto     # ours with --loop.dtype auto's choice
    python benchmarks/pretrain_throughput.py --nanogpt /tmp/nanoGPT --compile ours   # ours compiled, nanoGPT eager

Shapes (a) and (b) use vocabulary 65 (character level, as in nanoGPT's shakespeare_char):
  (a)  nanoGPT's CPU example: 4 layers, 4 heads, width 128, context 64, batch 12
  (b)  nanoGPT's GPU config:  6 layers, 6 heads, width 384, context 256, batch 8
  cpu  our default CPU preset: 4 layers, width 128, context 256, batch 16, BPE vocabulary 2048

MFU is achieved FLOP/s (model.flops_per_token: 6 x matmul params + attention, the PaLM/nanoGPT formula) over the
fp32 matmul peak this script measures on the machine (best of several 2048x2048 matmuls).

Each row ends with our optimizer's step alone (the median of as many steps as were timed, on one step's
gradients): Muon (+ AdamW for embeddings and norms) at the cpu preset, fused AdamW at nanoGPT's shapes.

Shared cloud CPUs drift in speed from minute to minute, so comparing against numbers measured at another time
misleads. The script therefore times a reference at the same shape, interleaving the two in short rounds, and
reports the ratio (speedup > 1: ours is faster). The reference is nanoGPT's own `model.py` when `--nanogpt DIR`
names a checkout (imported from there, never copied here; its commit is printed): `GPT(GPTConfig(...))` with
train.py's defaults (bias=False, dropout 0), its `configure_optimizers` (AdamW, not fused on CPU) and train.py's
step (loss from the model, backward, clip 1.0, step, zero_grad). Without one, a GPT-2-architecture reference
written here stands in (nanoGPT's model: LayerNorm, GELU MLP, learned positions, tied head, fused qkv, SDPA).
The reference always trains in fp32; `--dtype` sets ours (auto: what `--loop.dtype auto` picks on this machine).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from cakelm import kernels
from cakelm.common import (
    cpu_has_bf16_matrix_units,
    hardware_info,
    keep_freed_memory,
    matmul_gflops,
    peak_memory_mb,
    pick_dtype,
)
from cakelm.loop import BF16_MIN_SPEEDUP, autocast, probe_step, step_speedup
from cakelm.losses import lm_loss
from cakelm.model import ModelConfig, Transformer, flops_per_token
from cakelm.optim import OptimConfig, build_optimizers

SHAPES = {
    "a": dict(n_layers=4, n_heads=4, dim=128, max_seq_len=64, batch=12, vocab=65),
    "b": dict(n_layers=6, n_heads=6, dim=384, max_seq_len=256, batch=8, vocab=65),
    # the `cpu` preset that `cakelm pipeline` trains (BPE vocabulary 2048)
    "cpu": dict(n_layers=4, n_heads=4, dim=128, max_seq_len=256, batch=16, vocab=2048),
}


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


def load_nanogpt(path: Path) -> tuple[object, str]:
    """nanoGPT's model.py imported from a checkout (data, not code of ours), and what ran: its git commit, or the
    file's name when the directory is not a git checkout."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", path / "model.py")
    if spec is None or not (path / "model.py").is_file():
        sys.exit(f"--nanogpt {path}: no model.py there (give the directory of a nanoGPT checkout)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "not a git checkout"
    return module, commit


def reference(s: dict, nanogpt: object | None) -> tuple[nn.Module, list[torch.optim.Optimizer], float]:
    """The fp32 reference at shape `s` as nanoGPT's train.py builds it: nanoGPT's own GPT (bias=False, dropout 0)
    and its configure_optimizers when `nanogpt` is its imported model.py, else our GPT-2 reference with the same
    AdamW; and its training FLOPs per token (nanoGPT's estimate_mfu)."""
    V, C, L, T = s["vocab"], s["dim"], s["n_layers"], s["max_seq_len"]
    if nanogpt is not None:
        ref = nanogpt.GPT(nanogpt.GPTConfig(block_size=T, vocab_size=V, n_layer=L, n_head=s["n_heads"], n_embd=C,
                                            dropout=0.0, bias=False))
        return ref, [ref.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")], \
            6 * ref.get_num_params() + 12 * L * C * T
    ref = RefGPT(V, C, s["n_heads"], L, T)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    return ref, [opt], ref_flops_per_token(ref, L, C, T)


def reference_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, nanogpt: object | None) -> torch.Tensor:
    """The reference's mean next-token loss on (x, y): nanoGPT's model computes it itself, as train.py asks it."""
    if nanogpt is not None:
        return model(x, y)[1]
    loss, n = lm_loss(model(x), y)
    return loss / n


def make_step(forward_loss, params, optimizers: list[torch.optim.Optimizer], dtype: torch.dtype):
    """One training step as train.py runs it: loss, backward, clip at 1.0, optimizer step, zero grads. Under
    autocast when dtype is not fp32 (as cakelm's loop does). Its two phases are named for torch.profiler
    (step_profile.py; a few microseconds when no profiler runs)."""
    params = list(params)

    def step() -> None:
        with record_function("forward + backward"):
            with autocast(torch.device("cpu"), dtype):
                loss = forward_loss()
            loss.backward()
        with record_function("clip + optimizer"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            for o in optimizers:
                o.step()
                o.zero_grad(set_to_none=True)
    return step


def bench_shape(name: str, steps: int, rounds: int, peak: float, compile: str, nanogpt: object | None,
                dtype_name: str) -> dict:
    s = SHAPES[name]
    B, T, V, L, C = s["batch"], s["max_seq_len"], s["vocab"], s["n_layers"], s["dim"]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, dim=C, n_layers=L, n_heads=s["n_heads"], max_seq_len=T)
    ours = Transformer(cfg)
    # the cpu preset trains with Muon; nanoGPT's shapes are compared optimizer for optimizer (AdamW)
    ours_opt = build_optimizers(ours, OptimConfig(name="muon" if name == "cpu" else "adamw"), torch.device("cpu"))
    def wrap(m: nn.Module, who: str) -> nn.Module:  # compile: "" (neither), "both", or "ours" alone
        return torch.compile(m) if compile == "both" or compile == who else m
    x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    ours_c = wrap(ours, "ours")

    def ours_loss() -> torch.Tensor:
        loss, n = lm_loss(ours_c(x), y)
        return loss / n

    if dtype_name == "auto" and cpu_has_bf16_matrix_units() is False:  # what --loop.dtype auto does here
        dtype, dtype_name = torch.float32, "auto: fp32, no bf16 matrix units"
    elif dtype_name == "auto":  # what --loop.dtype auto would choose: cakelm.loop's probe of this step, its threshold
        speedup = step_speedup(probe_step(ours, ours_loss, torch.device("cpu")))
        dtype = torch.bfloat16 if speedup >= BF16_MIN_SPEEDUP else torch.float32
        dtype_name = f"auto: {'bf16' if dtype == torch.bfloat16 else 'fp32'}, probe {speedup:.2f}x"
    else:
        dtype = pick_dtype(dtype_name, torch.device("cpu"))
    ours_step = make_step(ours_loss, ours.parameters(), ours_opt, dtype)
    ref, ref_opt, fpt_ref = reference(s, nanogpt)
    ref_c = wrap(ref, "ref")
    ref_step = make_step(lambda: reference_loss(ref_c, x, y, nanogpt), ref.parameters(), ref_opt, torch.float32)
    warmup = {}  # seconds of the 3 untimed steps: torch.compile's compiling happens here
    for key, fn in (("ours", ours_step), ("ref", ref_step)):
        t = time.perf_counter()
        for _ in range(3):
            fn()
        warmup[key] = time.perf_counter() - t
    times: dict[str, list[float]] = {"ours": [], "ref": []}
    for _ in range(rounds):  # interleave so both see the same machine speed
        for key, fn in (("ours", ours_step), ("ref", ref_step)):
            for _ in range(steps):
                t = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t)
    dt_ours, dt_ref = statistics.median(times["ours"]), statistics.median(times["ref"])
    # our optimizer's step alone (Muon at the cpu preset, fused AdamW elsewhere), on the gradients of one more step
    ours_loss().backward()
    opt_times = []
    for _ in range(steps * rounds):
        t = time.perf_counter()
        for o in ours_opt:
            o.step()
        opt_times.append(time.perf_counter() - t)
    tok = B * T
    fpt_ours = flops_per_token(cfg, T)
    return {
        "shape": name, "params_M": ours.num_params() / 1e6, "ms_per_step": 1000 * dt_ours,
        "tok_per_s": tok / dt_ours, "mfu": fpt_ours * tok / dt_ours / peak,
        "ref_ms_per_step": 1000 * dt_ref, "ref_tok_per_s": tok / dt_ref, "ref_mfu": fpt_ref * tok / dt_ref / peak,
        "speedup": dt_ref / dt_ours, "dtype": dtype_name, "optimizer_ms": 1000 * statistics.median(opt_times),
        "optimizer": "muon + adamw" if name == "cpu" else "adamw", "warmup_s": warmup["ours"],
        "ref_warmup_s": warmup["ref"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["a", "b", "cpu"], choices=list(SHAPES))
    ap.add_argument("--compile", nargs="?", const="both", default="", choices=("both", "ours"),
                    help="torch.compile both models, or `--compile ours` ours alone against nanoGPT run as its CPU "
                         "example runs it (eager); the first steps then include the compiling")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per round (default: 20 for a, 3 for b)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of ours / reference")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--nanogpt", type=Path, default=None, help="a nanoGPT checkout: time its own model.py")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "auto"),
                    help="our training dtype (auto: --loop.dtype auto's choice for each shape; nanoGPT: fp32)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the training loop does on CPU
    nanogpt, ref_name = None, "our GPT-2-architecture reference (no --nanogpt given)"
    if args.nanogpt is not None:
        nanogpt, commit = load_nanogpt(args.nanogpt)
        ref_name = f"nanoGPT's own model.py from {args.nanogpt} (commit {commit})"
    peak = matmul_gflops(n=2048) * 1e9
    print(f"cpu: {hardware_info(torch.device('cpu'))['cpu']}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, fp32 matmul peak {peak / 1e9:.1f} GFLOP/s, "
          f"{dict(both='both compiled', ours='ours compiled, the reference eager').get(args.compile, 'eager')}")
    print(f"reference (fp32): {ref_name}; ours with the fused CPU kernels: "
          f"{'yes' if kernels.lib() is not None else 'no (' + kernels.why() + ')'}")
    print(f"{'shape':<6}{'params':>8}{'ms/step':>10}{'tok/s':>10}{'MFU':>7} | {'ref ms':>8}{'ref tok/s':>10}"
          f"{'ref MFU':>8} | {'speedup':>7}  ours in")
    for name in args.shapes:
        steps = args.steps or {"a": 20, "b": 3, "cpu": 5}[name]
        r = bench_shape(name, steps, args.rounds, peak, args.compile, nanogpt, args.dtype)
        print(f"{r['shape']:<6}{r['params_M']:>7.2f}M{r['ms_per_step']:>10.1f}{r['tok_per_s']:>10,.0f}"
              f"{r['mfu']:>7.1%} | {r['ref_ms_per_step']:>8.1f}{r['ref_tok_per_s']:>10,.0f}{r['ref_mfu']:>8.1%} | "
              f"{r['speedup']:>6.2f}x  {r['dtype']}; our optimizer step alone ({r['optimizer']}) "
              f"{r['optimizer_ms']:.1f} ms" + (f"; warm-up (compiling) {r['warmup_s']:.0f} s ours, "
                                               f"{r['ref_warmup_s']:.0f} s reference" if args.compile else ""),
              flush=True)
    print(f"peak memory (RSS) {peak_memory_mb():.0f} MB; fp32 matmul peak re-measured "
          f"{matmul_gflops(n=2048):.1f} GFLOP/s")


if __name__ == "__main__":
    main()
