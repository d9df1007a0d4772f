"""The `cakelm` command: one subcommand per stage, each a Config dataclass and a `main(cfg)`.

    cakelm --help
    cakelm pipeline                    # every stage, pretraining to RLHF, with a report card
    cakelm pretrain --help             # every option, grouped (model., optim., loop.)
    torchrun --nproc_per_node 2 -m cakelm pretrain
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch.distributed as dist

from cakelm import __version__
from cakelm.common import CakeError
from cakelm.config import ConfigError, add_arguments, config_from_args
from cakelm.stages import pipeline, rounds
from cakelm.stages.table import STAGES, Stage

# Every command: the stage table's rows, and the two commands that run stages of it (they read the table, so they
# cannot be rows of it).
COMMANDS: dict[str, Stage] = {
    "pipeline": Stage("pipeline", pipeline, pipeline.PipelineConfig, "run every stage into one run directory",
                      pipeline.main),
    **{s.name: s for s in STAGES},
    "rlhf-round": Stage("rlhf-round", rounds, rounds.RoundConfig, "one round of RLHF: the latest policy's pairs, "
                        "judged (rule-based rater or people in `cakelm label`), reward model on every round, DPO or "
                        "PPO", rounds.main),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cakelm", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"cakelm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, s in COMMANDS.items():
        p = sub.add_parser(name, help=s.help, description=s.module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(p, s.config, s.presets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["reward", "score"]:  # `cakelm reward score CKPT ...` is the reward-score command
        argv = ["reward-score", *argv[2:]]
    if argv[:2] == ["label", "export"]:  # `cakelm label export DB ...` is the label-export command
        argv = ["label-export", *argv[2:]]
    ns = build_parser().parse_args(argv)
    command = COMMANDS[ns.command]
    try:
        command.main(config_from_args(command.config, ns, command.presets))
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
