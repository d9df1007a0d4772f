"""Sharded training: FSDP2 (`torch.distributed.fsdp.fully_shard`) and the sharded optimizer state of its checkpoints
(`torch.distributed.checkpoint`, DCP). The shared loop (`cakelm.loop`) is the one caller.

    torchrun --nproc_per_node 2 -m cakelm pretrain --loop.parallel fsdp ...      # any training stage
    torchrun --nproc_per_node 4 -m cakelm sft --loop.parallel fsdp --lora.rank 16 ...

DDP (the default, `--loop.parallel ddp`) keeps a whole copy of the weights, gradients and optimizer state on every
process; FSDP keeps 1/N of each on each of N processes and all-gathers a block's weights just before it runs
(forward and backward), so a model whose training state does not fit on one device fits on several. With one
process there is nothing to shard: the model trains as usual (the loop prints a note), and its checkpoints still
keep the optimizer state in DCP's format, so such a run resumes on any number of processes.

What is sharded (`shard`): every Transformer block of every Transformer inside the trained module (the policy and
PPO's value model alike), each its own FSDP unit, then the trained module itself as the root unit (embedding,
final norm, output head, a scalar head). The frozen reference model and the reward model stay whole on every
process: they hold no gradients or optimizer state (a quarter of a trained model's bytes with AdamW, less in bf16),
and sharded they would make every reference or reward forward a collective that each rank must call equally
often, while each rank scores its own rollouts. With LoRA the frozen base weights are sharded with their blocks and
only the adapters train. Mixed precision (`MixedPrecisionPolicy`): with --loop.dtype bf16 the gathered weights
and the compute are bf16, gradients are reduced in fp32, and the shards the optimizer updates stay fp32;
otherwise all fp32.

Where the whole model is needed:
- evaluation and rollouts (`full_weights`): every unit is all-gathered once and runs without collectives, so each
  rank may make forward passes of its own number and shape (generation stops when its own replies end; held-out
  sets split over ranks unevenly). This holds the full weights for the duration, as generation needs anyway;
- checkpoints: `full_state_dict` gathers the fp32 weights onto rank 0's CPU, unit by unit, and `swapped` puts them
  in place of the shards while rank 0 writes model.safetensors (or a LoRA run's adapters, a scalar head, PPO's
  value model) exactly as an unsharded run does: `chat`, `serve`, `eval` and `export` read it in one process.

The optimizer state (`save_optimizers` / `load_optimizers`) is saved by every rank into one DCP directory, by
parameter name and global shape, so a run saved on 8 processes loads its state on 4 (DCP reads the pieces each
new shard needs). Only tensors go there; the optimizers' hyperparameters travel in train_state.pt. DCP's own
reader unpickles its metadata file, which could name any code; `SafeReader` allows only DCP's metadata classes
(files from elsewhere are data, never code).
"""

from __future__ import annotations

import io
import pickle
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from cakelm.common import CakeError, DistInfo, all_reduce_sum
from cakelm.model import Transformer

PARALLEL = ("ddp", "fsdp")


def shard(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Shard `model` in place with FSDP2 (see the module docstring): each Transformer block, then the root. Call it
    after the weights are loaded and before the optimizers are built (they must see the shards). Returns `model`,
    now also an FSDPModule."""
    # bf16: gather and compute in bf16, reduce gradients in fp32 (bf16 sums of many ranks lose bits); fp32 shards
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if dtype == torch.bfloat16 else MixedPrecisionPolicy()
    for m in list(model.modules()):
        if isinstance(m, Transformer):
            for block in m.layers:
                fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    # FSDP makes whichever unit runs first the root; a rollout may call a part of the model first (PPO's policy
    # inside the policy-and-value module), so settle the root now (FSDP2 has no public call for this)
    fully_shard.state(model)._lazy_init()  # type: ignore[attr-defined]
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def _units(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def full_weights(model: nn.Module) -> Iterator[None]:
    """Within the block every FSDP unit of `model` holds its whole weights (plain tensors, in the compute dtype) and
    forward passes run without collectives: a rank may run as many as it needs (evaluation, rollouts). Entering
    is one all-gather per unit, on every rank alike; a model that is not sharded is left as it is."""
    units = _units(model)
    for u in units:
        u.unshard()
    for u in units:  # else each unit would shard itself again after its forward, and gather again in the next
        u.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for u in units:
            u.reshard()
            u.set_reshard_after_forward(True)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (the tensor itself when it is not sharded)."""
    return t.to_local() if isinstance(t, DTensor) else t


def replicated(t: torch.Tensor) -> torch.Tensor:
    """A value every rank holds whole (a sharded model's gradient norm is a replicated DTensor) as a plain tensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def non_finite_parameter(model: nn.Module, info: DistInfo, sharded: bool) -> str | None:
    """The name of the first parameter holding NaN or inf, the same on every rank (None when all are finite).
    A sharded model checks each rank's shards and sums the verdicts over ranks (one all-reduce)."""
    named = list(model.named_parameters())
    if not named:
        return None
    bad = torch.stack([~torch.isfinite(local(p)).all() for _, p in named]).float()
    if sharded:
        bad = all_reduce_sum(bad, info)
    where = bad.nonzero()
    return named[int(where[0])][0] if len(where) else None


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole fp32 weights of a sharded `model`, gathered unit by unit onto rank 0's CPU (every rank must call it;
    the others get {})."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextmanager
def swapped(model: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block the parameters of `model` named in `weights` are those tensors (rank 0's gathered CPU copy)
    instead of their shards, so whatever reads the module (state_dict, a head's tensors) sees the whole weights.
    No forward may run inside. Parameters shared under two names (a tied output head) stay shared."""
    for u in _units(model):
        u.reshard()  # FSDP's state_dict hooks are then no-ops that would not re-register the shards
    saved: list[tuple[nn.Module, str, nn.Parameter]] = []
    replacement: dict[int, nn.Parameter] = {}
    try:
        for name, full in weights.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            old = owner._parameters.get(leaf)
            if old is None:
                continue  # a buffer: never sharded
            new = replacement.setdefault(id(old), nn.Parameter(full, requires_grad=False))
            saved.append((owner, leaf, old))
            owner._parameters[leaf] = new
        yield
    finally:
        for owner, leaf, old in reversed(saved):
            owner._parameters[leaf] = old


# ----------------------------------------------------------------------------------------------------------------
# The optimizer state in DCP


@contextmanager
def _one_process_is_fine() -> Iterator[None]:
    """DCP warns at every save and load without a process group (one process) that it assumes one process: it is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_optimizers(model: nn.Module, optimizers: list[torch.optim.Optimizer], path: Path) -> list[dict[str, Any]]:
    """Write the optimizers' tensors (moments, step counts), by parameter name, into the DCP directory `path`; every
    rank must call it (each writes its shards; it returns once all have written and fsynced). Returns the
    parameter groups (hyperparameters and parameter names), which go to train_state.pt."""
    state = get_optimizer_state_dict(model, optimizers)
    with _one_process_is_fine():
        dcp.save({"state": state["state"]}, storage_writer=dcp.FileSystemWriter(path, sync_files=True))
    return state["param_groups"]


def load_optimizers(model: nn.Module, optimizers: list[torch.optim.Optimizer], path: str | Path,
                    param_groups: list[dict[str, Any]]) -> None:
    """Load what `save_optimizers` wrote (on any number of processes) into the optimizers of `model` (sharded or
    not, built from the same parameters). Every rank must call it."""
    state = get_optimizer_state_dict(model, optimizers)  # the state's shapes and shards, to be filled in place
    try:
        with _one_process_is_fine():
            dcp.load({"state": state["state"]}, storage_reader=SafeReader(path))
        set_optimizer_state_dict(model, optimizers, {"state": state["state"], "param_groups": param_groups})
    except CheckpointException as e:  # (a BaseException) each rank's failure, with its traceback
        failure = next(iter(e.failures.values()))[0] if e.failures else e
        detail = next((line.strip() for line in str(failure).splitlines() if line.strip()), type(failure).__name__)
        raise CakeError(f"--resume: {path}: the saved optimizer state cannot be loaded ({detail[:400]})") from None
    except (KeyError, RuntimeError, ValueError) as e:  # set_optimizer_state_dict: groups of another optimizer
        raise CakeError(f"--resume: {path}: the saved optimizer state does not fit this run's optimizers "
                        f"({str(e).splitlines()[0][:300] if str(e) else type(e).__name__})") from None


# What a DCP metadata file may name: its own dataclasses, torch's sizes, dtypes and layouts, a path
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                   torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


class SafeReader(FileSystemReader):
    """DCP's file reader, but its .metadata file is unpickled with only DCP's metadata classes allowed, and every
    entry must be a tensor (DCP would torch.load other entries with weights_only=False)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        f = Path(self._get_metadata_path(kwargs.get("rank")))
        try:
            metadata = _MetadataUnpickler(io.BytesIO(f.read_bytes())).load()
        except OSError as e:
            raise CakeError(f"{f}: unreadable ({e.strerror or e})") from None
        except Exception as e:  # a crafted or torn file: pickle raises many types
            raise CakeError(f"{f}: not a checkpoint's metadata ({str(e)[:200] or type(e).__name__})") from None
        if not isinstance(metadata, Metadata) or not all(
                isinstance(v, TensorStorageMetadata) for v in metadata.state_dict_metadata.values()):
            raise CakeError(f"{f}: not a checkpoint's metadata of tensors")
        metadata.storage_meta = metadata.storage_meta or StorageMeta()  # as FileSystemReader does
        metadata.storage_meta.load_id = self.load_id
        return metadata
