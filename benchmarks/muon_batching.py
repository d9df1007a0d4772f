"""What Muon gains by orthogonalising same-shape matrices in one batched Newton-Schulz iteration: the whole training
step (forward, backward, clip, Muon + AdamW) at the `cpu` preset's shape with `cakelm.optim.Muon` against the same
optimizer running one Newton-Schulz call per matrix (the code before the batching), two copies of one model on one
batch in interleaved rounds in one process; then Newton-Schulz alone both ways on one step's gradients. The two
write the same weights bit for bit, and the script checks it.

    python benchmarks/muon_batching.py                 # ~1 minute on 2 cores; run nothing else meanwhile
    python benchmarks/muon_batching.py --rounds 14
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from cakelm.common import hardware_info, keep_freed_memory
from cakelm.losses import lm_loss
from cakelm.model import ModelConfig, Transformer
from cakelm.optim import Muon, OptimConfig, build_optimizers, zeropower_newton_schulz

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_throughput import SHAPES, make_step  # noqa: E402  (the training step the throughput benchmark times)


def per_matrix(updates: list[torch.Tensor], steps: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Muon's orthogonalisation one matrix at a time, as it ran before the batching."""
    return [zeropower_newton_schulz(u, steps, dtype=dtype) for u in updates]


def median_ms(fns: dict, rounds: int, per_round: int) -> dict[str, float]:
    """Median time of one call of each function, in interleaved rounds of `per_round` calls each."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            for _ in range(per_round):
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds of 5 training steps each way")
    args = ap.parse_args()
    if args.rounds < 1:
        raise SystemExit("muon_batching: need --rounds >= 1")
    keep_freed_memory()  # as the training loop does on CPU
    s = SHAPES["cpu"]
    torch.manual_seed(0)
    batched = Transformer(ModelConfig(vocab_size=s["vocab"], dim=s["dim"], n_layers=s["n_layers"],
                                      n_heads=s["n_heads"], max_seq_len=s["max_seq_len"]))
    one_by_one = copy.deepcopy(batched)
    x, y = (torch.randint(0, s["vocab"], (s["batch"], s["max_seq_len"])) for _ in range(2))
    steps, opts = {}, {}
    for name, model in (("one matrix at a time", one_by_one), ("batched by shape", batched)):
        opts[name] = build_optimizers(model, OptimConfig(name="muon", lr=1e-2), torch.device("cpu"))
        if name == "one matrix at a time":
            opts[name][1]._orthogonalise = per_matrix  # the instance's own, so Muon.step calls it
        steps[name] = make_step(lambda m=model: lm_loss(m(x), y)[0] / y.numel(), model.parameters(), opts[name],
                                torch.float32)
    for fn in steps.values():  # warm-up
        for _ in range(2):
            fn()
    step_ms = median_ms(steps, args.rounds, 5)
    same = all(torch.equal(a, b) for a, b in zip(batched.parameters(), one_by_one.parameters()))
    lm_loss(batched(x), y)[0].backward()  # one step's gradients, for Newton-Schulz alone
    grads = [p.grad for p in opts["batched by shape"][1].param_groups[0]["params"]]
    ns_ms = median_ms({"one matrix at a time": lambda: per_matrix(grads, 5, torch.float32),
                       "batched by shape": lambda: Muon._orthogonalise(grads, 5, torch.float32)}, args.rounds, 5)
    print(f"cpu: {hardware_info(torch.device('cpu'))['cpu']}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; the cpu preset's shape, {len(grads)} block matrices")
    for what, ms in (("training step", step_ms), ("Newton-Schulz alone", ns_ms)):
        one, both = ms["one matrix at a time"], ms["batched by shape"]
        print(f"{what}: one matrix at a time {one:.1f} ms, batched by shape {both:.1f} ms, {one / both:.3f}x")
    print(f"weights after {2 + 5 * args.rounds} steps each equal bit for bit: {same}")


if __name__ == "__main__":
    main()
