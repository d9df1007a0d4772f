"""LoRA: train a few low-rank adapters instead of every weight (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models", https://arxiv.org/abs/2106.09685), saved in PEFT's format.

A targeted linear layer y = x W^T + b becomes

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        A: (r, in), B: (out, r)

with W and b frozen. B starts at zero, so the adapted model starts exactly at the base model; A starts as PEFT's
(Kaiming-uniform). Only A and B train (plus a reward or value model's scalar head), so the optimizer keeps
~16 bytes per *adapter* parameter instead of per weight, and the frozen reference a KL term or DPO needs is the
same model with its adapters switched off (`adapters_off`): no second copy in memory.

    --lora.rank 16 --lora.alpha 32 --lora.dropout 0.05 --lora.targets q_proj v_proj   # any training stage but
                                                                                        # pretrain
Target names are PEFT's (the Hugging Face module names): q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
down_proj, or all-linear for the seven. A checkpoint of an adapted model holds adapter_config.json and
adapter_model.safetensors (PEFT's files and tensor names, so `peft.PeftModel.from_pretrained(hf_base, CKPT)` loads
it onto `cakelm export BASE --to hf`) next to the base checkpoint's path in meta.json; `cakelm.checkpoint`
writes and reads them, merging the adapters into the weights for chat, serve, eval and export.

Our own small module rather than `peft` itself: our Transformer is not a transformers model (PEFT would wrap it
through its custom-model path and rename every parameter), the whole of LoRA is the forward above, and the
reference-without-copy, the merge and the checkpoint format are a few lines each here. `peft` is the independent
reference in the tests (tests/test_lora.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from cakelm.common import CakeError
from cakelm.config import ConfigError, opt
from cakelm.model import Transformer, hf_names

# PEFT's target names (the Hugging Face module names) -> our modules in every block
TARGETS = {"q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v", "o_proj": "attn.o",
           "gate_proj": "mlp.gate", "up_proj": "mlp.up", "down_proj": "mlp.down"}
ALL_LINEAR = "all-linear"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the transformers model's own names
BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # --lora.base-dtype


@dataclass
class LoraConfig:
    rank: int = opt(0, "LoRA rank r: train rank-r adapters on --lora.targets instead of every weight (0 = no LoRA, "
                       "train every weight)")
    alpha: float = opt(32.0, "LoRA alpha: the adapters' output is scaled by alpha / rank")
    dropout: float = opt(0.0, "dropout on the adapters' input (training only)")
    targets: list[str] = opt([ALL_LINEAR], "the linear layers that get adapters, by PEFT's names: q_proj k_proj "
                                           "v_proj o_proj gate_proj up_proj down_proj, or all-linear")
    base_dtype: str = opt("fp32", "what the adapted layers' frozen weights are kept in: fp32, or bf16 for half their "
                                  "memory (each is cast to fp32 when used: fp32 math on bf16-rounded weights)",
                          choices=tuple(BASE_DTYPES))

    def __post_init__(self) -> None:
        if self.rank < 0 or not self.alpha > 0 or not 0 <= self.dropout < 1:
            raise ConfigError(f"need --lora.rank >= 0, --lora.alpha > 0 and --lora.dropout in [0, 1) (got "
                              f"{self.rank}, {self.alpha}, {self.dropout})")
        modules(self.targets)  # names that match no module: refused with the option, before anything loads

    @property
    def on(self) -> bool:
        return self.rank > 0


def modules(targets: list[str]) -> list[str]:
    """Our module names (within a block) for PEFT target names; a name that matches none is a one-line error."""
    if not targets:
        raise ConfigError("--lora.targets: name at least one module (or all-linear)")
    if ALL_LINEAR in targets:
        return list(TARGETS.values())
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ConfigError(f"--lora.targets: {unknown[0]!r} names no module of the model; choose from "
                          f"{', '.join(TARGETS)} or {ALL_LINEAR}")
    return [TARGETS[t] for t in dict.fromkeys(targets)]


class LoraLinear(nn.Module):
    """A frozen linear layer (the base's own weight and bias Parameters, under the same names) plus a trainable
    low-rank update (module docstring). `active` False computes the base layer alone."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight.requires_grad_(False)  # (out, in)
        self.bias = base.bias.requires_grad_(False) if base.bias is not None else None
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init of A (nn.Linear's default)
        self.scale = alpha / rank
        self.dropout = dropout
        self.active = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a base kept in bf16 (--lora.base-dtype) is cast to the activations' dtype per call: a transient copy of
        # one matrix, and the matmul in fp32 on any CPU (bf16 matmuls are ~25x slower without bf16 units)
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        y = F.linear(x, w, self.bias)
        if not self.active:
            return y
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x
        a, b = self.lora_A.to(h.dtype), self.lora_B.to(h.dtype)  # fp32 adapters on a bf16 base
        xa = F.linear(h, a)  # (..., r)
        # y + scale * xa B^T in one op: one (..., out) tensor instead of three (time and memory on CPUs)
        return torch.addmm(y.flatten(0, -2), xa.flatten(0, -2), b.t(), alpha=self.scale).view(y.shape)

    @torch.no_grad()
    def delta(self) -> torch.Tensor:
        """(out, in): what the adapters add to the weight, (alpha / r) B A."""
        return (self.lora_B @ self.lora_A) * self.scale


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The adapted layers of a model, by module name ("layers.0.attn.q")."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoraLinear) for m in model.modules())


def add_lora(model: Transformer, cfg: LoraConfig) -> int:
    """Freeze every weight of `model` and put rank-`cfg.rank` adapters on the target layers of every block, their
    frozen weights kept in cfg.base_dtype (in place). Returns the number of trainable (adapter) parameters."""
    model.requires_grad_(False)
    for block in model.layers:
        for name in modules(cfg.targets):
            parent_name, child = name.split(".")
            parent = getattr(block, parent_name)
            setattr(parent, child, LoraLinear(getattr(parent, child), cfg.rank, cfg.alpha, cfg.dropout))
    store_base(model, BASE_DTYPES[cfg.base_dtype])
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def store_base(model: nn.Module, dtype: torch.dtype) -> int:
    """Keep the frozen weights of the adapted layers in `dtype` (bf16: half their memory; the adapters, norms,
    biases and the embedding stay fp32), in place. The forward casts them back per call, so an adapted model and
    its reference (adapters off) both compute on the rounded weights. Returns the bytes saved."""
    saved = 0
    for m in lora_layers(model).values():
        if m.weight.dtype != dtype:
            saved += m.weight.numel() * (m.weight.element_size() - torch.empty((), dtype=dtype).element_size())
            m.weight = nn.Parameter(m.weight.to(dtype), requires_grad=False)
    return saved


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Within the block, `model` computes its base model: every adapter is switched off."""
    layers = list(lora_layers(model).values())
    before = [m.active for m in layers]
    for m in layers:
        m.active = False
    try:
        yield
    finally:
        for m, a in zip(layers, before):
            m.active = a


class AdaptersOff(nn.Module):
    """The frozen reference of a LoRA run: the policy's own weights with the adapters off, without gradients.
    Called like the Transformer it wraps (and not registered in anything that trains)."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.cfg = model.cfg
        self._model = [model]  # a list, so the policy does not become a submodule (no double counting, no .eval())

    @torch.no_grad()
    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        model = self._model[0]
        with adapters_off(model):
            return model(*args, **kwargs)


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its weight, W <- W + (alpha / r) B A, and put plain nn.Linear layers back (in place):
    the merged model computes what the adapted one did (to rounding) at the base's cost, and saves as a full one."""
    for name, m in lora_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        delta = m.delta()  # fp32; a base kept in bf16 is merged in fp32, as the forward computes it
        linear.weight = nn.Parameter(m.weight.to(delta.dtype) + delta, requires_grad=False)
        if m.bias is not None:
            linear.bias = m.bias
        setattr(parent, child, linear)


def lora_config_of(model: nn.Module) -> LoraConfig:
    """The LoraConfig that made an adapted model's adapters (what its adapter_config.json records)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters")
    first = next(iter(layers.values()))
    rank = first.lora_A.shape[0]
    ours = {name.split(".", 2)[2] for name in layers}  # "layers.0.attn.q" -> "attn.q"
    return LoraConfig(rank=rank, alpha=first.scale * rank, dropout=first.dropout,
                      targets=[peft for peft, mine in TARGETS.items() if mine in ours])


def _peft_module(hf: dict[str, str], name: str) -> str:
    """PEFT's name of one of our linear layers: "layers.0.attn.q" -> "base_model.model.model.layers.0.self_attn.q_proj"
    (`hf`: model.hf_names)."""
    return PEFT_PREFIX + hf[f"{name}.weight"].removesuffix(".weight")


def peft_names(model: Transformer) -> dict[str, str]:
    """Our adapter tensor names -> PEFT's ("layers.0.attn.q.lora_A" ->
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")."""
    hf = hf_names(model.cfg)
    out = {}
    for name in lora_layers(model):
        module = _peft_module(hf, name)
        out.update({f"{name}.lora_A": f"{module}.lora_A.weight", f"{name}.lora_B": f"{module}.lora_B.weight"})
    return out


def adapter_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's names, on the CPU (what adapter_model.safetensors holds)."""
    sd = model.state_dict()
    return {theirs: sd[ours].detach().float().cpu().contiguous() for ours, theirs in peft_names(model).items()}


def adapter_shapes(model: Transformer, cfg: LoraConfig) -> dict[str, tuple[int, int]]:
    """PEFT name -> shape of every adapter tensor that `cfg` puts on `model` (nothing allocated): checked against a
    file's header before a crafted rank can ask for memory."""
    hf, out = hf_names(model.cfg), {}
    for i, block in enumerate(model.layers):
        for name in modules(cfg.targets):
            base = block.get_submodule(name)
            module = _peft_module(hf, f"layers.{i}.{name}")
            out[f"{module}.lora_A.weight"] = (cfg.rank, base.in_features)
            out[f"{module}.lora_B.weight"] = (base.out_features, cfg.rank)
    return out


@torch.no_grad()
def load_adapters(model: Transformer, tensors: dict[str, torch.Tensor], where: str | Path) -> None:
    """Copy adapter tensors under PEFT's names into `model`'s adapters (every one must be there)."""
    params = dict(model.named_parameters())
    for ours, theirs in peft_names(model).items():
        if theirs not in tensors:
            raise CakeError(f"{where}: no tensor {theirs}")
        params[ours].copy_(tensors[theirs])


def adapter_config(cfg: LoraConfig, base: str) -> dict[str, Any]:
    """adapter_config.json as PEFT writes it for a causal LM (the fields PeftModel.from_pretrained reads)."""
    targets = sorted(TARGETS) if ALL_LINEAR in cfg.targets else sorted(dict.fromkeys(cfg.targets))
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": cfg.rank,
            "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": targets, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
            "rank_pattern": {}, "alpha_pattern": {}}


def config_from_adapter(d: dict[str, Any], where: str | Path) -> LoraConfig:
    """The LoraConfig of an adapter_config.json (ours or PEFT's); what we cannot compute is refused in one line."""
    if d.get("peft_type") != "LORA":
        raise CakeError(f"{where}: peft_type {d.get('peft_type')!r} is not supported (only LORA)")
    for key, ok in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False), ("bias", "none")):
        if d.get(key, ok) not in (ok, None):
            raise CakeError(f"{where}: {key} {d[key]!r} is not supported")
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save"):
        if d.get(key):
            raise CakeError(f"{where}: {key} is not supported")
    rank, alpha, targets = d.get("r"), d.get("lora_alpha"), d.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if not (isinstance(rank, int) and rank > 0 and isinstance(alpha, (int, float)) and isinstance(targets, list)
            and all(isinstance(t, str) for t in targets)):
        raise CakeError(f"{where}: needs r (a positive integer), lora_alpha and target_modules")
    try:
        return LoraConfig(rank=rank, alpha=float(alpha), dropout=float(d.get("lora_dropout") or 0.0),
                          targets=list(targets))
    except ConfigError as e:
        raise CakeError(f"{where}: {str(e).removeprefix('--lora.')}") from None
