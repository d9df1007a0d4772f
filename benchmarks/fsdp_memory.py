"""Per-rank training memory of DDP against FSDP2 (`--loop.parallel ddp|fsdp`): the bytes of parameters, gradients
and optimizer state each rank holds between two steps, counted from tensor storage (not RSS, which counts the
allocator's caches, the Python heap and the libraries too).

    python benchmarks/fsdp_memory.py                              # the 10m preset, vocabulary 8192, AdamW, 2 ranks
    python benchmarks/fsdp_memory.py --model gpt2-small --vocab 32000 --optim muon
    python benchmarks/fsdp_memory.py --model tiny --vocab 320     # seconds: a smoke run
    python benchmarks/fsdp_memory.py --ranks 4                    # 4 processes (memory, not speed: any core count)

Each mode runs in its own gloo job of --ranks processes on the CPU (`torch.multiprocessing.spawn`, no torchrun
needed): the model is built and wrapped as the shared loop does it (`DistributedDataParallel`, or
`cakelm.parallel.shard`), the optimizers as `cakelm.optim.build_optimizers` builds them, then two steps of forward,
backward and update run on random tokens, and after the second backward (gradients present, optimizer state made by
the first update) each rank counts the storages its parameters, gradients and optimizer state point at (each
storage once; a shard's padding counts, as it takes memory). What is not counted: DDP's gradient buckets (a second
copy of every gradient, on every rank: DDP's true cost is higher than shown), activations, and the whole weights
FSDP gathers block by block during the forward and backward passes (one block, or the root, at a time: transient).

With N ranks FSDP should hold about 1/N of DDP's bytes in each column (a few parameters smaller than N rows are
padded). One table is printed, with the CPU model and torch version; this measures memory, never time.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from cakelm.common import hardware_info  # noqa: E402
from cakelm.losses import lm_loss  # noqa: E402
from cakelm.model import PRESETS, ModelConfig, Transformer  # noqa: E402
from cakelm.optim import OptimConfig, build_optimizers  # noqa: E402
from cakelm.parallel import local, shard  # noqa: E402

COLUMNS = ("params", "grads", "optimizer")


def storage_bytes(tensors: list[torch.Tensor], seen: set[int]) -> int:
    """Bytes of the distinct storages behind `tensors` (a sharded tensor's local part), each counted once over all
    calls that share `seen`."""
    total = 0
    for t in tensors:
        s = local(t).untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def measure(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, int]:
    """This rank's bytes of parameters, gradients and optimizer state (see the module docstring)."""
    seen: set[int] = set()
    params = list(model.parameters())
    state = [v for o in optimizers for s in o.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {"params": storage_bytes(params, seen),
            "grads": storage_bytes([p.grad for p in params if p.grad is not None], seen),
            "optimizer": storage_bytes(state, seen)}


def worker(rank: int, world: int, mode: str, cfg: ModelConfig, optim: str, batch: int, port: int,
           results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model: nn.Module = Transformer(cfg)
        fwd: nn.Module = model
        if mode == "fsdp":
            shard(model, torch.float32)
        else:
            fwd = nn.parallel.DistributedDataParallel(model)
        optimizers = build_optimizers(model, OptimConfig(name=optim), torch.device("cpu"))
        gen = torch.Generator().manual_seed(rank)
        for step in range(2):
            ids = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len + 1), generator=gen)
            loss, _ = lm_loss(fwd(ids[:, :-1]), ids[:, 1:])
            loss.backward()
            if step == 0:
                for o in optimizers:
                    o.step()
                    o.zero_grad(set_to_none=True)
        row = measure(model, optimizers)
        torch.save(row, Path(results) / f"{mode}-{rank}.pt")
        dist.barrier()  # every collective of every rank done
        # DDP's reducer holds the process group: dropped here, while the group is still registered, it leaves the
        # group's destruction to destroy_process_group. Dropped last, at the function's exit, it destroyed the
        # group itself, joining gloo's worker thread while holding the GIL that thread was waiting for (a hang
        # seen once in CI: ProcessGroupGloo::~ProcessGroupGloo in Reducer::~Reducer).
        del fwd, model, optimizers
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cfg: ModelConfig, optim: str = "adamw", batch: int = 2, world: int = 2) -> dict[str, list[dict[str, int]]]:
    """{mode: [rank 0's bytes, rank 1's, ...]} for ddp and fsdp, each in its own `world`-process gloo job."""
    out: dict[str, list[dict[str, int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("ddp", "fsdp"):
            mp.spawn(worker, args=(world, mode, cfg, optim, batch, free_port(), tmp), nprocs=world)
            out[mode] = [torch.load(Path(tmp) / f"{mode}-{r}.pt", weights_only=True) for r in range(world)]
    return out


def table(results: dict[str, list[dict[str, int]]], cfg: ModelConfig, optim: str) -> str:
    with torch.device("meta"):  # (nothing allocated)
        params = Transformer(cfg).num_params()
    hw = hardware_info(torch.device("cpu"))
    lines = [f"# {hw['cpu']} ({platform.machine()}), torch {hw['torch']}; {params / 1e6:.2f}M parameters "
             f"({cfg.n_layers} layers, width {cfg.dim}, vocabulary {cfg.vocab_size}), {optim}, fp32, "
             f"{len(results['ddp'])} gloo ranks",
             f"{'mode':<6}{'rank':>5}" + "".join(f"{c + ' MB':>14}" for c in COLUMNS) + f"{'total MB':>12}"
             + f"{'vs ddp':>9}"]
    ddp_total = sum(results["ddp"][0].values())
    for mode, rows in results.items():
        for rank, row in enumerate(rows):
            total = sum(row.values())
            lines.append(f"{mode:<6}{rank:>5}" + "".join(f"{row[c] / 2**20:>14.2f}" for c in COLUMNS)
                         + f"{total / 2**20:>12.2f}{total / ddp_total:>9.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="10m", choices=sorted(PRESETS), help="model shape preset (cakelm.model)")
    ap.add_argument("--vocab", type=int, default=8192, help="vocabulary size")
    ap.add_argument("--optim", default="adamw", choices=("adamw", "muon"))
    ap.add_argument("--batch", type=int, default=2, help="rows per rank and step")
    ap.add_argument("--seq", type=int, default=0, help="context length (0: the preset's)")
    ap.add_argument("--ranks", type=int, default=2, help="processes per job")
    args = ap.parse_args()
    shape = {**PRESETS[args.model], **({"max_seq_len": args.seq} if args.seq else {})}
    cfg = ModelConfig(vocab_size=args.vocab, **shape)
    if args.ranks < 2:
        ap.error("--ranks must be at least 2 (one process shards nothing)")
    print(table(run(cfg, args.optim, args.batch, args.ranks), cfg, args.optim))


if __name__ == "__main__":
    main()
