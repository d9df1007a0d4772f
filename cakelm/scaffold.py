"""The run scaffold: what every training stage (pretrain, sft, reward, dpo, ppo, grpo, rloo) does around its own
data and loss, written once so it behaves the same everywhere.

    run = start("dpo", cfg)                # None: --resume of a complete run, nothing to do
    if run is None:
        return Path(cfg.out)
    ref = run.reference()                  # the frozen --init, loaded once, shared by the loss and evaluations
    ...                                    # the stage's data, batches, loss and evaluation
    run.announce(f"beta {cfg.beta}, {len(rows)} pairs")
    metrics = run.train(model, batches, loss_fn, evaluate, meta={"pairs": ...})
    run.done(f"held-out pair accuracy {metrics['val_pair_accuracy']:.3f}", metrics)

`start`:
1. torch.distributed set-up (under torchrun) and the device;
2. where the run starts (`checkpoint.resume_point`): fresh, resumed (--resume of an unfinished run with the same
   options), or already complete; a checkpoint already in --out is never silently replaced (--overwrite);
   "--resume: no checkpoint in OUT yet" when there is nothing to resume;
3. the weights: the checkpoint in --out when resuming, else --init (none: pretraining from scratch), with its
   tokenizer and meta.json; a stage that improves a chat model refuses a base model (`needs_chat`); a stage
   that reads data encoded with a tokenizer (`tok=`) refuses a model with another one;
4. the saved train state (optimizer, RNG, the batch provider's state) when resuming;
5. LoRA (`--lora.rank`, `cakelm.lora`): adapters on the loaded model (frozen), or the resumed run's adapters;
   the checkpoints then hold the adapters and the base's path (--init's);
6. the random state seeded with --seed, so what a stage initialises at random (a fresh model, a reward model's
   head) does not depend on what ran before it in the process (`cakelm pipeline --from reward` makes the reward
   model a full run makes).

`Run` then gives the stage the frozen reference (`reference`: --init loaded once, or with LoRA the model itself with
its adapters off), a frozen reward model (`reward_model`, tokenizer
checked), the rollout generator over the policy (`generator`), the start-up line (`announce`), the training run
itself on the shared loop (`train`, which saves checkpoints whose meta.json carries the stage, step, resolved
config, metrics, lineage, world size and the stage's own `meta`), and the last line (`done`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cakelm.chat_format import format_of
from cakelm.checkpoint import load_heads, load_model, load_train_state, resume_point, save_checkpoint, weights_digest
from cakelm.common import CakeError, DistInfo, hardware_info, init_distributed, print0, seed_everything
from cakelm.config import to_dict
from cakelm.loop import BatchSource, LoopConfig, LoopContext, train
from cakelm.lora import BASE_DTYPES, AdaptersOff, LoraConfig, add_lora, has_lora, lora_config_of, store_base
from cakelm.model import Transformer
from cakelm.rlhf import ScalarModel, load_scalar_model
from cakelm.rollout import EngineGenerator, Generator, check_exact
from cakelm.tokenizer import Tokenizer
from cakelm.tracking import Tracker, require


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers map text to the same ids (same vocabulary and special tokens)."""
    return a.vocab_size == b.vocab_size and a.hf.get_vocab(with_added_tokens=True) == \
        b.hf.get_vocab(with_added_tokens=True)


@dataclass
class Run:
    """A training stage's run (see the module docstring). `model` is the Transformer the stage trains and saves
    (None only for pretraining from scratch, until the stage builds one)."""

    stage: str
    cfg: Any
    info: DistInfo
    device: torch.device
    out: Path
    resumed: bool
    model: Transformer | None
    tok: Tokenizer
    meta: dict[str, Any]  # meta.json of the checkpoint the weights came from ({} for a random init)
    resume_state: dict[str, Any] | None
    fmt: str  # the chat format the trained model speaks: "chat", or "playscript" for a base model
    lora_base: dict[str, str] | None = None  # LoRA: {"path", "weights_sha256"} of the checkpoint the adapters go on
    t0: float = field(default_factory=time.time)
    _ref: Transformer | None = None

    @property
    def init(self) -> str | None:
        return getattr(self.cfg, "init", None)

    @property
    def parent_stage(self) -> str | None:
        return self.meta.get("parent_stage") if self.resumed else self.meta.get("stage")

    @property
    def lineage(self) -> list[dict[str, Any]]:
        """The checkpoints this one descends from, oldest first: [{"stage", "ckpt"}, ...]."""
        if self.resumed:
            return list(self.meta.get("lineage", []))
        if not self.init:
            return []
        return [*self.meta.get("lineage", []), {"stage": self.meta.get("stage"), "ckpt": str(self.init)}]

    def check_tokenizer(self, tok: Tokenizer, what: str) -> None:
        """Refuse `what` (a reward model, the data) when it uses another tokenizer than the model."""
        if not same_tokenizer(tok, self.tok):
            raise CakeError(f"{self.stage}: {what} uses another tokenizer ({tok.vocab_size} tokens) than "
                            f"{self.init or self.out} ({self.tok.vocab_size} tokens)")

    def reference(self) -> Transformer:
        """The frozen starting model (--init) for KL terms and evaluations: loaded once, in eval mode; with LoRA,
        the trained model itself with its adapters off (no second copy)."""
        if self.lora_base is not None:
            assert self.model is not None
            return AdaptersOff(self.model)  # type: ignore[return-value]  # called like the Transformer
        if self._ref is None:
            if not self.init:
                raise CakeError(f"{self.stage}: a reference model needs --init")
            ref, tok, _ = load_model(self.init, self.device)
            self.check_tokenizer(tok, f"the reference {self.init}")
            self._ref = ref.requires_grad_(False).eval()
        return self._ref

    def reward_model(self, path: str) -> ScalarModel:
        """A frozen reward model (`cakelm reward` output) that must share the policy's tokenizer."""
        rm, tok, _ = load_scalar_model(path, self.device)
        self.check_tokenizer(tok, f"the reward model {path}")
        return rm.requires_grad_(False).eval()

    def heads(self) -> dict[str, torch.Tensor]:
        """The extra tensors (heads.safetensors) of the checkpoint being resumed."""
        return load_heads(self.out)

    def generator(self, model: Transformer, chunk: int = 256) -> Generator:
        """The rollout generator over `model`'s weights (the in-process engine; see `cakelm.rollout`)."""
        gen = EngineGenerator(model, self.tok, chunk)
        check_exact(gen)
        return gen

    def announce(self, what: str, params: int | None = None) -> None:
        """The start-up line: parameters, where they came from, the stage's own `what`, steps, device, resume."""
        assert self.model is not None
        cfg, info = self.cfg, self.info
        source = f"from {self.init}" if self.init else "from a random init"
        if has_lora(self.model):
            lc = lora_config_of(self.model)
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            source += (f" with LoRA adapters (rank {lc.rank}, alpha {lc.alpha:g} on {', '.join(lc.targets)}: "
                       f"{trainable / 1e6:.2f}M trainable)")
        print0(f"{self.stage}: {(params or self.model.num_params()) / 1e6:.2f}M {'trainable ' if params else ''}"
               f"parameters {source}; {what}; "
               f"{cfg.loop.max_steps} steps on {self.device}" + (f" x {info.world_size} ranks" if info.enabled else "")
               + (f"; resuming from step {self.resume_state['step']}" if self.resume_state else ""), info=info)

    def train(self, model: nn.Module, batches: BatchSource,
              loss_fn: Callable[[nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor]]],
              evaluate: Callable[[nn.Module], dict[str, float]] | None, meta: dict[str, Any] | None = None,
              heads: Callable[[], dict[str, torch.Tensor]] | None = None, loop: LoopConfig | None = None,
              flops_per_token: float | None = None, show: tuple[str, ...] = ()) -> dict[str, Any]:
        """Train `model` (the Transformer, or a module around it) on the shared loop and save checkpoints of
        `self.model` (plus `heads()` in heads.safetensors) with the common metadata and `meta`. `loop` replaces
        cfg.loop when the stage derives some of it (RL stages: the micro-batches per step)."""
        assert self.model is not None
        cfg, info = self.cfg, self.info

        def save(step: int, metrics: dict[str, Any], train_state: dict[str, Any], final: bool) -> None:
            assert self.model is not None
            staged = train_state.pop("optimizer_dir", None)  # --loop.parallel fsdp: the ranks' optimizer shards
            save_checkpoint(self.out, self.model, self.tok, {
                "stage": self.stage, "step": step, "complete": final, "config": to_dict(cfg), "metrics": metrics,
                "parent": self.init, "parent_stage": self.parent_stage, "lineage": self.lineage,
                "chat_format": self.fmt, "world_size": info.world_size,
                "tokens": train_state["tokens_seen"], "num_params": self.model.num_params(),
                **({"lora_base": self.lora_base} if self.lora_base else {}), **(meta or {}),
            }, train_state, heads=heads() if heads else None, optimizer_dir=staged)

        model.train()
        loop = loop or cfg.loop
        # --log-to: rank 0 also sends every metrics row, the resolved config and the hardware to the trackers
        start_step = int(self.resume_state["step"]) if self.resume_state else 0
        tracking = Tracker(loop.log_to, self.out, to_dict(cfg), hardware_info(self.device), start_step) \
            if loop.log_to and info.is_main else nullcontext()
        with tracking as tracker:
            return train(model, loop, cfg.optim, LoopContext(self.device, info, self.out), batches, loss_fn,
                         evaluate, save, self.resume_state, flops_per_token, show, tracker)

    def done(self, result: str, metrics: dict[str, Any]) -> Path:
        """The last line: the step reached, the stage's `result`, where it went and how long it took."""
        print0(f"{self.stage}: step {metrics.get('step')}, {result} -> {self.out} ({time.time() - self.t0:.0f}s)",
               info=self.info)
        return self.out


def start(stage: str, cfg: Any, needs_chat: bool = True, fmt: str = "chat", tok: Tokenizer | None = None
          ) -> Run | None:
    """Start (or resume) `stage` as its config says (see the module docstring). `needs_chat`: the stage improves
    a chat model, so --init must be one. `fmt`: the chat format the trained model speaks. `tok`: the tokenizer
    the stage's data was encoded with, which the model must share (and the one a model from scratch gets)."""
    info, device = init_distributed(cfg.loop.device)
    require(cfg.loop.log_to)  # a tracker's package missing: say so now, not after loading data and models
    seed_everything(cfg.loop.seed)
    out = Path(cfg.out)
    init = getattr(cfg, "init", None)
    point = resume_point(out, cfg.resume, cfg.overwrite, cfg.loop.max_steps, to_dict(cfg))
    if point == "done":
        print0(f"{stage}: {out} is already complete (raise --max-steps to go on)", info=info)
        return None
    if cfg.resume and point == "fresh":
        print0(f"--resume: no checkpoint in {out} yet, starting from {init or 'scratch'}", info=info)
    resumed = point == "resume"
    source = out if resumed else init
    lora: LoraConfig | None = getattr(cfg, "lora", None)
    adapt = lora is not None and lora.on
    if adapt and not init:
        raise CakeError(f"{stage}: --lora.rank needs --init (the model the adapters go on)")
    if adapt and cfg.optim.name == "muon":
        raise CakeError(f"{stage}: LoRA adapters train with AdamW (Muon orthogonalises whole-matrix updates, not "
                        "low-rank factors): add --optim.name adamw and a LoRA learning rate, e.g. --optim.lr 2e-4")
    model, meta = None, {}
    if source:
        # a run going on with its adapters loads them as adapters; anything else loads merged weights
        model, loaded_tok, meta = load_model(source, device, merge=not (resumed and adapt))
        if not resumed and needs_chat and format_of(meta) != "chat":
            raise CakeError(f"{stage}: {init} is a base model (it speaks the playscript); {stage} improves a chat "
                            "model: run `cakelm sft` first and pass its checkpoint as --init")
        if tok is not None and not same_tokenizer(loaded_tok, tok):
            raise CakeError(f"{stage}: {source} was trained with another tokenizer ({loaded_tok.vocab_size} tokens) "
                            f"than the data ({tok.vocab_size} tokens)")
        tok = loaded_tok
    if tok is None:
        raise CakeError(f"{stage}: no --init checkpoint to start from")
    resume_state = load_train_state(out) if resumed else None
    lora_base = None
    if adapt:
        assert model is not None and lora is not None and init
        if resumed:  # the adapters came back with the checkpoint; the base as the run keeps it
            lora_base = meta["lora_base"]
            store_base(model, BASE_DTYPES[lora.base_dtype])
        else:
            add_lora(model, lora)
            lora_base = {"path": str(Path(init).resolve()), "weights_sha256": weights_digest(init)}
    return Run(stage, cfg, info, device, out, resumed, model, tok, meta, resume_state, fmt, lora_base)

