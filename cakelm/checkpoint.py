"""Checkpoints: self-describing directories, written atomically.

    CKPT/
      model.safetensors   weights (fp32 unless saved otherwise); metadata {"step": ...}
      config.json         ModelConfig
      tokenizer.json      the tokenizer the model was trained with
      tokenizer_config.json  (imported models) the chat template and special tokens of a foreign vocabulary
      meta.json           {"stage", "step", "complete", "config" (resolved stage config), "metrics",
                           "code_version", "parent" (checkpoint this one started from), ...}
      train_state.pt      optimizer state, step, RNG states: what `--resume` needs for an exact continuation
      heads.safetensors   (reward models and PPO) extra tensors beside the Transformer: the scalar head, the
                          value model; see `cakelm.rlhf`

A save writes and fsyncs every file under a temporary name first, then renames them into place (meta.json last),
so an interrupted save leaves the old checkpoint or the new one. The weights, meta.json and train_state.pt all
carry the step, and loading cross-checks them: a crash in the instant between two renames is reported, never
silently resumed as a mix of two steps. Later stages read an earlier stage's directory and inherit what they do
not override.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from cakelm.common import CakeError, code_version, fsync_path, read_json
from cakelm.config import flatten
from cakelm.model import ModelConfig, Transformer
from cakelm.tokenizer import CAKELM_TEMPLATE, CONFIG_FILE, Tokenizer

FILES = ("model.safetensors", "config.json", "tokenizer.json", "meta.json")


def is_checkpoint(path: str | Path) -> bool:
    return all((Path(path) / f).is_file() for f in FILES)


def _weights(model: Transformer) -> dict[str, torch.Tensor]:
    """State dict for saving: on CPU, contiguous, and with a tied output head stored once (as the embedding)."""
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight")
    return sd


def save_checkpoint(out: str | Path, model: Transformer, tokenizer: Tokenizer, meta: dict[str, Any],
                    train_state: dict[str, Any] | None = None, heads: dict[str, torch.Tensor] | None = None) -> Path:
    """Write (or overwrite) a checkpoint directory. `meta` must hold at least "stage" and "step". `heads` are
    tensors saved beside the model in heads.safetensors (a scalar head, a value model), with the same step."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    step = int(meta["step"])
    writers: dict[str, Callable[[Path], object]] = {}
    if train_state is not None:
        writers["train_state.pt"] = lambda p: torch.save({**train_state, "step": step}, p)
    writers["model.safetensors"] = lambda p: save_file(_weights(model), str(p), metadata={"step": str(step),
                                                                                         "format": "pt"})
    if heads is not None:
        writers["heads.safetensors"] = lambda p: save_file(
            {k: v.detach().to("cpu").contiguous() for k, v in heads.items()}, str(p),
            metadata={"step": str(step), "format": "pt"})
    writers["config.json"] = lambda p: p.write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    writers["tokenizer.json"] = tokenizer.save
    if tokenizer.template != CAKELM_TEMPLATE:  # an imported vocabulary: its chat template travels with it
        writers[CONFIG_FILE] = lambda p: p.write_text(json.dumps(tokenizer.config(), indent=2) + "\n",
                                                      encoding="utf-8")
    writers["meta.json"] = lambda p: p.write_text(json.dumps({"code_version": code_version(), **meta}, indent=2,
                                                             sort_keys=True) + "\n", encoding="utf-8")
    staged: dict[str, Path] = {}
    try:
        for name, write in writers.items():  # 1. everything written and fsynced under temporary names
            staged[name] = out / f".{name}.tmp"
            write(staged[name])
            fsync_path(staged[name])
        if train_state is None:
            (out / "train_state.pt").unlink(missing_ok=True)  # a stale one must not be resumed from
        if CONFIG_FILE not in staged:
            (out / CONFIG_FILE).unlink(missing_ok=True)
        if heads is None:
            (out / "heads.safetensors").unlink(missing_ok=True)
        for name in list(staged):  # 2. renamed into place, meta.json last
            os.replace(staged.pop(name), out / name)
        fsync_path(out)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    return out


def load_meta(path: str | Path) -> dict[str, Any]:
    """meta.json of a checkpoint, checked against the weights' step."""
    if not str(path):
        raise CakeError("no checkpoint directory given")
    path = Path(path)
    if not path.is_dir():
        raise CakeError(f"checkpoint not found: {path}")
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise CakeError(f"{path}: not a cakelm checkpoint (missing {', '.join(missing)})")
    meta = read_json(path / "meta.json", "checkpoint metadata")
    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
            saved_step = (fh.metadata() or {}).get("step")
    except (SafetensorError, OSError) as e:
        raise CakeError(f"{path / 'model.safetensors'}: unreadable weights ({e})") from None
    if saved_step is not None and int(saved_step) != int(meta.get("step", -1)):
        raise CakeError(f"{path}: weights are from step {saved_step} but meta.json says step {meta.get('step')} "
                        "(a save was cut off); retrain, or --overwrite it")
    return meta


def load_model_config(path: str | Path) -> ModelConfig:
    d = read_json(Path(path) / "config.json", "model config")
    from cakelm.config import config_from_dict

    return config_from_dict(ModelConfig, d, f"{path}/config.json")


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[Transformer, Tokenizer, dict]:
    """(model on `device` in eval mode, tokenizer, meta) from a checkpoint directory."""
    meta = load_meta(path)
    cfg = load_model_config(path)
    model = Transformer(cfg)
    sd = load_file(str(Path(path) / "model.safetensors"))
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed.weight"]
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise CakeError(f"{path}: weights do not match config.json ({detail[:300]})") from None
    tok = Tokenizer.load(Path(path) / "tokenizer.json")
    if tok.vocab_size > cfg.vocab_size:
        raise CakeError(f"{path}: tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size}")
    return model.to(device).eval(), tok, meta


def load_heads(path: str | Path) -> dict[str, torch.Tensor]:
    """The extra tensors of a checkpoint (heads.safetensors), checked to be from the weights' step."""
    path = Path(path)
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
    p = Path(path) / "train_state.pt"
    if not p.is_file():
        raise CakeError(f"--resume: {path} has no train_state.pt (it was saved without optimizer state)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a corrupt file
        raise CakeError(f"{p}: unreadable ({str(e).splitlines()[0][:200]})") from None
    step = load_meta(path)["step"]
    if not isinstance(state, dict) or state.get("step") != step:
        raise CakeError(f"{p} is from step {state.get('step') if isinstance(state, dict) else '?'} but the "
                        f"weights are from step {step} (a save was cut off); retrain, or --overwrite it")
    return state


# Options that may change when a run is resumed: how long it runs and how it reports, not what it computes.
RESUMABLE = {"resume", "overwrite", "loop.max_steps", "loop.eval_every", "loop.eval_tokens", "loop.log_every",
             "loop.save_every", "loop.progress", "loop.device", "loop.grad_checkpoint"}


def check_same_run(saved: dict, now: dict, out: Path) -> None:
    """--resume continues the saved run, so the options that shape it must match; say which ones do not."""
    a, b = flatten(saved), flatten(now)
    diff = [k for k in sorted(set(a) | set(b)) if k not in RESUMABLE and a.get(k) != b.get(k)]
    if diff:
        shown = ", ".join(f"{k} (saved {a.get(k)!r}, now {b.get(k)!r})" for k in diff[:3])
        raise CakeError(f"--resume: options differ from the run saved in {out}: {shown}"
                        f"{f' and {len(diff) - 3} more' if len(diff) > 3 else ''}; pass the same options "
                        "(see its meta.json) or use --overwrite to start over")


def resume_point(out: Path, resume: bool, overwrite: bool, max_steps: int, config: dict) -> str:
    """How a training stage starts in `out`: "done" (--resume of a complete run), "resume" (continue the
    checkpoint there, whose options must equal `config`) or "fresh". Refuses to silently replace a checkpoint."""
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
