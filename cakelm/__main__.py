"""The `cakelm` command: one subcommand per stage, each a Config dataclass and a `main(cfg)`.

    cakelm --help
    cakelm pipeline                    # every stage, pretraining to RLHF, with a report card
    cakelm pretrain --help             # every option, grouped (model., optim., loop.)
    torchrun --nproc_per_node 2 -m cakelm pretrain
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch.distributed as dist

from cakelm import __version__, label, serve
from cakelm.common import CakeError
from cakelm.config import ConfigError, add_arguments, config_from_args
from cakelm.stages import (
    chat,
    compare,
    data,
    dpo,
    export,
    grpo,
    import_model,
    pipeline,
    ppo,
    prefs,
    pretrain,
    reward,
    rounds,
    sample,
    sft,
    tokenizer,
)
from cakelm.stages import eval as eval_stage

# command -> (stage module, its Config class, its presets, one-line help)
COMMANDS: dict[str, tuple[ModuleType, type, dict | None, str]] = {
    "pipeline": (pipeline, pipeline.PipelineConfig, None, "run every stage into one run directory"),
    "data": (data, data.DataConfig, None, "fetch/read raw text and split train/validation documents"),
    "tokenizer": (tokenizer, tokenizer.TokenizerConfig, None, "train the BPE tokenizer and encode token shards"),
    "pretrain": (pretrain, pretrain.PretrainConfig, pretrain.PRESETS, "next-token pretraining (DDP under torchrun)"),
    "sft": (sft, sft.SFTConfig, sft.PRESETS, "supervised fine-tuning on conversations (assistant-only loss)"),
    "grpo": (grpo, grpo.GRPOConfig, grpo.PRESETS, "RL from verifiable rewards: GRPO on task prompts (DAPO/Dr. GRPO "
             "options)"),
    "prefs": (prefs, prefs.PrefsConfig, prefs.PRESETS, "preference pairs: a chat model's replies judged by the "
              "rule-based rater"),
    "reward": (reward, reward.RewardConfig, reward.PRESETS, "reward model from preference pairs (Bradley-Terry); "
               "`cakelm reward score CKPT --data FILE` scores replies"),
    "reward-score": (reward, reward.ScoreConfig, None, "score replies with a reward model (also `reward score`)"),
    "dpo": (dpo, dpo.DPOConfig, dpo.PRESETS, "Direct Preference Optimization on preference pairs (sigmoid, IPO)"),
    "ppo": (ppo, ppo.PPOConfig, ppo.PRESETS, "RLHF with PPO against a reward model (value model, GAE, KL penalty)"),
    "rlhf-round": (rounds, rounds.RoundConfig, None, "one round of RLHF: the latest policy's pairs, judged (rule-based "
                   "rater or people in `cakelm label`), reward model on every round, DPO or PPO"),
    "eval": (eval_stage, eval_stage.EvalConfig, None, "task accuracy, end-of-turn rate and held-out chat loss"),
    "sample": (sample, sample.SampleConfig, None, "print continuations of a prompt from a checkpoint"),
    "chat": (chat, chat.ChatConfig, None, "chat with a checkpoint in the terminal (streamed replies)"),
    "serve": (serve, serve.ServeConfig, None, "OpenAI-compatible HTTP API and a web chat page"),
    "label": (label, label.LabelConfig, None, "a web page where people pick the better of two replies (SQLite); "
              "`cakelm label export DB --out FILE` writes preference pairs"),
    "label-export": (label, label.LabelExportConfig, None, "label database -> preference JSONL (also `label "
                     "export`)"),
    "export": (export, export.ExportConfig, None, "export a checkpoint (Hugging Face Llama directory)"),
    "import": (import_model, import_model.ImportConfig, None, "import a pretrained Llama-family model (smollm2, "
               "a Hugging Face directory, a GGUF file, a hub id)"),
    "compare": (compare, compare.CompareConfig, compare.PRESETS, "Transformer vs an LSTM of equal size: speed by "
                "context, bits per byte at equal time, loss by position"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cakelm", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"cakelm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, cls, presets, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(p, cls, presets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["reward", "score"]:  # `cakelm reward score CKPT ...` is the reward-score command
        argv = ["reward-score", *argv[2:]]
    if argv[:2] == ["label", "export"]:  # `cakelm label export DB ...` is the label-export command
        argv = ["label-export", *argv[2:]]
    ns = build_parser().parse_args(argv)
    module, cls, presets, _ = COMMANDS[ns.command]
    run: Callable[[Any], Any] = {"reward-score": reward.score_main, "label-export": label.export_main}.get(
        ns.command, module.main)
    try:
        run(config_from_args(cls, ns, presets))
    except (CakeError, ConfigError) as e:
        print(f"cakelm {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cakelm {ns.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
