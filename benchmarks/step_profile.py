"""Where one fp32 training step's time goes, ours and nanoGPT's side by side, by kind of work.

    python benchmarks/step_profile.py --nanogpt /tmp/nanoGPT --shape b
    python benchmarks/step_profile.py --shape a                # our GPT-2-architecture reference instead

`pretrain_throughput.py` says how fast a step is; this says what it spends its time on. torch.profiler records
a few steps of each model (after warm-up steps: in the first ones the heap is still growing and page faults land
in whichever kernel touches new memory), and each operator's own CPU time is summed into kinds: matrix products
(aten::mm/addmm/bmm), attention (SDPA's kernels), normalisation (RMSNorm, LayerNorm), the MLP's activation (SwiGLU,
GELU), RoPE, the loss, the clip and optimizer step (everything under them), and the rest (adds, copies,
concatenations, views, autograd's own work). Last, the bound this puts on fusing elementwise work: if everything
of ours but products and attention took no time, how much faster than the reference could our step be.
Profiling adds a little to every operator call, so the totals run a few percent over `pretrain_throughput.py`'s.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from cakelm import kernels
from cakelm.common import hardware_info, keep_freed_memory
from cakelm.losses import lm_loss
from cakelm.model import ModelConfig, Transformer
from cakelm.optim import OptimConfig, build_optimizers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_throughput import SHAPES, load_nanogpt, make_step, reference, reference_loss  # noqa: E402

# kind -> substrings of operator names (first match wins; the optimizer phase is found by its record_function)
KINDS = {
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention": ("scaled_dot_product",),
    "normalisation": ("RMSNorm", "layer_norm"),
    "activation": ("SwiGLU", "gelu", "silu"),
    "RoPE": ("RoPE",),
    "loss": ("CrossEntropy", "cross_entropy", "log_softmax", "nll_loss"),
}
ORDER = [*KINDS, "clip + optimizer", "other"]


def kind_of(name: str, phases: set[str]) -> str:
    """The kind of an operator by its name, or "clip + optimizer" when it ran inside make_step's phase of that
    name."""
    if "clip + optimizer" in phases:
        return "clip + optimizer"
    return next((k for k, keys in KINDS.items() if any(s in name for s in keys)), "other")


def profile_steps(step, steps: int) -> dict[str, float]:
    """ms per step of each kind over `steps` profiled steps."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ms: dict[str, float] = defaultdict(float)
    for e in prof.events():
        phases, p = set(), e.cpu_parent
        while p is not None:  # the record_function ranges this operator ran inside
            phases.add(p.name)
            p = p.cpu_parent
        if e.name in ("forward + backward", "clip + optimizer"):
            continue
        ms[kind_of(e.name, phases | {e.name})] += e.self_cpu_time_total / 1000 / steps
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="b", choices=list(SHAPES),
                    help="a: nanoGPT's CPU example, b: its shakespeare-char shape, cpu: our cpu preset")
    ap.add_argument("--nanogpt", type=Path, default=None, help="a nanoGPT checkout: profile its own model.py")
    ap.add_argument("--steps", type=int, default=0, help="profiled steps of each (default: 10 at a, 3 else)")
    ap.add_argument("--warmup", type=int, default=0, help="steps of each before (default: 20 at a, 4 else)")
    args = ap.parse_args()
    if args.steps < 0 or args.warmup < 0:
        raise SystemExit("step_profile: --steps and --warmup must be >= 0")
    keep_freed_memory()  # as the training loop does on CPU
    s = SHAPES[args.shape]
    B, T, V = s["batch"], s["max_seq_len"], s["vocab"]
    torch.manual_seed(0)
    x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    model = Transformer(ModelConfig(vocab_size=V, dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"],
                                    max_seq_len=T))
    # as pretrain_throughput.py: the cpu preset trains with Muon; at nanoGPT's shapes AdamW, as nanoGPT
    opt = build_optimizers(model, OptimConfig(name="muon" if args.shape == "cpu" else "adamw"), torch.device("cpu"))

    def ours_loss() -> torch.Tensor:
        total, n = lm_loss(model(x), y)
        return total / n
    nanogpt, ref_name = None, "our GPT-2-architecture reference (no --nanogpt given)"
    if args.nanogpt is not None:
        nanogpt, commit = load_nanogpt(args.nanogpt)
        ref_name = f"nanoGPT's model.py (commit {commit})"
    ref, ref_opt, _ = reference(s, nanogpt)
    steps = {"ours": make_step(ours_loss, model.parameters(), opt, torch.float32),
             "reference": make_step(lambda: reference_loss(ref, x, y, nanogpt), ref.parameters(), ref_opt,
                                    torch.float32)}
    n = args.steps or (10 if args.shape == "a" else 3)
    for _ in tqdm(range(args.warmup or (20 if args.shape == "a" else 4)), desc="warm-up", unit="step", leave=False):
        for step in steps.values():
            step()
    ms = {name: profile_steps(step, n)
          for name, step in tqdm(steps.items(), desc="profiling", unit="model", leave=False)}
    print(f"cpu: {hardware_info(torch.device('cpu'))['cpu']}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; shape {args.shape}: {s}")
    print(f"reference: {ref_name}; {n} profiled steps each, fp32; fused CPU kernels: "
          f"{'on' if kernels.lib() is not None else 'off (' + kernels.why() + ')'}")
    total = {name: sum(v.values()) for name, v in ms.items()}
    print(f"{'kind':<18}{'ours ms':>9}{'share':>7}{'ref ms':>9}{'share':>7}")
    for kind in ORDER:
        a, b = ms["ours"].get(kind, 0.0), ms["reference"].get(kind, 0.0)
        print(f"{kind:<18}{a:>9.2f}{a / total['ours']:>7.1%}{b:>9.2f}{b / total['reference']:>7.1%}")
    print(f"{'total':<18}{total['ours']:>9.2f}{1:>7.0%}{total['reference']:>9.2f}{1:>7.0%}")
    core = ms["ours"].get("matrix products", 0.0) + ms["ours"].get("attention", 0.0)
    print(f"reference / ours: {total['reference'] / total['ours']:.3f}x; products and attention are "
          f"{core / total['ours']:.1%} of ours: with the rest of ours at no time, at most "
          f"{total['reference'] / core:.2f}x")


if __name__ == "__main__":
    main()
