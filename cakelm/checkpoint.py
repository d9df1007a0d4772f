"""Checkpoints: self-describing directories, saved all-or-nothing.

What readers see (every consumer, and Hugging Face tools, open these names):

    CKPT/
      model.safetensors   weights (fp32 unless saved otherwise); metadata {"step": ...}
      config.json         ModelConfig
      tokenizer.json      the tokenizer the model was trained with
      tokenizer_config.json  (imported models) the chat template and special tokens of a foreign vocabulary
      meta.json           {"stage", "step", "complete", "config" (resolved stage config), "metrics",
                           "code_version", "parent" (checkpoint this one started from), ...}
      train_state.pt      optimizer state, step, RNG states: what `--resume` needs for an exact continuation
                          (plain tensors, numbers and strings: it loads with torch.load(weights_only=True))
      heads.safetensors   (reward models and PPO) extra tensors beside the Transformer: the scalar head, the
                          value model; see `cakelm.rlhf`
      optimizer/          (runs with --loop.parallel fsdp) the optimizer state, in `torch.distributed.checkpoint`'s
                          format, one file per rank that saved it, by parameter name: any number of processes
                          resumes from it (see `cakelm.parallel`); train_state.pt then holds the rest

A LoRA checkpoint (`--lora.rank`, see `cakelm.lora`) holds adapter_model.safetensors and adapter_config.json (PEFT's
files) instead of model.safetensors, and meta.json's "lora_base" names the checkpoint the adapters go on (with the
sha256 of its weights file, checked at load: adapters on another model would be silently wrong). `load_model` loads
the base (itself perhaps a LoRA checkpoint: a chain of stages) and merges the adapters in; training stages that
go on with the same adapters load them unmerged.

How it is stored: each save is a complete version in a hidden directory, `CKPT/.ckpt-000007-step-30/`; the
relative symlink `CKPT/current` points at the live version, and each name above is a relative symlink
`NAME -> current/NAME` (metrics.jsonl and other files of the run are plain files beside them). A save writes and
fsyncs every file of the new version, fsyncs its directory and CKPT, then switches `current` with one atomic
rename of a symlink, so at every instant CKPT reads as the old complete checkpoint or the new one: a name the live
version lacks is a dangling link, which reads as missing. Older versions are removed only after the switch (the
newest `keep` stay); leftovers of a save cut off before its switch are removed by the next save. A directory in
the old layout (plain files) is first adopted as a version with the same content (hard links), so converting it
is just as safe. The weights, meta.json and train_state.pt all carry the step, and loading cross-checks them.
POSIX only (symlinks, directory fsync); Windows is not a target.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from cakelm.common import CakeError, code_version, finite_json, fsync_path, honour_umask, read_json
from cakelm.config import describe_differences, differing
from cakelm.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_config,
    adapter_shapes,
    adapter_tensors,
    add_lora,
    config_from_adapter,
    has_lora,
    load_adapters,
    lora_config_of,
    merge_lora,
)
from cakelm.model import ModelConfig, Transformer, check_layer_count, param_shapes
from cakelm.tokenizer import CAKELM_TEMPLATE, CONFIG_FILE, Tokenizer

FILES = ("model.safetensors", "config.json", "tokenizer.json", "meta.json")  # (a LoRA one: adapters, not weights)
OPTIONAL = ("train_state.pt", "heads.safetensors", CONFIG_FILE, ADAPTER_WEIGHTS, ADAPTER_CONFIG,  # the other names
            "optimizer")  # (a directory)
OPTIMIZER_DIR = "optimizer"
STAGING = ".optimizer-staging-"  # where the ranks of a sharded run write their optimizer state before a save
CURRENT = "current"
LOCK = ".lock"  # held while a save is under way (fcntl.flock)
_VERSION = re.compile(r"^\.ckpt-(\d+)-")


def _missing(path: Path) -> list[str]:
    """The files a checkpoint needs that `path` lacks (a LoRA checkpoint has its adapters instead of weights)."""
    weights = [ADAPTER_WEIGHTS, ADAPTER_CONFIG] if (path / ADAPTER_WEIGHTS).is_file() else [FILES[0]]
    return [f for f in (*weights, *FILES[1:]) if not (path / f).is_file()]


def is_checkpoint(path: str | Path) -> bool:
    return not _missing(Path(path))


def weights_file(path: str | Path) -> Path:
    """The file that holds a checkpoint's trained tensors: its adapters (LoRA) or its weights."""
    path = snapshot(path)
    return path / ADAPTER_WEIGHTS if (path / ADAPTER_WEIGHTS).is_file() else path / "model.safetensors"


def weights_digest(path: str | Path) -> str:
    """`tensors_digest` of a checkpoint's weights file: what a LoRA checkpoint records of its base."""
    return tensors_digest(weights_file(path))


MAX_HEADER = 100 << 20  # the largest safetensors header the format allows (safetensors' own limit)


def tensors_digest(file: str | Path) -> str:
    """sha256 of what a safetensors file holds: its JSON header with the keys sorted, then its data bytes.
    safetensors writes the header's metadata in a hash map's order, which changes from process to process, so
    two saves of the same tensors make files whose plain sha256 differ (seen: a DPO model retrained bit for bit);
    this digest does not, and any changed tensor, name, shape or metadata value changes it."""
    try:
        with open(file, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n <= min(size - 8, MAX_HEADER):
                raise CakeError(f"{file}: not a safetensors file (a header of {n} bytes in a file of {size})")
            header = json.loads(fh.read(n))
            digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except (OSError, ValueError) as e:  # ValueError: a header that is not JSON (or not UTF-8)
        raise CakeError(f"{file}: unreadable weights ({e})") from None
    return digest.hexdigest()


def file_sha256(file: str | Path) -> str:
    """The plain sha256 of a file (what LoRA checkpoints recorded of their base before `tensors_digest`)."""
    with open(file, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def snapshot(path: str | Path) -> Path:
    """The directory that holds one complete version of the checkpoint in `path`: the version `current` points at
    now (resolved once, so a reader that opens several files gets them all from the same save, even while a new
    one is being switched in), or `path` itself in the plain-file layout. A `current` whose version is missing
    (the checkpoint was copied without its hidden .ckpt-* directories) is a one-line error."""
    path = Path(path)
    link = path / CURRENT
    if not link.is_symlink():
        return path
    target = path / os.readlink(link)
    if not target.is_dir():
        raise CakeError(f"{path}: its data is missing ({CURRENT} -> {os.readlink(link)}, which is not there): the "
                        "checkpoint was copied without its hidden .ckpt-* directory; copy the whole directory "
                        "(cp -a SRC DEST)")
    return target


def _weights(model: Transformer) -> dict[str, torch.Tensor]:
    """State dict for saving: on CPU, contiguous, and with a tied output head stored once (as the embedding)."""
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight")
    return sd


def _versions(out: Path) -> dict[int, Path]:
    """The version directories in `out`, by sequence number."""
    found = {}
    for p in out.iterdir():
        m = _VERSION.match(p.name)
        if m and p.is_dir() and not p.is_symlink():
            found[int(m.group(1))] = p
    return found


def _live(out: Path) -> int | None:
    """The sequence number of the version `current` points at (None: no versioned checkpoint)."""
    link = out / CURRENT
    if not link.is_symlink():
        return None
    m = _VERSION.match(os.readlink(link))
    return int(m.group(1)) if m else None


def _link(path: Path, target: str) -> None:
    """Make `path` a symlink to `target`, replacing what is there in one atomic rename."""
    if path.is_symlink() and os.readlink(path) == target:
        return
    tmp = path.with_name(f".{path.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, path)


def _remove(version: Path) -> None:
    """Delete a version directory that no reader can reach (renamed first, so a cut-off delete leaves nothing
    that looks like a version)."""
    trash = version.with_name(f".trash{version.name}")
    shutil.rmtree(trash, ignore_errors=True)  # the remains of an earlier cut-off delete of the same name
    os.replace(version, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _tidy(out: Path, keep: int) -> None:
    """Remove what no reader can reach: versions newer than the live one (a save cut off before its switch), the
    live one's predecessors beyond the newest `keep` versions, temporary links and half-deleted versions."""
    live = _live(out)
    versions = _versions(out)
    kept = sorted((s for s in versions if live is not None and s <= live), reverse=True)[:keep]
    for seq, p in versions.items():
        if seq not in kept:
            _remove(p)
    for p in out.iterdir():
        if p.name.startswith(".trash.ckpt-") or (p.name.endswith(".link.tmp") and p.is_symlink()):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink()


def _new_version(out: Path, label: str) -> Path:
    seq = max([*_versions(out), _live(out) or 0], default=0) + 1
    version = out / f".ckpt-{seq:06d}-{label}"
    version.mkdir()  # mode 0o777 & ~umask
    return version


def _adopt_plain_files(out: Path) -> None:
    """Convert the old layout (the checkpoint's files lie in `out` itself) into a live version with the same
    content: hard-link (or copy) every file a reader sees into a version directory, point `current` at it,
    then swap each plain file for a link to its identical twin. Readers see the old checkpoint throughout."""
    names = [n for n in (*FILES, *OPTIONAL) if (out / n).is_file()]
    plain = [n for n in names if not (out / n).is_symlink()]
    current = out / CURRENT
    if not plain and (current.is_symlink() or not current.exists()):
        return
    if current.exists() and not current.is_symlink() and not is_checkpoint(current):
        raise CakeError(f"{out}/{CURRENT} is not a checkpoint version, and saving here would replace it: move it "
                        "away or save elsewhere")
    version = _new_version(out, "adopted")
    for name in names:
        src = (out / name).resolve()
        try:
            os.link(src, version / name)
        except OSError:  # a file system without hard links
            shutil.copy2(src, version / name)
        fsync_path(version / name)
    fsync_path(version)
    fsync_path(out)
    if current.exists() and not current.is_symlink():  # a copy of a checkpoint made without keeping links
        os.replace(current, out / f".trash{version.name}")  # removed by _tidy
    _link(current, version.name)
    fsync_path(out)
    for name in plain:
        _link(out / name, f"{CURRENT}/{name}")
    fsync_path(out)


def save_checkpoint(out: str | Path, model: Transformer, tokenizer: Tokenizer, meta: dict[str, Any],
                    train_state: dict[str, Any] | None = None, heads: dict[str, torch.Tensor] | None = None,
                    keep: int = 1, optimizer_dir: str | Path | None = None) -> Path:
    """Write (or replace) the checkpoint in directory `out`, all-or-nothing (see the module docstring).
    `meta` must hold at least "stage" and "step". `heads` are tensors saved beside the model in
    heads.safetensors (a scalar head, a value model), with the same step. `keep`: how many complete versions
    stay on disk after the switch, the new one included (older ones are only a manual fallback).
    `optimizer_dir`: a directory in `out` that every rank of a sharded run has written (and fsynced) its optimizer
    state into; it is moved into the new version as optimizer/ before the switch."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    step = int(meta["step"])
    writers: dict[str, Callable[[Path], object]] = {}
    if has_lora(model):  # only the adapters; meta["lora_base"] says where the rest is
        base = meta["lora_base"]["path"]
        writers[ADAPTER_WEIGHTS] = lambda p: save_file(adapter_tensors(model), str(p),
                                                       metadata={"step": str(step), "format": "pt"})
        writers[ADAPTER_CONFIG] = lambda p: p.write_text(json.dumps(adapter_config(lora_config_of(model), base),
                                                                    indent=2) + "\n")
    else:
        writers["model.safetensors"] = lambda p: save_file(_weights(model), str(p),
                                                           metadata={"step": str(step), "format": "pt"})
    if heads is not None:
        writers["heads.safetensors"] = lambda p: save_file(
            {k: v.detach().to("cpu").contiguous() for k, v in heads.items()}, str(p),
            metadata={"step": str(step), "format": "pt"})
    writers["config.json"] = lambda p: p.write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    writers["tokenizer.json"] = tokenizer.save
    if tokenizer.template != CAKELM_TEMPLATE:  # an imported vocabulary: its chat template travels with it
        writers[CONFIG_FILE] = lambda p: p.write_text(json.dumps(tokenizer.config(), indent=2) + "\n",
                                                      encoding="utf-8")
    if train_state is not None:
        writers["train_state.pt"] = lambda p: torch.save({**train_state, "step": step}, p)
    if optimizer_dir is not None:
        staged = Path(optimizer_dir)
        writers[OPTIMIZER_DIR] = lambda p: os.replace(staged, p)  # the same file system: a rename
    writers["meta.json"] = _meta_writer({"code_version": code_version(), **meta})
    with _saving(out):
        _write_version(out, writers, f"step-{step}", keep)
        for p in out.glob(f"{STAGING}*"):  # what saves cut off before their switch left
            shutil.rmtree(p, ignore_errors=True)
    return out


@contextmanager
def _saving(out: Path) -> Iterator[None]:
    """One save at a time into `out`: a second process saving into the same directory is refused, since each
    save tidies away versions it did not write."""
    with open(out / LOCK, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CakeError(f"{out}: another process is saving a checkpoint there right now; give each run its "
                            "own --out") from None
        yield  # the lock goes with the file's closing, also when the process dies


def _meta_writer(meta: dict[str, Any]) -> Callable[[Path], object]:
    # strict JSON: the metrics of a skipped (non-finite) step are null
    return lambda p: p.write_text(json.dumps(finite_json(meta), indent=2, sort_keys=True, allow_nan=False) + "\n",
                                  encoding="utf-8")


def _write_version(out: Path, writers: dict[str, Callable[[Path], object]], label: str, keep: int) -> None:
    """Write a complete version of the checkpoint with `writers` (file name -> function writing it), then switch
    `current` to it: the steps of the module docstring. The caller holds the lock."""
    _tidy(out, keep=len(_versions(out)))  # only leftovers of a save cut off before its switch
    _adopt_plain_files(out)
    version = _new_version(out, label)
    for name, write in writers.items():  # 1. the new version, complete and on disk, where no reader looks
        write(version / name)
        if not (version / name).is_dir():  # (a directory's files are fsynced by its writer)
            honour_umask(version / name)
        fsync_path(version / name)
    fsync_path(version)
    for name in writers:  # 2. its names, reading through `current` (a name the old version lacks reads as missing)
        _link(out / name, f"{CURRENT}/{name}")
    fsync_path(out)
    _link(out / CURRENT, version.name)  # 3. the switch: one atomic rename
    fsync_path(out)
    for name in (*FILES, *OPTIONAL):  # 4. names the new version lacks (dangling, so already missing) go
        p = out / name
        if name not in writers and p.is_symlink() and os.readlink(p) == f"{CURRENT}/{name}":
            p.unlink()
    _tidy(out, max(1, keep))


def update_meta(path: str | Path, **fields: Any) -> None:
    """Add `fields` to a checkpoint's meta.json the way a save would: a new version whose other files are hard
    links to the live version's, switched in atomically."""
    out = Path(path)
    with _saving(out):
        _adopt_plain_files(out)
        live = snapshot(out)
        meta = load_meta(live)

        def same_file(src: Path) -> Callable[[Path], object]:
            def link(s: str | Path, d: str | Path) -> None:
                try:
                    os.link(s, d)
                except OSError:  # a file system without hard links
                    shutil.copy2(s, d)

            def write(dst: Path) -> None:
                if src.is_dir():  # the sharded optimizer state: its files, linked one by one
                    shutil.copytree(src, dst, copy_function=link)
                else:
                    link(src, dst)
            return write

        writers = {n: same_file(live / n) for n in (*FILES, *OPTIONAL) if n != "meta.json" and (live / n).exists()}
        writers["meta.json"] = _meta_writer({**meta, **fields})
        _write_version(out, writers, f"step-{meta['step']}", keep=1)


def load_meta(path: str | Path) -> dict[str, Any]:
    """meta.json of a checkpoint, checked against the weights' step."""
    if not str(path):
        raise CakeError("no checkpoint directory given")
    if not Path(path).is_dir():
        raise CakeError(f"checkpoint not found: {path}")
    path = snapshot(path)
    missing = _missing(path)
    if missing:
        raise CakeError(f"{path}: not a cakelm checkpoint (missing {', '.join(missing)})")
    meta = read_json(path / "meta.json", "checkpoint metadata")
    try:
        with safe_open(str(weights_file(path)), framework="pt") as fh:
            saved_step = (fh.metadata() or {}).get("step")
    except (SafetensorError, OSError) as e:
        raise CakeError(f"{weights_file(path)}: unreadable weights ({e})") from None
    if saved_step is not None and int(saved_step) != int(meta.get("step", -1)):
        raise CakeError(f"{path}: weights are from step {saved_step} but meta.json says step {meta.get('step')}: "
                        "files of two saves (a save of an older cakelm that was cut off, or files replaced by hand)")
    return meta


def load_model_config(path: str | Path) -> ModelConfig:
    d = read_json(Path(path) / "config.json", "model config")
    from cakelm.config import config_from_dict

    return config_from_dict(ModelConfig, d, f"{path}/config.json")


def load_model(path: str | Path, device: torch.device | str = "cpu", merge: bool = True
               ) -> tuple[Transformer, Tokenizer, dict]:
    """(model on `device` in eval mode, tokenizer, meta) from a checkpoint directory. The weights' names and
    shapes are checked against config.json before anything is allocated (config.json may come from elsewhere).
    A LoRA checkpoint's adapters are merged into the base's weights, or with `merge=False` kept as adapters (frozen
    base, trainable adapters: a stage going on with them)."""
    path = snapshot(path)  # every file from the same save
    meta = load_meta(path)
    cfg = load_model_config(path)
    model = _weights_of(path, meta, cfg, merge)
    tok = Tokenizer.load(Path(path) / "tokenizer.json")
    if tok.vocab_size > cfg.vocab_size:
        raise CakeError(f"{path}: tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size}")
    return model.to(device).eval(), tok, meta


_MAX_CHAIN = 16  # LoRA checkpoints on LoRA checkpoints (sft -> dpo -> grpo ...); more means a loop


def _weights_of(path: Path, meta: dict[str, Any], cfg: ModelConfig, merge: bool, depth: int = 0) -> Transformer:
    """The Transformer of a checkpoint version: its weights, or its base's (merged, when the base is itself a LoRA
    checkpoint) with its adapters, merged in or kept (`merge`)."""
    if not (path / ADAPTER_WEIGHTS).is_file():
        return _full_model(path, cfg)
    base_info = meta.get("lora_base")
    if not (isinstance(base_info, dict) and isinstance(base_info.get("path"), str)):
        raise CakeError(f"{path}: LoRA adapters without meta.json's lora_base (the checkpoint they go on)")
    if depth >= _MAX_CHAIN:
        raise CakeError(f"{path}: more than {_MAX_CHAIN} LoRA checkpoints in a chain of bases (a loop?)")
    base = Path(base_info["path"])
    if not is_checkpoint(base):
        raise CakeError(f"{path}: the base checkpoint of its LoRA adapters, {base}, is missing")
    recorded = base_info.get("weights_sha256")
    if weights_digest(base) != recorded and file_sha256(weights_file(base)) != recorded:  # (or as recorded before)
        raise CakeError(f"{path}: its base checkpoint {base} has changed since the adapters were trained (its "
                        "weights' sha256 differs); restore that base, or train the adapters again")
    base = snapshot(base)
    if load_model_config(base) != cfg:
        raise CakeError(f"{path}: config.json differs from its base {base}'s")
    lcfg = config_from_adapter(read_json(path / ADAPTER_CONFIG, "LoRA adapter config"), path / ADAPTER_CONFIG)
    model = _weights_of(base, load_meta(base), cfg, merge=True, depth=depth + 1)
    f = path / ADAPTER_WEIGHTS  # its header checked before a crafted rank allocates anything
    _check_shapes(f, adapter_shapes(model, lcfg), _header_shapes(f, "adapters"), "adapters", ADAPTER_CONFIG)
    add_lora(model, lcfg)
    load_adapters(model, load_file(str(f)), f)
    if merge:
        merge_lora(model)
        model.requires_grad_(True)  # as a model loaded from its weights
    return model


def _full_model(path: Path, cfg: ModelConfig) -> Transformer:
    check_weight_shapes(path / "model.safetensors", cfg)
    model = Transformer(cfg)
    sd = load_file(str(Path(path) / "model.safetensors"))
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed.weight"]
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise CakeError(f"{path}: weights do not match config.json ({detail[:300]})") from None
    return model


def check_weight_shapes(weights: Path, cfg: ModelConfig) -> None:
    """The tensors a model of `cfg` has, by name and shape (built on the meta device: nothing allocated), equal
    those in the safetensors file's header; a one-line error naming the first difference otherwise."""
    have = _header_shapes(weights, "weights")
    # first, so a config.json of a billion layers does not build a billion modules
    check_layer_count(have, r"layers\.(\d+)\.", cfg.n_layers, "config.json's n_layers", weights)
    want = param_shapes(cfg)
    if cfg.tie_embeddings:
        want.pop("lm_head.weight")
    _check_shapes(weights, want, have, "weights", "config.json")


def _header_shapes(f: Path, what: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, from its header (nothing loaded)."""
    try:
        with safe_open(str(f), framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except (SafetensorError, OSError) as e:
        raise CakeError(f"{f}: unreadable {what} ({e})") from None


def _check_shapes(f: Path, want: dict[str, tuple[int, ...]], have: dict[str, tuple[int, ...]], what: str,
                  source: str) -> None:
    """The tensors of file `f` (`have`, from its header) are exactly `want` (what `source` makes); a one-line error
    naming the first difference otherwise."""
    for name in sorted(set(want) | set(have)):
        if want.get(name) != have.get(name):
            raise CakeError(f"{f}: {what} do not match {source} ({name}: {source} makes "
                            f"{want.get(name, 'no such tensor')}, the file holds {have.get(name, 'none')})")


def load_heads(path: str | Path) -> dict[str, torch.Tensor]:
    """The extra tensors of a checkpoint (heads.safetensors), checked to be from the weights' step."""
    path = snapshot(path)
    meta = load_meta(path)
    f = path / "heads.safetensors"
    if not f.is_file():
        raise CakeError(f"{path}: no heads.safetensors (a {meta.get('stage', '?')} checkpoint, not a reward model)")
    try:
        with safe_open(str(f), framework="pt") as fh:
            step = (fh.metadata() or {}).get("step")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as e:
        raise CakeError(f"{f}: unreadable ({e})") from None
    if step is not None and int(step) != int(meta.get("step", -1)):
        raise CakeError(f"{f}: from step {step} but meta.json says step {meta.get('step')} (a save was cut off)")
    return tensors


def load_train_state(path: str | Path) -> dict[str, Any]:
    """The optimizer/loop state saved with a checkpoint, checked to be from the same step as its weights."""
    path = snapshot(path)
    p = path / "train_state.pt"
    if not p.is_file():
        raise CakeError(f"--resume: {path} has no train_state.pt (it was saved without optimizer state)")
    try:
        # data, never code: the file may come from elsewhere, and a pickle can run anything it names
        state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")
        raise CakeError(f"{p}: unreadable, or holds more than tensors and plain data (refused without running it: "
                        f"{detail[:200]})") from None
    except Exception as e:  # torch raises many types for a corrupt file
        raise CakeError(f"{p}: unreadable ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    step = load_meta(path)["step"]
    if not isinstance(state, dict) or state.get("step") != step:
        raise CakeError(f"{p} is from step {state.get('step') if isinstance(state, dict) else '?'} but the "
                        f"weights are from step {step}: files of two saves")
    if "optimizer_groups" in state:  # a sharded run's: its optimizer state lies beside it, in the same version
        if not (path / OPTIMIZER_DIR).is_dir():
            raise CakeError(f"--resume: {path} has no {OPTIMIZER_DIR}/ (the sharded optimizer state of its run)")
        state["optimizer_dir"] = str(path / OPTIMIZER_DIR)
    return state


# Options that may change when a run is resumed: how long it runs and how it reports, not what it computes.
RESUMABLE = {"resume", "overwrite", "loop.max_steps", "loop.eval_every", "loop.eval_tokens", "loop.log_every",
             "loop.save_every", "loop.progress", "loop.log_to", "loop.device", "loop.grad_checkpoint", "out",
             # when a run stops on trouble, not what it computes (options newer than a saved run are never
             # compared: config.differing)
             "loop.max_skipped", "reward_timeout", "reward_errors"}


def check_same_run(saved: dict, now: dict, out: Path) -> None:
    """--resume continues the saved run, so the options that shape it must match; say which ones do not."""
    diff = differing(saved, now, RESUMABLE)
    if diff:
        raise CakeError(f"--resume: options differ from the run saved in {out}: "
                        f"{describe_differences(diff, saved, now)}; pass the same options "
                        "(see its meta.json) or use --overwrite to start over")


def resume_point(out: Path, resume: bool, overwrite: bool, max_steps: int, config: dict) -> str:
    """How a training stage starts in `out`: "done" (--resume of a complete run), "resume" (continue the
    checkpoint there, whose options must equal `config`) or "fresh". Refuses to silently replace a checkpoint."""
    if out.is_dir():
        snapshot(out)  # a checkpoint copied without its data is an error, not "no checkpoint: start afresh"
    if resume and is_checkpoint(out):
        meta = load_meta(out)
        if meta.get("complete") and meta["step"] >= max_steps:
            return "done"
        if meta["step"] >= max_steps:
            raise CakeError(f"--resume: {out} is at step {meta['step']}; --max-steps {max_steps} must be larger "
                            "to continue")
        check_same_run(meta.get("config", {}), config, out)
        return "resume"
    if is_checkpoint(out) and not overwrite:
        raise CakeError(f"{out} already holds a checkpoint (step {load_meta(out).get('step')}); pass --resume to "
                        "continue it, --overwrite to replace it, or choose another --out")
    return "fresh"
