"""The run scaffold behaves the same in every training stage: the --resume hint, the base-model refusal, the
tokenizer checks of the data, the reward model and the reference, lineage in meta.json. And RL stages sample only
through the generator interface: a backend plugged in at `Run.generator` gets every rollout, its weights are
refreshed before every phase, and seeded samples do not depend on how prompts are batched."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cakelm
from cakelm.checkpoint import load_meta, load_model
from cakelm.common import CakeError
from cakelm.config import build_config
from cakelm.engine import SamplingParams
from cakelm.rollout import EngineGenerator
from cakelm.scaffold import Run
from cakelm.stages import dpo, grpo, ppo, pretrain, reward, rloo, sft
from cakelm.stages.table import STAGES
from tests.conftest import tiny_checkpoint, tiny_reward_model, toy_pairs
from tests.test_sft import write_jsonl

QUIET = {"loop.progress": False, "loop.log_every": 1, "loop.eval_every": 0, "optim.warmup_steps": 0,
         "loop.max_steps": 1}


@pytest.fixture(scope="module")
def models(tok_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    chat = tiny_checkpoint(root / "sft", tok_dir, "sft", "chat", dim=64, n_heads=4, n_kv_heads=4, max_seq_len=64)
    base = tiny_checkpoint(root / "base", tok_dir, "pretrain", "playscript", dim=64, n_heads=4, n_kv_heads=4,
                           max_seq_len=64)
    rows = toy_pairs(30)
    write_jsonl(root / "prefs.jsonl", rows)
    return {"chat": chat, "base": base, "rm": tiny_reward_model(root / "rm", chat), "prefs": root / "prefs.jsonl",
            "prompts": Path(write_jsonl(root / "prompts.jsonl", [{"prompt": r["prompt"], "answer": "3"}
                                                                 for r in rows]))}


def configs(m: dict[str, Path], tok_dir: Path, out: Path) -> dict[str, tuple]:
    """Each training stage with tiny options: (main, Config class, options)."""
    rl = {"max_new_tokens": 6, "val_size": 2, "group_size": 2, "prompts_per_step": 2}
    return {
        "pretrain": (pretrain.main, pretrain.PretrainConfig, {"data": str(tok_dir), "model.dim": 32,
                                                              "model.max_seq_len": 32, "loop.eval_tokens": 512}),
        "sft": (sft.main, sft.SFTConfig, {"init": str(m["base"]), "data": ["arithmetic"], "val_size": 4}),
        "reward": (reward.main, reward.RewardConfig, {"init": str(m["chat"]), "data": str(m["prefs"])}),
        "dpo": (dpo.main, dpo.DPOConfig, {"init": str(m["chat"]), "data": str(m["prefs"]), "reward_model": "",
                                          "replay": ["arithmetic"], "replay_batch": 2,
                                          "val_size": 2, "max_new_tokens": 6}),
        "ppo": (ppo.main, ppo.PPOConfig, {"init": str(m["chat"]), "data": str(m["prefs"]), "val_size": 2,
                                          "reward_model": str(m["rm"]), "prompts_per_step": 4, "max_new_tokens": 6,
                                          "replay": ["arithmetic"], "replay_batch": 2}),
        "grpo": (grpo.main, grpo.GRPOConfig, {"init": str(m["chat"]), "data": [str(m["prompts"])], **rl}),
        "rloo": (rloo.main, rloo.RLOOConfig, {"init": str(m["chat"]), "data": [str(m["prompts"])],
                                              "reward_model": str(m["rm"]), **rl}),
    }


def test_every_training_stage_starts_the_same_way(models, tok_dir, tmp_path, capsys) -> None:
    trains = [s.name for s in STAGES if s.trains]
    cases = configs(models, tok_dir, tmp_path)
    assert sorted(cases) == sorted(trains)  # every training stage of the table is covered here
    for name, (main, cls, kw) in cases.items():
        out = tmp_path / name
        main(build_config(cls, ("test", {**kw, **QUIET, "out": str(out), "resume": True})))
        said = capsys.readouterr().out
        assert f"--resume: no checkpoint in {out} yet" in said, name  # the hint, in every stage
        assert f"{name}: " in said and "1 steps on cpu" in said, name  # the start-up line
        meta = load_meta(out)
        assert meta["stage"] == name and meta["step"] == 1 and meta["complete"] and meta["world_size"] == 1
        assert meta["config"]["out"] == str(out) and "metrics" in meta and "code_version" in meta
        if name == "pretrain":
            assert meta["lineage"] == [] and meta["chat_format"] == "playscript"
        else:  # lineage: the checkpoint it started from, after that one's own
            assert meta["lineage"][-1] == {"stage": load_meta(kw["init"])["stage"], "ckpt": kw["init"]}
            assert meta["chat_format"] == "chat"
        main(build_config(cls, ("test", {**kw, **QUIET, "out": str(out), "resume": True})))
        assert f"{name}: {out} is already complete" in capsys.readouterr().out, name
        with pytest.raises(CakeError, match="already holds a checkpoint"):
            main(build_config(cls, ("test", {**kw, **QUIET, "out": str(out)})))
        if name not in ("pretrain", "sft"):  # the stages that improve a chat model refuse a base model
            with pytest.raises(CakeError, match="is a base model"):
                main(build_config(cls, ("test", {**kw, **QUIET, "out": str(tmp_path / "x"),
                                                 "init": str(models["base"])})))


def test_tokenizers_must_agree(models, tok_dir, tmp_path) -> None:
    # a model whose vocabulary differs (a tokenizer trained on other text) is refused as data, reward model,
    # or --init
    from cakelm.stages import tokenizer as tokenizer_stage
    from tests.conftest import make_corpus

    make_corpus(tmp_path / "corpus", n_docs=4, seed=7)
    other = tokenizer_stage.main(build_config(tokenizer_stage.TokenizerConfig, (
        "test", {"data": [str(tmp_path / "corpus")], "out": str(tmp_path / "tok2"), "vocab_size": 300})))
    foreign = tiny_checkpoint(tmp_path / "foreign", other, "sft", "chat", vocab_size=300, max_seq_len=64)
    cases = configs(models, tok_dir, tmp_path)
    main, cls, kw = cases["ppo"]
    with pytest.raises(CakeError, match="the reward model .* uses another tokenizer"):
        main(build_config(cls, ("test", {**kw, **QUIET, "out": str(tmp_path / "p"),
                                         "reward_model": str(tiny_reward_model(tmp_path / "rm2", foreign))})))
    main, cls, kw = cases["pretrain"]
    with pytest.raises(CakeError, match="was trained with another tokenizer"):
        main(build_config(cls, ("test", {**kw, **QUIET, "out": str(tmp_path / "b"), "init": str(foreign)})))


class Recording:
    """A generator backend standing in for vLLM/SGLang: it delegates to the engine and records its calls."""

    exact_logprobs = True

    def __init__(self, model, tok) -> None:
        self.inner, self.tok, self.calls = EngineGenerator(model, tok), tok, []

    def refresh(self) -> None:
        self.calls.append("refresh")

    def generate(self, prompts, params, n=1, seeds=None, progress=None):
        self.calls.append(("generate", len(prompts), n, len(seeds or ())))
        return self.inner.generate(prompts, params, n, seeds, progress)


@pytest.mark.parametrize("stage", ["grpo", "rloo", "ppo"])
def test_rl_stages_sample_through_the_generator_interface(stage, models, tok_dir, tmp_path, monkeypatch) -> None:
    made: list[Recording] = []

    def generator(self, model, chunk=256):
        made.append(Recording(model, self.tok))
        return made[-1]

    monkeypatch.setattr(Run, "generator", generator)
    main, cls, kw = configs(models, tok_dir, tmp_path)[stage]
    one_step_phases = {"epochs": 1, "num_minibatches": 1}
    main(build_config(cls, ("test", {**kw, **QUIET, "out": str(tmp_path / stage), "loop.max_steps": 3,
                                     "loop.eval_every": 3, **one_step_phases})))
    rollouts = made[0]  # the training rollouts; evaluations may make their own over the evaluated model
    prompts = 4 if stage == "ppo" else 2
    n = 1 if stage == "ppo" else 2
    assert rollouts.calls == ["refresh", ("generate", prompts, n, prompts)] * 3  # one phase per step, seeded


def test_seeded_samples_do_not_depend_on_the_batching(models) -> None:
    model, tok, _ = load_model(models["chat"])
    prompts = [[{"role": "user", "content": f"Tell me of the king, friend {i}."}] for i in range(6)]
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    seeds = list(range(100, 106))
    whole = EngineGenerator(model, tok, chunk=256).generate(prompts, params, n=3, seeds=seeds)
    pieces = EngineGenerator(model, tok, chunk=3).generate(prompts, params, n=3, seeds=seeds)  # one prompt a call
    assert [r.ids for r in whole] == [r.ids for r in pieces]
    half = EngineGenerator(model, tok).generate(prompts[3:], params, n=3, seeds=seeds[3:])  # another rank's share
    assert [r.ids for r in whole[9:]] == [r.ids for r in half]
    assert len({tuple(r.ids) for r in whole}) > 9  # and they are samples, not one reply repeated


def test_rl_modules_build_no_engine() -> None:
    """Rollouts go through `rollout.Generator`: the RL stages, prefs, label, rounds and the shared RL modules
    import nothing from the engine but its sampling parameters."""
    root = Path(cakelm.__file__).parent
    for rel in ("stages/grpo.py", "stages/rloo.py", "stages/ppo.py", "stages/prefs.py", "stages/rounds.py",
                "label.py", "rl.py", "rlhf.py"):
        tree = ast.parse((root / rel).read_text(encoding="utf-8"))
        names = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module ==
                 "cakelm.engine" for a in node.names}
        assert names <= {"SamplingParams"}, (rel, names)
