"""The matrix products of one training step alone: our block's shapes against GPT-2's, at equal FLOPs.

    python benchmarks/matmul_shapes.py                 # nanoGPT's width-384 shape (b)
    python benchmarks/matmul_shapes.py --shape a --rounds 30

Every linear layer of a step costs three products of its shape (forward y = x W^T, and backward dx = g W and
dW = g^T x). Ours makes q, k, v and o as four of width x width, gate and up as two of width x ffn_dim and down;
GPT-2 makes q, k and v as one of width x 3 width, o, and its MLP as width x 4 width and back; the FLOPs are equal
when ffn_dim is 8/3 x width. This times the products alone (fresh inputs per layer, so caches are as cold as in a
step) for ours, GPT-2's, and ours with q/k/v and/or gate/up packed into one product each, in interleaved rounds
in one process, and prints each one's time and GPT-2's over it (< 1: slower than GPT-2's shapes). It is what showed
that the last 2% of our step against nanoGPT's at (b) was the shapes (README, Benchmarks).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from cakelm.common import hardware_info
from cakelm.model import ModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_throughput import SHAPES  # noqa: E402  (the shapes every benchmark here uses)


def layouts(C: int, F: int) -> dict[str, list[tuple[int, int]]]:
    """Each layout's linear layers of one block as (in, out) features."""
    return {
        "ours": [(C, C), (C, C), (C, C), (C, C), (C, F), (C, F), (F, C)],
        "gpt2": [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)],
        "qkv-packed": [(C, 3 * C), (C, C), (C, F), (C, F), (F, C)],
        "gate-up-packed": [(C, C), (C, C), (C, C), (C, C), (C, 2 * F), (F, C)],
        "both-packed": [(C, 3 * C), (C, C), (C, 2 * F), (F, C)],
    }


def step_fn(layers: list[tuple[int, int]], rows: int, n_layers: int):
    """One step's products for n_layers blocks of these layers, on inputs made once (one set per layer)."""
    data = [[(torch.randn(rows, i), torch.randn(o, i), torch.randn(rows, o)) for i, o in layers]
            for _ in range(n_layers)]

    def step() -> None:
        for block in data:
            for x, w, g in block:
                x @ w.t(), g @ w, g.t() @ x  # forward, input gradient, weight gradient
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="b", choices=list(SHAPES))
    ap.add_argument("--rounds", type=int, default=12, help="interleaved rounds, one step of each layout per round")
    args = ap.parse_args()
    if args.rounds < 1:
        raise SystemExit("matmul_shapes.py: --rounds must be >= 1")
    s = SHAPES[args.shape]
    C, rows = s["dim"], s["batch"] * s["max_seq_len"]
    F = ModelConfig(dim=C, n_heads=s["n_heads"]).ffn_dim
    torch.manual_seed(0)
    steps = {name: step_fn(layers, rows, s["n_layers"]) for name, layers in layouts(C, F).items()}
    gflop = {name: 6 * rows * sum(i * o for i, o in layers) * s["n_layers"] / 1e9
             for name, layers in layouts(C, F).items()}
    for step in steps.values():  # warm-up
        for _ in range(2):
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in tqdm(range(args.rounds), desc="interleaved rounds", unit="round", leave=False):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    print(f"cpu: {hardware_info(torch.device('cpu'))['cpu']}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; shape {args.shape}: width {C}, ffn_dim {F}, {rows} rows, {s['n_layers']} layers; "
          f"median of {args.rounds} rounds")
    ref = statistics.median(times["gpt2"])
    print(f"{'layout':<16}{'GFLOP':>8}{'ms':>10}{'GFLOP/s':>9}{'gpt2 / it':>11}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:<16}{gflop[name]:>8.1f}{1e3 * m:>10.1f}{gflop[name] / m:>9.0f}{ref / m:>10.3f}x")


if __name__ == "__main__":
    main()
