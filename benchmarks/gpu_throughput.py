"""Training throughput of the `gpu` preset's model on one CUDA GPU: tokens/s, MFU and peak memory, eager and
compiled, for about a minute in all. Part of `benchmarks/gpu_check.sh`; runs on CPU too (`--device cpu
--preset tiny`, a smoke test of the script itself), but its numbers mean something on a GPU.

    python benchmarks/gpu_throughput.py                         # gpt2-small (~100M), bf16, batch 16 x 1024
    python benchmarks/gpu_throughput.py --seconds 20 --modes compiled
    python benchmarks/gpu_throughput.py --device cpu --preset tiny --batch-size 2 --seconds 2 --modes eager

What the `gpu` preset trains with: bf16 autocast (`--loop.dtype auto` on a GPU with bf16), fused AdamW
(`cakelm.optim`), `F.scaled_dot_product_attention` (the script checks that the flash kernel runs this model's
attention by calling it with only that backend allowed), and torch.compile (`--loop.compile`). Each mode warms up
(compiling, for the compiled one) before it is timed; MFU is achieved FLOP/s (model.flops_per_token) over the GPU's
dense bf16 peak (cakelm.loop.GPU_PEAK_FLOPS; blank for a GPU not in that table).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cakelm.common import hardware_info, pick_device
from cakelm.loop import GPU_PEAK_FLOPS, autocast
from cakelm.losses import lm_loss
from cakelm.model import PRESETS, ModelConfig, Transformer, flops_per_token
from cakelm.optim import OptimConfig, build_optimizers


def flash_attention_runs(cfg: ModelConfig, device: torch.device) -> str:
    """'yes' when SDPA's flash kernel accepts this model's attention shape in bf16, else why not."""
    if device.type != "cuda":
        return "n/a (not CUDA)"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, cfg.n_heads, 128, cfg.head_dim, device=device, dtype=torch.bfloat16)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
        return "yes"
    except RuntimeError as e:
        return f"no ({str(e).splitlines()[0][:80]})"


def run(mode: str, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, batch: int, seconds: float) -> dict:
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    optimizers = build_optimizers(model, OptimConfig(name="adamw", lr=6e-4), device)
    fused = all(g.get("fused") for o in optimizers for g in o.param_groups)
    fwd = torch.compile(model) if mode == "compiled" else model
    T = cfg.max_seq_len
    x = torch.randint(0, cfg.vocab_size, (batch, T), device=device)
    y = torch.randint(0, cfg.vocab_size, (batch, T), device=device)

    def step() -> float:
        with autocast(device, dtype):
            loss, n = lm_loss(fwd(x), y)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for o in optimizers:
            o.step()
            o.zero_grad(set_to_none=True)
        return float(loss / n)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(3):  # compiles, and builds the optimizer state
        first_loss = step()
    sync()
    warmup = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or steps < 2:
        last_loss = step()
        steps += 1
    sync()
    dt = (time.perf_counter() - t0) / steps
    tok_s = batch * T / dt
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)
    return {"mode": mode, "warmup_s": warmup, "ms_step": 1000 * dt, "tok_s": tok_s,
            "mfu": flops_per_token(cfg, T) * tok_s / peak if peak else None,
            "mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "fused_adamw": fused, "loss": (first_loss, last_loss), "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="gpt2-small", choices=list(PRESETS))
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=25, help="timed seconds per mode (after its warm-up)")
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=("eager", "compiled"))
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = pick_device(args.device)
    # bf16 as the gpu preset trains; a GPU without it (pre-Ampere) in fp32 (fp16 would need a loss scaler)
    dtype = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float32
    cfg = ModelConfig(vocab_size=args.vocab_size, **PRESETS[args.preset])
    hw = hardware_info(device)
    print(f"device: {hw.get('gpu') or hw['cpu']}; torch {torch.__version__}; model {args.preset}: "
          f"{Transformer(cfg).num_params() / 1e6:.1f}M parameters, batch {args.batch_size} x {cfg.max_seq_len}, "
          f"{str(dtype).removeprefix('torch.')} autocast; flash attention: {flash_attention_runs(cfg, device)}")
    print(f"{'mode':<10}{'warm-up s':>10}{'ms/step':>10}{'tok/s':>12}{'MFU':>8}{'peak GB':>9}  fused AdamW  loss")
    for mode in args.modes:
        r = run(mode, cfg, device, dtype, args.batch_size, args.seconds)
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        mem = f"{r['mem_gb']:.1f}" if r["mem_gb"] is not None else "-"
        print(f"{r['mode']:<10}{r['warmup_s']:>10.1f}{r['ms_step']:>10.1f}{r['tok_s']:>12,.0f}{mfu:>8}{mem:>9}  "
              f"{str(r['fused_adamw']):<11}  {r['loss'][0]:.3f} -> {r['loss'][1]:.3f} ({r['steps']} steps)",
              flush=True)


if __name__ == "__main__":
    main()
