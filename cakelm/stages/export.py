"""`cakelm export CKPT --to hf OUT_DIR`: write a checkpoint in another ecosystem's format.

    cakelm export runs/default/base --to hf out/hf
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('out/hf')"

`hf` writes a Hugging Face `LlamaForCausalLM` directory (config.json, model.safetensors, tokenizer files,
generation_config.json) in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cakelm.checkpoint import load_model
from cakelm.common import CakeError, print0
from cakelm.config import opt
from cakelm.hf_compat import export_hf


@dataclass
class ExportConfig:
    ckpt: str = opt("", "checkpoint directory", positional=True)
    out_dir: str = opt("", "directory to write", positional=True)
    to: str = opt("hf", "target format", choices=("hf",))


def main(cfg: ExportConfig) -> Path:
    if not cfg.ckpt or not cfg.out_dir:
        raise CakeError("usage: cakelm export CKPT --to hf OUT_DIR")
    out = Path(cfg.out_dir)
    if out.resolve() == Path(cfg.ckpt).resolve():
        raise CakeError(f"{out}: the export directory must differ from the checkpoint")
    model, tok, _ = load_model(cfg.ckpt)
    export_hf(model, tok, out)
    print0(f"export: {cfg.ckpt} -> {out} (Hugging Face LlamaForCausalLM, fp32)")
    return out
