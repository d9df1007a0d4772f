"""Experiment tracking: every metrics.jsonl row also goes to TensorBoard, Weights & Biases and/or trackio.

    cakelm pretrain --log-to tensorboard          # OUT/tb/: `tensorboard --logdir OUT`
    cakelm pipeline --log-to tensorboard,wandb    # every training stage; `tensorboard --logdir runs/default`

metrics.jsonl is always written; `--log-to` adds the backends named (any of BACKENDS, comma-separated). Each one
gets every number of each metrics row as a scalar at its step (a NaN/inf value, which metrics.jsonl writes as null,
is left out), the stage's resolved config and the hardware line. Only rank 0 logs (the scaffold builds a Tracker
there only). The backends are optional packages, imported only when asked for: a missing one is a one-line error at
start-up that names the pip command, before any training (`require`).

Where the files go:
- TensorBoard: OUT/tb/ (the stage's own folder), so `tensorboard --logdir RUN` shows a pipeline's stages side by
  side (base/tb, sft/tb, ...). A resumed run purges the events past the step it resumed from, as metrics.jsonl does.
- wandb: OUT/wandb/, offline unless the user has logged in (WANDB_API_KEY, `wandb login`) or set WANDB_MODE;
  `wandb sync OUT/wandb/offline-run-*` uploads an offline run later. Project "cakelm", the run named after the
  stage's folder and grouped by the folder above it (the pipeline's run directory).
- trackio: its own local store (TRACKIO_DIR, default under the Hugging Face cache; `trackio show`), with the same
  project, name and group.
"""

from __future__ import annotations

import importlib
import json
import math
import netrc
import os
from pathlib import Path
from typing import Any

from cakelm.common import CakeError
from cakelm.config import ConfigError

# each backend is the package (and module) of that name; tensorboard is what torch's SummaryWriter writes with
BACKENDS = ("tensorboard", "wandb", "trackio")
PROJECT = "cakelm"


def parse_backends(spec: str) -> tuple[str, ...]:
    """'tensorboard,wandb' -> ("tensorboard", "wandb"); '' -> (); an unknown name is a ConfigError."""
    names = tuple(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    bad = [n for n in names if n not in BACKENDS]
    if bad:
        raise ConfigError(f"--log-to: unknown backend {bad[0]!r} (choose from {', '.join(BACKENDS)}, "
                          "comma-separated)")
    return names


def require(spec: str) -> tuple[str, ...]:
    """The backends `spec` names, each checked importable now, so a missing package stops the run before it
    trains (one-line CakeError with the pip command)."""
    names = parse_backends(spec)
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            raise CakeError(f"--log-to {name}: the {name} package is not installed (pip install {name})") from None
    return names


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's finite numbers, without the step (the x axis)."""
    out = {}
    for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


def _wandb_logged_in() -> bool:
    """Whether wandb has credentials (an API key in the environment, or `wandb login`'s ~/.netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class Tracker:
    """Fans each metrics row out to the backends named (see the module docstring). `start_step`: the step a
    resumed run continues from (0 for a fresh one). Use as a context manager, or call close()."""

    def __init__(self, spec: str, out: Path, config: dict[str, Any], hardware: dict[str, Any],
                 start_step: int = 0) -> None:
        self.names = require(spec)
        self._tb: Any = None
        self._wandb: Any = None
        self._trackio: Any = None
        out = Path(out).resolve()
        name, group = out.name, out.parent.name
        text = {"config": json.dumps(config, indent=2, sort_keys=True, default=str),
                "hardware": json.dumps(hardware, sort_keys=True, default=str)}
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard drops the earlier events at or past it (a crashed run's steps after its
            # last checkpoint), so the curves show the run that produced the checkpoint, like metrics.jsonl
            self._tb = SummaryWriter(str(out / "tb"), purge_step=start_step + 1 if start_step else None)
            for tag, body in text.items():  # a code block: the text plugin renders markdown
                self._tb.add_text(tag, "```\n" + body + "\n```", global_step=start_step)
            self._tb.flush()
        if "wandb" in self.names:
            import wandb

            mode = None if os.environ.get("WANDB_MODE") or _wandb_logged_in() else "offline"
            (out / "wandb").mkdir(parents=True, exist_ok=True)
            self._wandb = wandb.init(project=PROJECT, name=name, group=group, dir=str(out), mode=mode,
                                     config={**config, "hardware": hardware})
        if "trackio" in self.names:
            import trackio

            trackio.init(project=PROJECT, name=name, group=group, config={**config, "hardware": hardware})
            self._trackio = trackio

    def log(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl row (it must hold "step")."""
        step, values = int(row["step"]), _scalars(row)
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, global_step=step)
            self._tb.flush()  # a row every --loop.log-every steps: cheap, and a crash loses nothing logged
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        if self._trackio is not None:
            self._trackio.log(values, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._trackio is not None:
            self._trackio.finish()
            self._trackio = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
