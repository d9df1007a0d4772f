"""Hugging Face interop: our weights and config <-> `LlamaForCausalLM`, and the export directory.

Our Transformer is a Llama by construction, so the map is a renaming, one tensor to one tensor. RoPE uses the
same "rotate half" layout, so no permutation is needed (GGUF files, which use the interleaved layout, do).

    cakelm export runs/default/base --to hf out/hf-base
    AutoModelForCausalLM.from_pretrained("out/hf-base")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cakelm.common import CakeError, write_json_atomic
from cakelm.model import ModelConfig, Transformer
from cakelm.tokenizer import Tokenizer

# ours -> HF; {i} is the layer index. The output head is absent when tied to the embedding.
_GLOBAL = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "lm_head.weight": "lm_head.weight"}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight", "attn.q.weight": "self_attn.q_proj.weight",
    "attn.k.weight": "self_attn.k_proj.weight", "attn.v.weight": "self_attn.v_proj.weight",
    "attn.o.weight": "self_attn.o_proj.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight", "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}


def name_map(cfg: ModelConfig) -> dict[str, str]:
    """Every tensor name of ours -> its name in HF Llama."""
    names = dict(_GLOBAL)
    if cfg.tie_embeddings:
        del names["lm_head.weight"]
    for i in range(cfg.n_layers):
        names.update({f"layers.{i}.{ours}": f"model.layers.{i}.{theirs}" for ours, theirs in _LAYER.items()})
    return names


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our state dict under HF Llama's names. A tied head is stored once, as HF expects."""
    sd = model.state_dict()
    return {theirs: sd[ours].detach().cpu().contiguous() for ours, theirs in name_map(model.cfg).items()}


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF Llama tensors -> our state dict (the inverse of to_hf_state_dict)."""
    missing = [theirs for theirs in name_map(cfg).values() if theirs not in sd]
    if missing:
        raise CakeError(f"Llama weights lack the tensor {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                        if len(missing) > 1 else ""))
    out = {ours: sd[theirs] for ours, theirs in name_map(cfg).items()}
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return out


def hf_config(cfg: ModelConfig, tok: Tokenizer) -> dict[str, Any]:
    """config.json for `LlamaForCausalLM`."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": tok.bos_id, "eos_token_id": tok.end_id, "pad_token_id": tok.pad_id,
    }


def model_config_from_hf(c: dict[str, Any]) -> ModelConfig:
    """ModelConfig from an HF Llama config.json (refusing what our model cannot express)."""
    if c.get("model_type") != "llama" and "LlamaForCausalLM" not in c.get("architectures", []):
        raise CakeError(f"unsupported architecture {c.get('model_type') or c.get('architectures')}: only Llama")
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            raise CakeError(f"unsupported Llama variant: {key}=true (cakelm models have no biases)")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise CakeError(f"unsupported RoPE scaling {rope.get('rope_type') or rope.get('type')}")
    n_heads = c["num_attention_heads"]
    if c.get("head_dim", c["hidden_size"] // n_heads) * n_heads != c["hidden_size"]:
        raise CakeError("unsupported Llama variant: head_dim * num_attention_heads != hidden_size")
    return ModelConfig(
        vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=c.get("num_key_value_heads") or n_heads, ffn_dim=c["intermediate_size"],
        max_seq_len=c.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
        norm_eps=c.get("rms_norm_eps", 1e-6), tie_embeddings=bool(c.get("tie_word_embeddings", False)))


def export_hf(model: Transformer, tok: Tokenizer, out: str | Path) -> Path:
    """Write a directory that `AutoModelForCausalLM` and `AutoTokenizer` load."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    write_json_atomic(out / "config.json", hf_config(model.cfg, tok))
    write_json_atomic(out / "generation_config.json", {
        "bos_token_id": tok.bos_id, "pad_token_id": tok.pad_id,
        # a base model's text ends where it starts a new document; a chat model's where it ends its turn
        "eos_token_id": [tok.end_id, tok.bos_id],
    })
    tok.save(out / "tokenizer.json")
    write_json_atomic(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|end|>",
        "pad_token": "<|pad|>", "model_max_length": model.cfg.max_seq_len, "clean_up_tokenization_spaces": False,
    })
    return out
