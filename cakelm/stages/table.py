"""The one table of cakelm's stages and tools: what `cakelm --help` lists, what `cakelm pipeline` runs and in which
order, where each writes in a run directory, what it reads from earlier stages, and which row of the report's
models table it fills. `__main__`, `stages/pipeline.py`, `stages/rounds.py`, `report.py` and
`benchmarks/recipes.py` read it; nothing else lists stages.

Adding a stage: write `cakelm/stages/NAME.py` (a Config dataclass, PRESETS, `main(cfg) -> Path`, `summary(meta)`)
and add its row below, in pipeline order. A training stage starts with `scaffold.start` and trains through
`Run.train`; an RL stage builds its rollouts from `cakelm.rl`; its loss goes in `losses.py`.

    STAGE["grpo"].main(config)                            # run a stage
    [s.name for s in STAGES if s.pipeline]                # the pipeline's stages, in order
    [s.model for s in STAGES if s.model]                  # the report's model rows, in order
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from cakelm import label, rl, serve
from cakelm.rlhf import heldout_summary
from cakelm.stages import (
    chat,
    compare,
    data,
    dpo,
    export,
    grpo,
    import_model,
    ppo,
    prefs,
    pretrain,
    reward,
    rloo,
    sample,
    sft,
    tokenizer,
)
from cakelm.stages import eval as eval_stage


@dataclass(frozen=True)
class Stage:
    """One command. The fields after `presets` say how a pipeline run uses it."""

    name: str  # the command: `cakelm NAME`
    module: ModuleType  # its docstring is the command's --help
    config: type  # the Config dataclass: the command's options
    help: str  # its line in `cakelm --help`
    main: Callable[[Any], Any]
    presets: dict[str, dict[str, Any]] | None = None
    pipeline: bool = False  # a step of `cakelm pipeline`
    default: bool = True  # run by a plain `cakelm pipeline` (else only with --only NAME or --with NAME)
    out: str | None = None  # its output in the run directory (a folder, or samples.txt / eval.json)
    preset_key: str | None = None  # the entry of a pipeline preset that names this stage's preset
    inputs: dict[str, str] = field(default_factory=dict)  # config field -> the stage whose output it reads
    options: dict[str, str] = field(default_factory=dict)  # config field -> the pipeline option it takes
    trains: bool = False  # on the shared loop: resumable, and run by every rank under torchrun
    model: str | None = None  # its row in eval.json and the report's models table
    summary: Callable[[dict[str, Any]], str] | None = None  # the pipeline's one-line result, from its meta.json


RLHF_INPUTS = {"init": "sft", "data": "prefs", "reward_model": "reward"}

STAGES: tuple[Stage, ...] = (
    Stage("data", data, data.DataConfig, "fetch/read raw text and split train/validation documents", data.main,
          pipeline=True, out="data", options={"data": "data"}, summary=data.summary),
    Stage("tokenizer", tokenizer, tokenizer.TokenizerConfig, "train the BPE tokenizer and encode token shards",
          tokenizer.main, tokenizer.PRESETS, pipeline=True, out="tokenizer", preset_key="tokenizer",
          inputs={"data": "data"}, summary=tokenizer.summary),
    Stage("pretrain", pretrain, pretrain.PretrainConfig, "next-token pretraining (DDP under torchrun)", pretrain.main,
          pretrain.PRESETS, pipeline=True, out="base", preset_key="pretrain", inputs={"data": "tokenizer"},
          trains=True, model="base", summary=pretrain.summary),
    Stage("sample", sample, sample.SampleConfig, "print continuations of a prompt from a checkpoint", sample.main,
          pipeline=True, out="samples.txt", inputs={"ckpt": "pretrain"}),
    Stage("sft", sft, sft.SFTConfig, "supervised fine-tuning on conversations (assistant-only loss)", sft.main,
          sft.PRESETS, pipeline=True, out="sft", preset_key="sft", inputs={"init": "pretrain"},
          options={"data": "sft_data"}, trains=True, model="sft", summary=sft.summary),
    Stage("prefs", prefs, prefs.PrefsConfig, "preference pairs: a chat model's replies judged by the rule-based rater",
          prefs.main, prefs.PRESETS, pipeline=True, out="prefs", preset_key="rlhf", inputs={"init": "sft"},
          options={"data": "prefs_data"}, summary=prefs.summary),
    Stage("reward", reward, reward.RewardConfig, "reward model from preference pairs (Bradley-Terry); `cakelm reward "
          "score CKPT --data FILE` scores replies", reward.main, reward.PRESETS, pipeline=True, out="rm",
          preset_key="rlhf", inputs={"init": "sft", "data": "prefs"}, trains=True, summary=reward.summary),
    Stage("dpo", dpo, dpo.DPOConfig, "Direct Preference Optimization on preference pairs (sigmoid, IPO; RPO)",
          dpo.main, dpo.PRESETS, pipeline=True, out="dpo", preset_key="rlhf", inputs=RLHF_INPUTS, trains=True,
          options={"replay": "sft_data"}, model="dpo", summary=heldout_summary),
    Stage("ppo", ppo, ppo.PPOConfig, "RLHF with PPO against a reward model (value model, GAE, KL penalty)", ppo.main,
          ppo.PRESETS, pipeline=True, out="ppo", preset_key="rlhf", inputs=RLHF_INPUTS, trains=True, model="ppo",
          options={"replay": "sft_data"}, summary=heldout_summary),
    Stage("grpo", grpo, grpo.GRPOConfig, "RL from verifiable rewards: GRPO on task prompts (DAPO/Dr. GRPO options)",
          grpo.main, grpo.PRESETS, pipeline=True, out="grpo", preset_key="rl", inputs={"init": "dpo"},
          options={"data": "grpo_data", "rewards": "rewards", "replay": "sft_data", "loop.max_steps": "grpo_steps"},
          trains=True, model="grpo",
          summary=rl.summary),
    Stage("rloo", rloo, rloo.RLOOConfig, "RL with REINFORCE Leave-One-Out against a reward model and verifiable "
          "rewards", rloo.main, rloo.PRESETS, pipeline=True, default=False, out="rloo", preset_key="rl",
          inputs={"init": "sft", "reward_model": "reward"}, trains=True, model="rloo", summary=rl.summary),
    Stage("eval", eval_stage, eval_stage.EvalConfig, "task accuracy, end-of-turn rate and held-out chat loss",
          eval_stage.main, pipeline=True, out="eval.json"),
    Stage("compare", compare, compare.CompareConfig, "Transformer vs an LSTM of equal size: speed by context, bits "
          "per byte at equal time, loss by position", compare.main, compare.PRESETS, pipeline=True, out="compare",
          preset_key="compare", inputs={"data": "tokenizer"}, summary=compare.summary),
    # tools: not pipeline steps
    Stage("reward-score", reward, reward.ScoreConfig, "score replies with a reward model (also `reward score`)",
          reward.score_main),
    Stage("chat", chat, chat.ChatConfig, "chat with a checkpoint in the terminal (streamed replies)", chat.main),
    Stage("serve", serve, serve.ServeConfig, "OpenAI-compatible HTTP API and a web chat page", serve.main),
    Stage("label", label, label.LabelConfig, "a web page where people pick the better of two replies (SQLite); "
          "`cakelm label export DB --out FILE` writes preference pairs", label.main),
    Stage("label-export", label, label.LabelExportConfig, "label database -> preference JSONL (also `label export`)",
          label.export_main),
    Stage("export", export, export.ExportConfig, "export a checkpoint (Hugging Face Llama directory)", export.main),
    Stage("import", import_model, import_model.ImportConfig, "import a pretrained Llama-family model (smollm2, a "
          "Hugging Face directory, a GGUF file, a hub id)", import_model.main),
)

STAGE: dict[str, Stage] = {s.name: s for s in STAGES}
MODELS: tuple[str, ...] = tuple(s.model for s in STAGES if s.model)  # the report's model rows, in pipeline order
