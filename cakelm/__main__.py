"""The `cakelm` command: one subcommand per stage, each a Config dataclass and a `main(cfg)`.

    cakelm --help
    cakelm pipeline                    # every stage, pretraining to RLHF, with a report card
    cakelm pretrain --help             # every option, grouped (model., optim., loop.)
    torchrun --nproc_per_node 2 -m cakelm pretrain
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from cakelm import __version__
from cakelm.checkpoint import is_checkpoint, load_meta
from cakelm.common import CakeError
from cakelm.config import ConfigError, add_arguments, arg_layers, build_config, flatten
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


def canonical(argv: Sequence[str]) -> list[str]:
    """The two-word commands as their subcommand names: `reward score` is reward-score, `label export` is
    label-export."""
    argv = list(argv)
    if argv[:2] == ["reward", "score"]:
        argv = ["reward-score", *argv[2:]]
    if argv[:2] == ["label", "export"]:
        argv = ["label-export", *argv[2:]]
    return argv


def saved_options(cls: type, layers: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """With --resume, the options saved with the run in --out (its meta.json), as a layer under those given now:
    a bare `cakelm sft --out DIR --resume` continues the run as it was started. Options given now still have to
    agree with the saved ones, except the resumable ones such as --max-steps (`checkpoint.check_same_run`)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "resume" not in fields or "out" not in fields:
        return []
    given = {key: value for _, layer in layers for key, value in layer.items()}
    out = Path(given.get("out", fields["out"].default))
    if not given.get("resume") or not is_checkpoint(out):
        return []  # nothing to continue: the stage starts afresh (and says so)
    saved = load_meta(out).get("config")
    return [(str(out / "meta.json"), flatten(saved))] if isinstance(saved, dict) else []


def config_of(command: Stage, ns: argparse.Namespace) -> Any:
    """The command's config: defaults < (with --resume) the run's saved options < --preset < --config < flags."""
    layers = arg_layers(ns, command.presets)
    return build_config(command.config, *saved_options(command.config, layers), *layers)


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(canonical(sys.argv[1:] if argv is None else argv))
    command = COMMANDS[ns.command]
    try:
        command.main(config_of(command, ns))
    except (CakeError, ConfigError) as e:
        # one write with its newline, not print's two: torchrun's ranks share one stderr, and between a rank's line
        # and its newline another rank's line could land (stderr writes through, unbuffered)
        sys.stderr.write(f"cakelm {ns.command}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"cakelm {ns.command}: interrupted\n")
        return 130
    except Exception:
        if not (dist.is_available() and dist.is_initialized()):
            raise
        # A rank of a distributed run that crashed: say where, then leave this block, which frees the traceback's
        # frames (and a DDP wrapper in them) while the process group is still registered. Raised on, the traceback
        # would outlive destroy_process_group below, and the DDP Reducer freed with it at exit would drop the gloo
        # group's last reference with the GIL held: ~ProcessGroupGloo then joins a worker thread that may be waiting
        # for the GIL to free a finished allreduce, and the crash becomes a hang (seen in tests/test_grpo.py's
        # DDP test, whose ranks freed DDP after destroying the group; py-spy showed both threads).
        sys.stderr.write(f"cakelm {ns.command}: rank {dist.get_rank()} failed:\n{traceback.format_exc()}")
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: its work is saved and its process group destroyed
        # Leave without the interpreter's teardown: in it, torch's C++ objects of a distributed run (gloo's worker
        # threads, FSDP's) are destroyed in no set order, and now and then one aborts the process (SIGABRT,
        # "terminate called without an active exception", no Python frame on the stack; seen here once in ~15
        # FSDP test runs, and pytorch/pytorch#179291 describes it), which fails a run that finished.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
