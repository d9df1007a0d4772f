"""--log-to: the TensorBoard event files, read back with TensorBoard's own reader, hold the same scalars as
metrics.jsonl; a tracker whose package is missing stops the run before it trains; the pipeline passes the option
to every training stage without making a finished run stale."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from cakelm.checkpoint import load_meta
from cakelm.common import CakeError
from cakelm.config import ConfigError, to_dict
from cakelm.stages import pipeline
from cakelm.tracking import Tracker, parse_backends

pytest.importorskip("tensorboard")  # the `dev` extra installs it; `cakelm[track]` for users

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from tests.test_loop import run_pretrain  # noqa: E402


def events(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator) -> dict[str, dict[int, float]]:
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def jsonl_scalars(path: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as {metric: {step: value}}, without null (non-finite) values."""
    out: dict[str, dict[int, float]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        for k, v in row.items():
            if k != "step" and v is not None:
                out.setdefault(k, {})[row["step"]] = float(v)
    return out


def test_tensorboard_events_hold_the_metrics_jsonl_scalars_config_and_hardware(tok_dir, tmp_path) -> None:
    out = run_pretrain(tok_dir, tmp_path / "run" / "base",
                       **{"loop.max_steps": 6, "loop.log_every": 2, "loop.eval_every": 3, "loop.log_to": "tensorboard"})
    expected = jsonl_scalars(out / "metrics.jsonl")
    assert {"loss", "lr", "grad_norm", "val_loss", "val_bpb"} <= expected.keys()
    assert sorted(expected["loss"]) == [2, 4, 6] and sorted(expected["val_loss"]) == [3, 6]
    acc = events(out / "tb")
    got = scalars(acc)
    assert got.keys() == expected.keys()
    for tag, by_step in expected.items():
        assert got[tag].keys() == by_step.keys(), tag
        for step, v in by_step.items():  # event files store float32
            assert got[tag][step] == pytest.approx(v, rel=1e-6, abs=1e-30), (tag, step)
    texts = {t: acc.Tensors(t)[0].tensor_proto.string_val[0].decode() for t in acc.Tags()["tensors"]}
    config = json.loads(texts["config/text_summary"].strip("`\n"))
    assert config["loop"]["max_steps"] == 6 and config["out"] == str(out)
    assert json.loads(texts["hardware/text_summary"].strip("`\n"))["torch_threads"] >= 1
    assert load_meta(out)["config"]["loop"]["log_to"] == "tensorboard"
    # --log-to does not block --resume: going on with another value continues the same run
    run_pretrain(tok_dir, out, **{"loop.max_steps": 8, "loop.log_every": 2, "loop.eval_every": 3, "resume": True})
    assert load_meta(out)["step"] == 8


def test_a_resumed_run_purges_the_events_past_its_checkpoint(tmp_path) -> None:
    # a run logs steps 1-4 and crashes after its checkpoint at step 2; the resumed run logs 3-5 anew
    with Tracker("tensorboard", tmp_path, {"a": 1}, {"cpu": "x"}) as tr:
        for step in range(1, 5):
            tr.log({"step": step, "loss": float(step), "val_loss": math.nan})
    with Tracker("tensorboard", tmp_path, {"a": 1}, {"cpu": "x"}, start_step=2) as tr:
        for step in range(3, 6):
            tr.log({"step": step, "loss": 10.0 * step, "skipped": 0})
    acc = events(tmp_path / "tb")
    assert sorted(acc.Tags()["scalars"]) == ["loss", "skipped"]  # NaN left out, as metrics.jsonl's null
    # every event in order, so a step logged twice (not purged) would show
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]


@pytest.mark.parametrize("backend", ["tensorboard", "wandb", "trackio"])
def test_a_missing_tracker_package_is_a_one_line_error_before_training(tok_dir, tmp_path, monkeypatch,
                                                                       backend) -> None:
    monkeypatch.setitem(sys.modules, backend, None)  # `import backend` now fails as if it were not installed
    with pytest.raises(CakeError) as err:
        run_pretrain(tok_dir, tmp_path / "base", **{"loop.max_steps": 2, "loop.log_to": f"tensorboard,{backend}"})
    assert str(err.value) == f"--log-to {backend}: the {backend} package is not installed (pip install {backend})"
    assert not (tmp_path / "base").exists()  # stopped at start-up: nothing trained, nothing written
    with pytest.raises(CakeError, match=f"pip install {backend}"):  # the pipeline, before its first stage
        pipeline.main(pipeline.PipelineConfig(preset="micro", out=str(tmp_path / "run"), log_to=backend))
    assert not (tmp_path / "run").exists()


def test_backend_names_are_checked() -> None:
    assert parse_backends(" wandb, tensorboard,wandb ") == ("wandb", "tensorboard")
    assert parse_backends("") == ()
    with pytest.raises(ConfigError, match="unknown backend 'mlflow'"):
        parse_backends("tensorboard,mlflow")


def test_the_pipeline_passes_log_to_to_every_training_stage_and_a_done_run_stays_done(tmp_path) -> None:
    run = tmp_path / "run"
    plain = pipeline._stage_configs(pipeline.PipelineConfig(preset="micro", out=str(run)), run)
    cfg = pipeline.PipelineConfig(preset="micro", out=str(run), log_to="tensorboard")
    tracked = pipeline._stage_configs(cfg, run)
    trained = [n for n, c in tracked.items() if pipeline.STAGE[n].trains]
    assert {"pretrain", "sft", "reward", "dpo", "ppo", "grpo"} <= set(trained)
    for name in trained:
        assert tracked[name].loop.log_to == "tensorboard" and plain[name].loop.log_to == ""
        # a stage finished without trackers is not redone because they are asked for now
        assert pipeline._same(to_dict(plain[name]), to_dict(tracked[name])), name
