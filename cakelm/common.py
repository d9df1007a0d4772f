"""Shared plumbing: errors, the cache directory, device/dtype choice, torch.distributed set-up, seeding,
rank-0 printing and atomic file writes. Everything here is small and used by every stage."""

from __future__ import annotations

import ctypes
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


class CakeError(Exception):
    """A user-facing error: bad input, a missing file, an impossible option. The CLI prints its message as one
    line (no traceback); the message must name what was wrong and where (file, line, option)."""


def cakelm_home() -> Path:
    """The download/data cache: `$CAKELM_HOME`, default `~/.cache/cakelm`."""
    return Path(os.environ.get("CAKELM_HOME") or Path.home() / ".cache" / "cakelm")


# ----------------------------------------------------------------------------------------------------------------
# Devices and precision


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else mps, else cpu. An unavailable explicit device is a CakeError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CakeError("--device cuda: no CUDA GPU is available on this machine")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CakeError("--device mps: MPS is not available on this machine")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """Compute dtype for autocast. 'auto' is bf16 on CUDA GPUs that support it and fp32 elsewhere: on CPU bf16
    matmuls are ~25x slower than fp32 on the AVX2 machines we target."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def bf16_speedup(shapes: Sequence[tuple[int, int, int]], device: torch.device, budget_mb: int = 64,
                 repeats: int = 3) -> float:
    """How much faster bf16 matmuls run than fp32 ones on `device`: the smallest, over `shapes` (M, K, N), of
    fp32 time / bf16 time for x (M, K) @ W (K, N), each the best of `repeats` passes over enough distinct W to fill
    `budget_mb` of fp32 (at most 256 of them; so a matrix-vector product streams its weights from memory, as a
    decode step does, instead of reading one W from cache). A probe of a few hundred ms: what the hardware does
    is measured, not guessed from CPU flags (bf16 units, AVX512-BF16 and AMX make bf16 faster; AVX2 alone makes
    it ~25x slower)."""
    worst = float("inf")
    for M, K, N in shapes:
        count = min(256, max(1, budget_mb * 2**20 // (4 * K * N)))
        times = {}
        for dtype in (torch.float32, torch.bfloat16):
            ws = [torch.randn(K, N, device=device).to(dtype) for _ in range(count)]
            x = torch.randn(M, K, device=device).to(dtype)
            best = float("inf")
            for _ in range(repeats + 1):  # the first pass warms up
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                for w in ws:
                    x @ w
                if device.type == "cuda":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t)
            times[dtype] = best
        worst = min(worst, times[torch.float32] / times[torch.bfloat16])
    return worst


def pick_inference_dtype(name: str, device: torch.device, dim: int, ffn_dim: int) -> tuple[torch.dtype, str]:
    """(dtype to hold a model's weights in for generation, why). 'fp32' and 'bf16' are taken as given; 'auto' is
    bf16 on CUDA GPUs that support it, and on a CPU when a probe (`bf16_speedup`) shows bf16 matmuls of the model's
    decode shape (8 rows) and prefill shape (256 rows) at least 1.1x faster than fp32; fp32 elsewhere. Half the
    bytes per weight halves what a decode step reads, which bounds its speed."""
    if name != "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[name], f"--dtype {name}"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "a CUDA GPU with bf16"
        return torch.float32, "a CUDA GPU without bf16"
    if device.type != "cpu":
        return torch.float32, f"{device.type}: fp32"
    speedup = bf16_speedup([(8, dim, ffn_dim), (256, dim, ffn_dim)], device)
    if speedup >= 1.1:
        return torch.bfloat16, f"bf16 matmuls of this model's shapes ran at least {speedup:.1f}x faster than fp32 here"
    return torch.float32, f"bf16 matmuls of this model's shapes ran only {speedup:.2f}x the speed of fp32 here"


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    A CPU training step allocates and frees the same large activation buffers every step. By default glibc serves
    big blocks with mmap and unmaps them on free, so every step page-faults its memory back in (~800k faults per
    step of the tiny model: ~12% of its step time, measured). Raising the mmap and trim thresholds makes the
    buffers come from the heap and stay there; peak memory grows by a few percent. Linux/glibc only; a no-op
    (returning False) elsewhere."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, (1 << 31) - 1))


# ----------------------------------------------------------------------------------------------------------------
# Distributed


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a torchrun job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    """Initialise torch.distributed when launched by torchrun (env RANK/WORLD_SIZE set); gloo on CPU, nccl on
    CUDA. Returns the process's DistInfo and device. Safe to call twice."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistInfo(), pick_device(device_name)
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op in a single process)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_object(obj: Any, info: DistInfo) -> list[Any] | None:
    """Every rank's `obj` (picklable), as a list by rank on rank 0 (None elsewhere); [obj] in one process."""
    if not info.enabled:
        return [obj]
    out: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def print0(*args: Any, info: DistInfo | None = None, **kwargs: Any) -> None:
    """print on rank 0 only (reads the env when no DistInfo is given)."""
    rank = info.rank if info is not None else int(os.environ.get("RANK", 0))
    if rank == 0:
        print(*args, **kwargs, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Reproducibility


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_of(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, rollout phase, prompt index...): independent streams for every
    combination, the same on every machine (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def code_version() -> str:
    """`cakelm <version>+<git sha>[-dirty]` when run from a git checkout, else the package version."""
    from cakelm import __version__

    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", ""
    return f"{__version__}+{sha}{'-dirty' if dirty else ''}" if sha else __version__


def peak_memory_mb() -> float:
    """Peak resident memory of this process (MB), or the CUDA allocator's peak when on a GPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 1024 if sys.platform != "darwin" else rss / 2**20
    except ImportError:  # pragma: no cover - Windows
        return float("nan")


def cpu_has_bf16_matrix_units() -> bool | None:
    """Whether this CPU has bf16 matrix units (Intel AMX: the `amx_bf16` flag in /proc/cpuinfo), or None where the
    flags cannot be read (not Linux, or a CPU that lists "Features" instead). AVX512-BF16 (Zen 4) is a vector dot
    product, not a matrix unit."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return "amx_bf16" in line.split(":", 1)[-1].split()
    return None


def hardware_info(device: torch.device | None = None) -> dict[str, Any]:
    """What a measurement ran on, for reports: CPU model, cores, torch version and threads, device (and GPU)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = device or pick_device("auto")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "device": device.type, "gpu": gpu,
            "python": platform.python_version()}


def matmul_gflops(device: torch.device | None = None, n: int = 1024, repeats: int = 5) -> float:
    """The best fp32 speed of an n x n matrix product on `device` over a few timed runs, in GFLOP/s: how fast this
    machine is at this minute. Shared VMs of one CPU model differ and drift (pretraining's tokens/s varied by 1.5x
    between runs of one command on one kind), so a time is read against the probe measured with it."""
    device = device or torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):  # the first products of a process also start its thread pool
        a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(2):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - t) / 2)
    return 2 * n**3 / best / 1e9


def describe_speed(speed: dict[str, float]) -> str:
    """A run's `matmul_gflops` probes ({"start": ..., "end": ...}, as pipeline.json holds them) in words:
    "fp32 matmul 121 GFLOP/s at the start, 124 at the end"; "" when there are none. A pipeline.json is a file
    anyone may edit: values that are not finite positive numbers are left out, not formatted (or raised on)."""
    speed = speed if isinstance(speed, dict) else {}
    found = [k for k in ("start", "end") if isinstance(speed.get(k), (int, float)) and 0 < speed[k] < math.inf]
    parts = [f"{speed[k]:.0f}{' GFLOP/s' if not i else ''} at the {k}" for i, k in enumerate(found)]
    return "fp32 matmul " + ", ".join(parts) if parts else ""


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes: write a temp file in the same directory, fsync, rename. A crash leaves the old file or the new
# one, never half of either.


def fsync_path(path: str | Path) -> None:
    """Flush a file (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (/proc), since setting it to read it
    races with other threads creating files."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | Path) -> None:
    """Give a file the mode a plain open() would (0o666 & ~umask). Writers that go through a temporary file
    create it owner-only: mkstemp, and safetensors' save_file (0.7+)."""
    os.chmod(path, 0o666 & ~current_umask())


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is fsynced and renamed onto `path`. The file gets
    the mode a plain open() would give (0o666 & ~umask), not mkstemp's 0o600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    honour_umask(tmp)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        fsync_path(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def finite_json(obj: Any) -> Any:
    """`obj` as strict JSON can hold it: non-finite floats (NaN, inf) become None, inside lists and dicts too.
    Dump the result with allow_nan=False, so a bare NaN (which JSON readers other than Python's reject) never
    reaches a file."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path, what: str = "file") -> Any:
    """Load JSON with a one-line CakeError for missing, non-UTF-8 or malformed files."""
    p = Path(path)
    if not p.is_file():
        raise CakeError(f"{what} not found: {p}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CakeError(f"{p}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise CakeError(f"{p}: invalid JSON at line {e.lineno}: {e.msg}") from None
