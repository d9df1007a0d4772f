"""The fused CPU kernels one at a time: forward + backward of RMSNorm, RoPE, SwiGLU's product and cross-entropy,
plain PyTorch against cakelm/kernels.c, at the activation shapes of nanoGPT's two shapes and of our `cpu` preset.

    python benchmarks/kernels.py                  # every op at every shape
    python benchmarks/kernels.py --shapes a --repeats 400

Each row: the median microseconds of one forward and backward, plain and fused, timed in interleaved rounds in
one process (shared CPUs drift from minute to minute), and their ratio. The whole training step with the kernels
on and off is `block_ablation.py --variants ours plain`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from cakelm import kernels
from cakelm.common import hardware_info, keep_freed_memory
from cakelm.losses import token_nll
from cakelm.model import ModelConfig, RMSNorm, rope_cache, rotate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_throughput import SHAPES  # noqa: E402  (the shapes every benchmark here uses)


def cases(s: dict) -> dict[str, Callable[[], None]]:
    """One forward + backward per op at shape s, on the path kernels.set_enabled chooses."""
    B, T, C, H = s["batch"], s["max_seq_len"], s["dim"], s["n_heads"]
    cfg = ModelConfig(vocab_size=s["vocab"], dim=C, n_heads=H, max_seq_len=T)
    x, gx = torch.randn(B, T, C, requires_grad=True), torch.randn(B, T, C)
    norm = RMSNorm(C, 1e-5)
    cos, sin = rope_cache(cfg, T)
    # q as the projection makes it; its gradient (B, H, T, D) in (B, T, H, D) memory, as flash attention returns it
    q, gq = torch.randn(B, T, H, C // H, requires_grad=True), torch.randn(B, T, H, C // H).transpose(1, 2)
    a, u = torch.randn(B, T, cfg.ffn_dim, requires_grad=True), torch.randn(B, T, cfg.ffn_dim, requires_grad=True)
    gh = torch.randn(B, T, cfg.ffn_dim)
    logits, targets = torch.randn(B, T, s["vocab"], requires_grad=True), torch.randint(0, s["vocab"], (B, T))

    def swiglu() -> None:
        # the two halves' path (model.MLP outside float32 training, which packs gate and up: kernels.swiglu_packed)
        h = kernels.swiglu(a, u) if kernels.applies(a, u) else F.silu(a) * u
        h.backward(gh)
    return {
        "rms_norm": lambda: norm(x).backward(gx),
        "rope": lambda: rotate(q, cos, sin).backward(gq),
        "swiglu": swiglu,
        "cross_entropy": lambda: token_nll(logits, targets).sum().backward(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--repeats", type=int, default=200, help="timed calls per op and path in each of 4 rounds")
    args = ap.parse_args()
    if args.repeats < 1:
        raise SystemExit("kernels.py: --repeats must be >= 1")
    if kernels.lib() is None:
        raise SystemExit(f"kernels.py: the fused kernels are off here ({kernels.why()}): nothing to compare")
    keep_freed_memory()  # as the training loop does on CPU
    print(f"cpu: {hardware_info(torch.device('cpu'))['cpu']}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; forward + backward, median us")
    print(f"{'shape':<6}{'op':<15}{'plain':>10}{'fused':>10}{'speedup':>9}")
    for name in args.shapes:
        ops = cases(SHAPES[name])
        times: dict[tuple[str, bool], list[float]] = {(op, on): [] for op in ops for on in (False, True)}
        for _ in range(4):
            for (op, on), ts in times.items():
                kernels.set_enabled(on)
                for _ in range(5):  # warm-up
                    ops[op]()
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    ops[op]()
                    ts.append(time.perf_counter() - t)
        kernels.set_enabled(True)
        for op in ops:
            plain, fused = (1e6 * statistics.median(times[(op, on)]) for on in (False, True))
            print(f"{name:<6}{op:<15}{plain:>10.0f}{fused:>10.0f}{plain / fused:>8.2f}x")


if __name__ == "__main__":
    main()
