"""`cakelm export CKPT --to hf OUT_DIR`: write a checkpoint in another ecosystem's format.

    cakelm export runs/default/base --to hf out/hf
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('out/hf')"

`hf` writes a Hugging Face `LlamaForCausalLM` directory (config.json, model.safetensors, tokenizer files,
generation_config.json) in fp32. OUT_DIR must be new or empty unless --overwrite is given (then the export's
files replace those of the same name and other files stay); it is never a cakelm checkpoint directory, nor the
checkpoint being exported or a folder inside it, even with --overwrite: those files are the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cakelm.checkpoint import is_checkpoint, load_model
from cakelm.common import CakeError, print0
from cakelm.config import opt
from cakelm.hf_compat import export_hf


@dataclass
class ExportConfig:
    ckpt: str = opt("", "checkpoint directory", positional=True)
    out_dir: str = opt("", "directory to write (new or empty, unless --overwrite)", positional=True)
    to: str = opt("hf", "target format", choices=("hf",))
    overwrite: bool = opt(False, "write into a non-empty OUT_DIR, replacing files of the same name (never into a "
                          "checkpoint directory)")


def check_target(ckpt: Path, out: Path, overwrite: bool) -> None:
    """Refuse an export directory whose contents the export would destroy (before anything is read or written)."""
    src, dst = ckpt.resolve(), out.resolve()
    if dst == src or src in dst.parents:
        raise CakeError(f"{out}: the export directory must be outside the checkpoint {ckpt}")
    # meta.json alone marks a cakelm checkpoint (Hugging Face directories have none), half-written ones included
    if is_checkpoint(out) or (out / "meta.json").is_file():
        raise CakeError(f"{out} is a cakelm checkpoint: export never writes into one; choose another directory")
    if out.exists() and not out.is_dir():
        raise CakeError(f"{out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CakeError(f"{out} is not empty; pass --overwrite to write the export over it, or choose another "
                        "directory")


def main(cfg: ExportConfig) -> Path:
    if not cfg.ckpt or not cfg.out_dir:
        raise CakeError("usage: cakelm export CKPT --to hf OUT_DIR")
    out = Path(cfg.out_dir)
    check_target(Path(cfg.ckpt), out, cfg.overwrite)
    model, tok, _ = load_model(cfg.ckpt)
    export_hf(model, tok, out)
    print0(f"export: {cfg.ckpt} -> {out} (Hugging Face LlamaForCausalLM, fp32)")
    return out
