"""Checkpoints: self-describing directories, written atomically.

    CKPT/
      model.safetensors   weights (fp32 unless saved otherwise); metadata {"step": ...}
      config.json         ModelConfig
      tokenizer.json      the tokenizer the model was trained with
      meta.json           {"stage", "step", "complete", "config" (resolved stage config), "metrics",
                           "code_version", "parent" (checkpoint this one started from), ...}
      train_state.pt      optimizer state, step, RNG states: what `--resume` needs for an exact continuation

Every file is written to a temporary name, fsynced and renamed; meta.json goes last and carries the step, which
`load_meta` cross-checks against the weights, so a save interrupted between two renames is detected instead of
silently mixing two steps. Later stages read an earlier stage's directory and inherit what they do not override.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from cakelm.common import CakeError, atomic_path, code_version, read_json, write_json_atomic
from cakelm.model import ModelConfig, Transformer
from cakelm.tokenizer import Tokenizer

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
                    train_state: dict[str, Any] | None = None) -> Path:
    """Write (or overwrite) a checkpoint directory. `meta` must hold at least "stage" and "step"."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    step = int(meta["step"])
    if train_state is not None:
        with atomic_path(out / "train_state.pt") as tmp:
            torch.save(train_state, tmp)
    elif (out / "train_state.pt").exists():
        (out / "train_state.pt").unlink()  # a stale one from an older step must not be resumed from
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(_weights(model), str(tmp), metadata={"step": str(step), "format": "pt"})
    write_json_atomic(out / "config.json", model.cfg.to_dict())
    tokenizer.save(out / "tokenizer.json")
    write_json_atomic(out / "meta.json", {"code_version": code_version(), **meta})
    return out


def load_meta(path: str | Path) -> dict[str, Any]:
    """meta.json of a checkpoint, checked against the weights' step."""
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
                        "(a save was interrupted); resume from an earlier copy or retrain")
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
        raise CakeError(f"{path}: weights do not match config.json ({str(e).splitlines()[0]})") from None
    tok = Tokenizer.load(Path(path) / "tokenizer.json")
    if tok.vocab_size > cfg.vocab_size:
        raise CakeError(f"{path}: tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size}")
    return model.to(device).eval(), tok, meta


def load_train_state(path: str | Path) -> dict[str, Any]:
    p = Path(path) / "train_state.pt"
    if not p.is_file():
        raise CakeError(f"--resume: {path} has no train_state.pt (it was saved without optimizer state)")
    return torch.load(p, map_location="cpu", weights_only=False)
