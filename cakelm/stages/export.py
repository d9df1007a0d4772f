"""`cakelm export CKPT --to hf OUT_DIR` or `--to gguf OUT.gguf`: write a checkpoint in another ecosystem's format.

    cakelm export runs/default/base --to hf out/hf
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('out/hf')"
    cakelm export runs/default/sft --to gguf out/sft.gguf --dtype q8_0     # for llama.cpp and Ollama

`hf` writes a Hugging Face directory of the model's family (config.json, model.safetensors, tokenizer files,
generation_config.json) in fp32. OUT_DIR must be new or empty unless --overwrite is given (then the export's
files replace those of the same name and other files stay); it is never a cakelm checkpoint directory, nor the
checkpoint being exported or a folder inside it, even with --overwrite: those files are the run.

`gguf` writes one llama.cpp file (Llama architecture) with the tokenizer and chat template inside, its matrices
in --dtype (f32, f16, bf16 or q8_0; default f16); an existing file is replaced only with --overwrite.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cakelm.checkpoint import is_checkpoint, load_model
from cakelm.common import CakeError, print0
from cakelm.config import opt
from cakelm.hf_compat import GGUF_DTYPES, export_hf, family_of, write_gguf


@dataclass
class ExportConfig:
    ckpt: str = opt("", "checkpoint directory", positional=True)
    out_dir: str = opt("", "what to write: a directory for --to hf (new or empty, unless --overwrite), a .gguf "
                           "file for --to gguf", positional=True)
    to: str = opt("hf", "target format: a Hugging Face directory, or one GGUF file", choices=("hf", "gguf"))
    dtype: str = opt("f16", "GGUF: the matrices' type (norms stay f32)", choices=GGUF_DTYPES)
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


def check_file_target(ckpt: Path, out: Path, overwrite: bool) -> None:
    """Refuse a GGUF path inside the checkpoint, a directory, or an existing file without --overwrite."""
    src, dst = ckpt.resolve(), out.resolve()
    if src in dst.parents:
        raise CakeError(f"{out}: the export must be written outside the checkpoint {ckpt}")
    if out.is_dir():
        raise CakeError(f"{out} is a directory; give the GGUF file's path (e.g. {out}/model.gguf)")
    if out.exists() and not overwrite:
        raise CakeError(f"{out} exists; pass --overwrite to replace it, or choose another name")
    if not out.parent.is_dir():
        raise CakeError(f"{out.parent} does not exist")


def main(cfg: ExportConfig) -> Path:
    if not cfg.ckpt or not cfg.out_dir:
        raise CakeError("usage: cakelm export CKPT --to hf OUT_DIR  (or --to gguf OUT.gguf)")
    out = Path(cfg.out_dir)
    if cfg.to == "gguf":
        check_file_target(Path(cfg.ckpt), out, cfg.overwrite)
        model, tok, _ = load_model(cfg.ckpt)
        write_gguf(model, tok, out, cfg.dtype, name=Path(cfg.ckpt).resolve().name)
        print0(f"export: {cfg.ckpt} -> {out} (GGUF, {family_of(model.cfg)} architecture, {cfg.dtype}, "
               f"{out.stat().st_size / 1e6:.1f} MB)")
        return out
    check_target(Path(cfg.ckpt), out, cfg.overwrite)
    model, tok, _ = load_model(cfg.ckpt)
    export_hf(model, tok, out)
    print0(f"export: {cfg.ckpt} -> {out} (Hugging Face {family_of(model.cfg)}, fp32)")
    return out
