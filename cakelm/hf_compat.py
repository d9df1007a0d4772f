"""Hugging Face and GGUF interop: our weights and config <-> `LlamaForCausalLM`, `MistralForCausalLM`,
`Qwen2ForCausalLM` and `Qwen3ForCausalLM` (FAMILIES), the export directory, and reading models from a Hugging Face
directory or a GGUF file of llama.cpp's llama, qwen2 or qwen3 architecture (`cakelm import`).

Our Transformer is a Llama by construction, and the other families are config fields of it (q/k/v biases, q/k
norms, an explicit head size, Llama 3.x RoPE scaling), so the map is a renaming, one tensor to one tensor. RoPE
uses the same "rotate half" layout, so no permutation is needed for HF weights. GGUF files (llama.cpp) of the llama
architecture store q and k with the rows of each head interleaved for llama.cpp's RoPE (qwen2 and qwen3 files keep
HF's layout); reading undoes that permutation, and dequantizes every tensor to fp32 with PyPI `gguf` (the same
numbers transformers' GGUF loader computes).

    cakelm export runs/default/base --to hf out/hf-base
    AutoModelForCausalLM.from_pretrained("out/hf-base")
    cfg, state_dict, tok, info = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer

from cakelm.chat_format import jinja_template, template_from_jinja
from cakelm.common import CakeError, fsync_path, honour_umask, read_json, write_json_atomic
from cakelm.config import ConfigError
from cakelm.model import ModelConfig, Transformer, check_layer_count, hf_names, param_shapes
from cakelm.tokenizer import BYTE_LEVEL, PRE_TOKENIZERS, ChatTemplate, Tokenizer, pre_tokenizer_name, vocab_kind

# the families we read and write: model_type -> the transformers class
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}


def family_of(cfg: ModelConfig) -> str:
    """The HF model_type a config is written as: qwen3 with q/k norms, qwen2 with q/k/v biases, else llama."""
    return "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our state dict under HF Llama's names. A tied head is stored once, as HF expects."""
    sd = model.state_dict()
    return {theirs: sd[ours].detach().cpu().contiguous() for ours, theirs in hf_names(model.cfg).items()}


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF Llama tensors -> our state dict (the inverse of to_hf_state_dict)."""
    missing = [theirs for theirs in hf_names(cfg).values() if theirs not in sd]
    if missing:
        raise CakeError(f"Llama weights lack the tensor {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                        if len(missing) > 1 else ""))
    out = {ours: sd[theirs] for ours, theirs in hf_names(cfg).items()}
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Checks on files from elsewhere: counts and shapes validated before anything is allocated (with
# model.check_layer_count and model.param_shapes)


def positive_int(value: Any, key: str, where: str | Path) -> int:
    """A count read from a foreign config (head count, layer count, width): a positive integer, or a one-line
    error naming the file and key (before it divides anything or sizes an allocation)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CakeError(f"{where}: {key} must be a positive integer, got {str(value)[:50]!r}")
    return value


def model_config(where: str | Path, **fields: Any) -> ModelConfig:
    """ModelConfig from a foreign file's values; what it refuses is a one-line error naming the file."""
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise CakeError(f"{where}: {e}") from None


def hf_config(cfg: ModelConfig, tok: Tokenizer) -> dict[str, Any]:
    """config.json for the family's transformers class (`family_of`): LlamaForCausalLM (Llama 3.x RoPE scaling
    included), Qwen2ForCausalLM or Qwen3ForCausalLM."""
    family = family_of(cfg)
    if cfg.rope_scale != 1 and family != "llama":
        raise CakeError(f"Llama 3 RoPE scaling cannot be written as a {family} model")
    if cfg.qkv_bias and cfg.qk_norm:  # Qwen3's attention_bias would add an o_proj bias too
        raise CakeError("q/k/v biases with q/k norms (no transformers class has that without an o bias)")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scale != 1:
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": cfg.rope_scale,
                "low_freq_factor": cfg.rope_low_freq, "high_freq_factor": cfg.rope_high_freq,
                "original_max_position_embeddings": cfg.rope_original_context}
    out = {
        "architectures": [FAMILIES[family]], "model_type": family, "torch_dtype": "float32",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None if cfg.rope_scale == 1 else rope,
        "rope_parameters": rope, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": tok.bos_id, "eos_token_id": tok.end_id, "pad_token_id": tok.pad_id,
    }
    if family == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:  # Qwen2's q/k/v biases are part of its class
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
        if family == "qwen3":
            out.update(attention_bias=False)
    return out


def model_config_from_hf(c: dict[str, Any], where: str | Path = "config.json") -> ModelConfig:
    """ModelConfig from an HF config.json of a family we support (FAMILIES: Llama incl. 3.x RoPE scaling,
    Mistral without a sliding window, Qwen2/2.5, Qwen3), refusing with one line whatever our model cannot express."""
    if not isinstance(c, dict):
        raise CakeError(f"{where}: not a JSON object")
    family = c.get("model_type")
    if family not in FAMILIES:
        arch = c.get("architectures") or []
        family = next((f for f, cls in FAMILIES.items() if cls in arch), None)
        if family is None:
            raise CakeError(f"{where}: unsupported architecture {c.get('model_type') or arch}: cakelm reads "
                            f"{', '.join(FAMILIES)}")
    if c.get("hidden_act", "silu") != "silu":
        raise CakeError(f"{where}: unsupported {family} variant: hidden_act {c.get('hidden_act')} (only silu)")
    for key in ("attention_bias", "mlp_bias"):  # (Qwen2's q/k/v biases are not this key: they are always there)
        if c.get(key):
            raise CakeError(f"{where}: unsupported {family} variant: {key}=true (cakelm has no o_proj or MLP biases)")
    if c.get("use_sliding_window") or (family == "mistral" and c.get("sliding_window") is not None
                                       and c["sliding_window"] < c.get("max_position_embeddings", 0)):
        raise CakeError(f"{where}: unsupported {family} variant: sliding-window attention")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None, "llama3"):
        raise CakeError(f"{where}: unsupported RoPE scaling {rope_type}")

    def count(key: str, default: Any = None) -> int:
        if key not in c and default is None:
            raise CakeError(f"{where}: lacks {key}")
        return positive_int(c.get(key, default), key, where)

    n_heads, dim = count("num_attention_heads"), count("hidden_size")
    head_dim = count("head_dim", dim // n_heads) if c.get("head_dim") is not None else dim // n_heads
    if family != "qwen3" and head_dim * n_heads != dim:
        raise CakeError(f"{where}: unsupported {family} variant: head_dim * num_attention_heads != hidden_size")
    try:
        rope_theta, norm_eps = float(rope.get("rope_theta", c.get("rope_theta", 10000.0))), \
            float(c.get("rms_norm_eps", 1e-6))
        scaling = {} if rope_type != "llama3" else dict(
            rope_scale=float(rope["factor"]), rope_low_freq=float(rope["low_freq_factor"]),
            rope_high_freq=float(rope["high_freq_factor"]),
            rope_original_context=positive_int(rope["original_max_position_embeddings"],
                                               "original_max_position_embeddings", where))
    except (TypeError, ValueError):
        raise CakeError(f"{where}: rope_theta, rms_norm_eps and the RoPE scaling factors must be numbers") from None
    except KeyError as e:
        raise CakeError(f"{where}: llama3 RoPE scaling lacks {e.args[0]}") from None
    return model_config(
        where, vocab_size=count("vocab_size"), dim=dim, n_layers=count("num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=count("num_key_value_heads", n_heads), ffn_dim=count("intermediate_size"),
        max_seq_len=count("max_position_embeddings", 2048), rope_theta=rope_theta, norm_eps=norm_eps,
        tie_embeddings=bool(c.get("tie_word_embeddings", False)), head_dim=head_dim,
        qkv_bias=family == "qwen2", qk_norm=family == "qwen3", **scaling)


def export_hf(model: Transformer, tok: Tokenizer, out: str | Path) -> Path:
    """Write a directory that `AutoModelForCausalLM` and `AutoTokenizer` load."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    honour_umask(out / "model.safetensors")  # safetensors writes it owner-only
    write_json_atomic(out / "config.json", hf_config(model.cfg, tok))
    write_json_atomic(out / "generation_config.json", {
        "bos_token_id": tok.bos_id, "pad_token_id": tok.pad_id,
        # a base model's text ends where it starts a new document; a chat model's where it ends its turn
        "eos_token_id": [tok.end_id, tok.bos_id],
    })
    tok.save(out / "tokenizer.json")
    # the model's chat template (an imported model's own, or ours written as Jinja), so that
    # tokenizer.apply_chat_template gives the ids cakelm trains and generates with
    write_json_atomic(out / "tokenizer_config.json", {**tok.config(), "model_max_length": model.cfg.max_seq_len,
                                                      "chat_template": jinja_template(tok.template) or None})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Reading a Hugging Face directory


def _token_name(value: Any) -> str | None:
    """A special token as tokenizer_config.json gives it: a string or an AddedToken dict {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def hf_tokenizer(path: Path, config: dict[str, Any]) -> Tokenizer:
    """The tokenizer of a Hugging Face model directory: tokenizer.json (byte-level or SentencePiece-style BPE, with
    its normalizer, pre-tokenizer and added tokens, used as written: as PreTrainedTokenizerFast loads it), its
    special tokens and chat template from tokenizer_config.json (or chat_template.jinja), ids from config.json as a
    fallback. (transformers 5's LlamaTokenizer class instead rebuilds a Llama 2 file's pipeline with a Metaspace
    pre-tokenizer, which encodes text that starts with a space with one "▁" less.)"""
    file = path / "tokenizer.json"
    if not file.is_file():
        raise CakeError(f"{path}: no tokenizer.json (only Hugging Face fast tokenizers can be imported)")
    try:
        hf = HFTokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise CakeError(f"{file}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
    try:
        vocab_kind(hf)  # what Tokenizer cannot read exactly is refused before the chat template is looked at
    except CakeError as e:
        raise CakeError(f"{file}: {e}") from None
    tc = read_json(path / "tokenizer_config.json", "tokenizer config") if (path / "tokenizer_config.json").is_file() \
        else {}

    def named(key: str, id_key: str) -> str | None:
        ids = config.get(id_key)
        ids = ids[0] if isinstance(ids, list) and ids else ids
        return _token_name(tc.get(key)) or (hf.id_to_token(ids) if isinstance(ids, int) else None)

    eos = named("eos_token", "eos_token_id")
    if eos is None:
        raise CakeError(f"{path}: neither tokenizer_config.json nor config.json names an end-of-sequence token")
    bos = named("bos_token", "bos_token_id") or eos
    pad = named("pad_token", "pad_token_id") or eos
    jinja = tc.get("chat_template") or ""
    if isinstance(jinja, list):  # several named templates: the default one
        jinja = next((t["template"] for t in jinja if t.get("name") == "default"), "")
    if not jinja and (path / "chat_template.jinja").is_file():
        jinja = (path / "chat_template.jinja").read_text(encoding="utf-8")
    specials = [t.content for t in hf.get_added_tokens_decoder().values() if t.special]
    template = template_from_jinja(jinja, bos, eos, pad, specials) if jinja else ChatTemplate(bos, pad, eos)
    return Tokenizer(hf, template)


def read_hf_dir(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, dict[str, Any]]:
    """(model config, our state dict in fp32, tokenizer, info) of a Hugging Face Llama directory."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CakeError(f"{path}: no config.json (not a Hugging Face model directory)")
    config = read_json(path / "config.json", "model config")
    cfg = model_config_from_hf(config, path / "config.json")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CakeError(f"{path}: no *.safetensors weights (pytorch_model.bin is not read; save the model with "
                        "safe_serialization=True)")
    shapes: dict[str, tuple[int, ...]] = {}  # from the files' headers: nothing loaded yet
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                shapes.update({k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()})
        except (SafetensorError, OSError) as e:
            raise CakeError(f"{f}: unreadable weights ({e})") from None
    check_layer_count(shapes, r"model\.layers\.(\d+)\.", cfg.n_layers, "num_hidden_layers", path / "config.json")
    known = set(hf_names(cfg).values()) | {"lm_head.weight"}
    extra = sorted(k for k in shapes if k not in known and not k.endswith("rotary_emb.inv_freq"))
    if extra:
        raise CakeError(f"{path}: unsupported Llama variant: unexpected tensor {extra[0]}")
    want = param_shapes(cfg)
    for ours, theirs in hf_names(cfg).items():
        if theirs in shapes and shapes[theirs] != want[ours]:
            raise CakeError(f"{path}: tensor {theirs} has shape {shapes[theirs]}, config.json implies {want[ours]}")
    hf_sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            hf_sd.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise CakeError(f"{f}: unreadable weights ({e})") from None
    sd = {k: v.float() for k, v in from_hf_state_dict(hf_sd, cfg).items()}
    info = {"format": "hf", "name": config.get("_name_or_path") or path.name,
            "architectures": config.get("architectures")}
    return cfg, sd, hf_tokenizer(path, config), info


# ----------------------------------------------------------------------------------------------------------------
# Reading a GGUF file (llama.cpp)

GGUF_GLOBAL = {"token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight",
               "output.weight": "lm_head.weight"}
GGUF_LAYER = {
    "attn_norm.weight": "attn_norm.weight", "attn_q.weight": "attn.q.weight", "attn_k.weight": "attn.k.weight",
    "attn_v.weight": "attn.v.weight", "attn_output.weight": "attn.o.weight", "ffn_norm.weight": "mlp_norm.weight",
    "ffn_gate.weight": "mlp.gate.weight", "ffn_up.weight": "mlp.up.weight", "ffn_down.weight": "mlp.down.weight",
}
GGUF_QKV_BIAS = {"attn_q.bias": "attn.q.bias", "attn_k.bias": "attn.k.bias", "attn_v.bias": "attn.v.bias"}  # qwen2
GGUF_QK_NORM = {"attn_q_norm.weight": "attn.q_norm.weight", "attn_k_norm.weight": "attn.k_norm.weight"}  # qwen3
GGUF_ARCHS = ("llama", "qwen2", "qwen3")  # llama.cpp's architecture names of the families we read and write
_TOKEN_CONTROL = 3  # llama.cpp's token type of special tokens (1 normal, 3 control, 4 user-defined)
_TOKEN_UNUSED = 5  # llama.cpp's token type of padding rows
_TOKEN_USER = 4  # llama.cpp's token type of user-defined tokens (added tokens matched whole, not special)


def gguf_name_map(cfg: ModelConfig) -> dict[str, str]:
    """Every GGUF tensor name of the model -> ours (llama.cpp names a family's extra tensors, q/k/v biases and q/k
    norms, as it names Llama's)."""
    names = dict(GGUF_GLOBAL)
    if cfg.tie_embeddings:
        del names["output.weight"]  # llama.cpp reads a missing output.weight as tied to token_embd
    layer = {**GGUF_LAYER, **(GGUF_QKV_BIAS if cfg.qkv_bias else {}), **(GGUF_QK_NORM if cfg.qk_norm else {})}
    for i in range(cfg.n_layers):
        names.update({f"blk.{i}.{theirs}": f"layers.{i}.{ours}" for theirs, ours in layer.items()})
    return names


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation (convert_hf_to_gguf.py `permute`): within each head, GGUF stores row
    pairs (i, i + D/2) of HF's "rotate half" layout next to each other. w: (heads * D, C)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation itself (HF layout -> GGUF layout), the inverse of unpermute_rope."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, dict[str, Any]]:
    """(model config, our state dict in fp32, tokenizer, info) of a GGUF file (GGUF_ARCHS)."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise CakeError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct errors on files that are not GGUF
        raise CakeError(f"{path}: not a readable GGUF file ({str(e).splitlines()[0][:200]})") from None
    missing = object()

    def field(key: str, default: Any = missing) -> Any:
        f = reader.fields.get(key)
        if f is None:
            if default is missing:
                raise CakeError(f"{path}: GGUF metadata lacks {key}")
            return default
        return f.contents()

    arch = field("general.architecture")
    if arch not in GGUF_ARCHS:
        raise CakeError(f"{path}: unsupported GGUF architecture {arch!r} (cakelm imports {', '.join(GGUF_ARCHS)})")
    if field(f"{arch}.expert_count", 0):
        raise CakeError(f"{path}: unsupported {arch} variant: mixture of experts ({field(f'{arch}.expert_count')} "
                        "experts)")
    scaling = field(f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in {t.name for t in reader.tensors}:
        raise CakeError(f"{path}: unsupported RoPE scaling {scaling if scaling != 'none' else 'rope_freqs'}")
    if any(isinstance(field(f"{arch}.{k}", 0), list) for k in ("attention.head_count", "attention.head_count_kv")):
        raise CakeError(f"{path}: unsupported {arch} variant: head counts differ between layers")

    def count(key: str, default: Any = missing) -> int:
        return positive_int(field(f"{arch}.{key}", default), f"{arch}.{key}", path)

    n_heads, dim = count("attention.head_count"), count("embedding_length")
    n_kv = count("attention.head_count_kv", n_heads)
    names = {t.name for t in reader.tensors}
    n_layers = count("block_count")
    check_layer_count(names, r"blk\.(\d+)\.", n_layers, f"{arch}.block_count", path)
    head_dim = count("attention.key_length", dim // n_heads)
    if count("rope.dimension_count", head_dim) != head_dim or count("attention.value_length", head_dim) != head_dim:
        raise CakeError(f"{path}: unsupported {arch} variant: RoPE over part of a head, or values of another width "
                        "than keys")
    tok = gguf_tokenizer(path, field)
    try:
        # GGUF keeps float32s: the shortest decimal that rounds to one gives back the value written (1e-5, not
        # 9.99999975e-06)
        rope_theta, norm_eps = (float(str(np.float32(field(f"{arch}.{k}", d)))) for k, d in (
            ("rope.freq_base", 10000.0), ("attention.layer_norm_rms_epsilon", 1e-5)))
    except (TypeError, ValueError):
        raise CakeError(f"{path}: {arch}.rope.freq_base and the norm epsilon must be numbers") from None
    cfg = model_config(
        path, vocab_size=count("vocab_size", tok.vocab_size), dim=dim, n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=n_kv, ffn_dim=count("feed_forward_length"),
        max_seq_len=count("context_length", 2048), rope_theta=rope_theta, norm_eps=norm_eps,
        tie_embeddings="output.weight" not in names, head_dim=head_dim,
        qkv_bias="blk.0.attn_q.bias" in names, qk_norm="blk.0.attn_q_norm.weight" in names)
    shapes = param_shapes(cfg)
    mapping, sd = gguf_name_map(cfg), {}
    for t in reader.tensors:
        ours = mapping.get(t.name)
        if ours is None:
            raise CakeError(f"{path}: unsupported {arch} variant: unexpected tensor {t.name}")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dimensions innermost first
        if shape != shapes[ours]:  # checked before dequantizing (which allocates)
            raise CakeError(f"{path}: tensor {t.name} has shape {shape}, the metadata implies {shapes[ours]}")
        qtype = gguf.GGMLQuantizationType(t.tensor_type)
        unsupported = CakeError(f"{path}: tensor {t.name} has unsupported type {qtype.name}")
        if qtype.name in ("I8", "I16", "I32", "I64", "F64"):  # not weight formats llama.cpp quantizes to
            raise unsupported
        try:
            w = np.asarray(gguf.quants.dequantize(t.data, qtype), dtype=np.float32)
        except NotImplementedError:  # a quantization type this gguf version cannot dequantize
            raise unsupported from None
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias")):  # qwen: HF's own layout
            w = unpermute_rope(w, n_heads)
        elif arch == "llama" and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_rope(w, n_kv)
        sd[ours] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))  # a copy: F32 data is a memmap
    need = [k for k in shapes if k not in sd and not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if need:
        raise CakeError(f"{path}: GGUF file lacks the tensor for {need[0]}")
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed.weight"]
    types = sorted({gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors})
    info = {"format": "gguf", "name": field("general.name", path.stem), "license": field("general.license", None),
            "tensor_types": types}
    return cfg, sd, tok, info


GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")  # what `cakelm export --to gguf --dtype` writes the matrices in


def gguf_vocab(tok: Tokenizer, size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, llama.cpp token types, merges "a b") of a byte-level BPE tokenizer for GGUF metadata, the tokens
    padded with unused ones to `size` (llama.cpp wants one per embedding row)."""
    tokens = [tok.hf.id_to_token(i) for i in range(tok.vocab_size)]
    types = [_TOKEN_CONTROL if t in tok.special_tokens else 1 for t in tokens]
    tokens += [f"<|unused_{i}|>" for i in range(size - tok.vocab_size)]
    types += [_TOKEN_UNUSED] * (size - tok.vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.hf.to_str())["model"]["merges"]]
    return tokens, types, merges


def gguf_tensors(model: Transformer) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, fp32 array) of every tensor as llama.cpp stores it: in the llama architecture q and k rows
    permuted for its RoPE (qwen2 and qwen3 keep HF's layout: llama.cpp rotates their halves as HF does), a tied
    output head left out."""
    cfg, sd = model.cfg, model.state_dict()
    llama = family_of(cfg) == "llama"
    for gname, ours in gguf_name_map(cfg).items():
        a = sd[ours].detach().float().cpu().numpy()
        if llama and gname.endswith("attn_q.weight"):
            a = permute_rope(a, cfg.n_heads)
        elif llama and gname.endswith("attn_k.weight"):
            a = permute_rope(a, cfg.n_kv_heads)
        yield gname, a


def add_model_keys(w: Any, cfg: ModelConfig) -> None:
    """The model's shape as GGUF metadata, on a `gguf.GGUFWriter` made for the model's architecture."""
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_key_length(cfg.head_dim)  # a Qwen3 head may be wider than dim / heads
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)


def write_gguf(model: Transformer, tok: Tokenizer, path: str | Path, dtype: str = "f16", name: str = "cakelm"
               ) -> Path:
    """A llama.cpp GGUF file of the model (architecture `llama`, `qwen2` or `qwen3`: `family_of`), as llama.cpp's
    convert_hf_to_gguf.py writes one:
    `gguf_tensors` with the matrices in `dtype` (GGUF_DTYPES; a q8_0 matrix whose rows are not a multiple of 32 is
    written f16) and norms in f32, and the tokenizer inside (`gguf_vocab`, special token ids, the pre-tokenizer's
    llama.cpp name, the chat template as Jinja). Written to a temporary name, synced and renamed into place: a
    failure leaves no file behind and never a partial one at `path`."""
    import gguf

    cfg, arch = model.cfg, family_of(model.cfg)
    if cfg.rope_scale != 1:  # llama.cpp stores it as a rope_freqs tensor, which transformers' reader ignores
        raise CakeError("GGUF export does not write Llama 3.x RoPE scaling yet (export --to hf keeps it)")
    if dtype not in GGUF_DTYPES:
        raise CakeError(f"--dtype {dtype}: GGUF export writes {', '.join(GGUF_DTYPES)}")
    if tok.kind != BYTE_LEVEL:
        raise CakeError(f"GGUF export writes byte-level BPE vocabularies; this model's is {tok.kind}-style "
                        "(`export --to hf` keeps it)")
    pre = pre_tokenizer_name(tok)
    if pre is None:
        raise CakeError("the tokenizer's pre-tokenizer has no llama.cpp name (GGUF export knows "
                        f"{', '.join(PRE_TOKENIZERS)})")
    Q = gguf.GGMLQuantizationType
    qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype]
    tokens, types, merges = gguf_vocab(tok, cfg.vocab_size)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        w = gguf.GGUFWriter(str(tmp), arch)  # the add_* calls below write keys under the architecture's name
        w.add_name(name)
        add_model_keys(w, cfg)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(tok.bos_id)
        w.add_eos_token_id(tok.end_id)
        w.add_pad_token_id(tok.pad_id)
        w.add_add_bos_token(False)  # cakelm's prompts carry their own BOS (chat template, or encode(bos=True))
        template = jinja_template(tok.template)
        if template:
            w.add_chat_template(template)
        for gname, a in gguf_tensors(model):
            t = qtype if a.ndim == 2 else Q.F32
            if t == Q.Q8_0 and a.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
                t = Q.F16
            if t == Q.F32:
                w.add_tensor(gname, np.ascontiguousarray(a))
            elif t == Q.F16:
                w.add_tensor(gname, a.astype(np.float16))
            else:
                w.add_tensor(gname, gguf.quants.quantize(a, t), raw_dtype=t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        fsync_path(tmp)
        honour_umask(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def gguf_tokenizer(path: Path, field: Any) -> Tokenizer:
    """The tokenizer stored in a GGUF file (tokens, merges or scores, token types, special token ids, pre-tokenizer
    name, chat template): byte-level BPE ("gpt2") or SentencePiece BPE ("llama", built as transformers' GGUF loader
    builds it: Tokenizer.from_sentencepiece). `field(key, default)` reads the file's metadata."""
    kind = field("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise CakeError(f"{path}: unsupported tokenizer {kind!r}: cakelm imports byte-level BPE ('gpt2') and "
                        "SentencePiece BPE ('llama') vocabularies")
    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type", [1] * len(tokens))
    specials = [t for t, kind in zip(tokens, types) if kind == _TOKEN_CONTROL]

    def token(key: str) -> str | None:
        i = field(f"tokenizer.ggml.{key}_token_id", None)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    eos = token("eos")
    if eos is None:
        raise CakeError(f"{path}: GGUF metadata lacks tokenizer.ggml.eos_token_id")
    bos, pad = token("bos") or eos, token("padding") or eos
    jinja = field("tokenizer.chat_template", "")
    template = template_from_jinja(jinja, bos, eos, pad, specials) if jinja else ChatTemplate(bos, pad, eos)
    try:
        if kind == "llama":  # transformers makes the named tokens special too (<unk> is typed 2, unknown)
            named = [t for t in (bos, eos, token("unknown"), pad) if t is not None and t not in specials]
            user = [t for t, ty in zip(tokens, types) if ty == _TOKEN_USER]
            return Tokenizer.from_sentencepiece(tokens, field("tokenizer.ggml.scores", None),
                                                field("tokenizer.ggml.merges", None), specials + named, user,
                                                template)
        return Tokenizer.from_bpe(tokens, field("tokenizer.ggml.merges"), specials,
                                  field("tokenizer.ggml.pre", "default"), template)
    except CakeError as e:
        raise CakeError(f"{path}: {e}") from None
