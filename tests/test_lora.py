"""LoRA (issue 17, item 3; `cakelm.lora`): adapters start at the base model exactly, switch off to it exactly (the
KL/DPO reference without a second copy) and merge into it; a stage trained with --lora.rank changes only the
adapters and saves them in PEFT's format, which `peft` itself loads onto our Hugging Face export with our logits, for
each family; runs resume bit for bit; stages chain (sft -> dpo, each a LoRA checkpoint on the one before); every RL
stage trains with adapters; and bad options and crafted adapter files are one-line errors."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cakelm.__main__ import main as cli
from cakelm.checkpoint import load_model, save_checkpoint
from cakelm.common import CakeError
from cakelm.config import build_config
from cakelm.data.chat_batches import ChatBatches
from cakelm.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdaptersOff,
    LoraConfig,
    adapters_off,
    add_lora,
    has_lora,
    lora_config_of,
    lora_layers,
    merge_lora,
    store_base,
)
from cakelm.model import Transformer
from cakelm.stages import dpo, grpo, ppo, reward, rloo, sft
from cakelm.stages import export as export_stage
from cakelm.tokenizer import Tokenizer
from tests.conftest import ctrl_c_at, tiny_checkpoint, tiny_model_config, tiny_reward_model
from tests.test_rl import user_rewards  # noqa: F401  (a fixture)
from tests.test_sft import TINY, last_digit_rows, write_jsonl

QUIET = {k: v for k, v in TINY.items() if k != "val_size"}
LORA = {"lora.rank": 4, "lora.alpha": 8.0, "optim.name": "adamw", "optim.lr": 1e-2, "optim.weight_decay": 0.0}


@pytest.fixture(scope="module")
def chat_base(tok_dir, tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("base") / "sft", tok_dir, "sft", "chat", end_scale=20.0,
                           dim=64, n_heads=4, n_kv_heads=2, max_seq_len=64)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("digits") / "train.jsonl", last_digit_rows(200, seed=1))


def run_sft(init: Path, data: str, out: Path, **kw) -> Path:
    return sft.main(build_config(sft.SFTConfig, ("test", {"init": str(init), "data": [data], "out": str(out),
                                                         **TINY, "loop.batch_size": 8, **LORA, **kw})))


def randomise_adapters(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.normal_(0, 0.1)


@pytest.mark.parametrize("kw", [{}, {"qkv_bias": True, "tie_embeddings": True}, {"qk_norm": True, "head_dim": 16}])
def test_adapters_start_at_the_base_switch_off_to_it_and_merge(kw) -> None:
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(**kw)).eval()
    ids = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        base = model(ids)
        n = add_lora(model, LoraConfig(rank=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"]))
        assert torch.equal(model(ids), base)  # B = 0: exactly the base model
        assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert {name for name, p in model.named_parameters() if p.requires_grad} == {
            f"layers.{i}.{m}.{ab}" for i in range(2) for m in ("attn.q", "attn.v", "mlp.down")
            for ab in ("lora_A", "lora_B")}
        randomise_adapters(model)
        adapted = model(ids)
        assert (adapted - base).abs().max() > 1e-3
        with adapters_off(model):
            assert torch.equal(model(ids), base)
        assert torch.equal(AdaptersOff(model)(ids), base) and torch.equal(model(ids), adapted)  # back on after
        cfg = lora_config_of(model)
        assert (cfg.rank, cfg.alpha, cfg.targets) == (4, 8.0, ["q_proj", "v_proj", "down_proj"])
        merge_lora(model)
        assert not has_lora(model)
        torch.testing.assert_close(model(ids), adapted, rtol=0, atol=1e-5)


def test_sft_trains_only_the_adapters_and_saves_them_in_peft_format(chat_base, digits, tmp_path) -> None:
    out = run_sft(chat_base, digits, tmp_path / "lora", **{"loop.max_steps": 3})
    files = {p.name for p in out.iterdir()}
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "config.json", "tokenizer.json", "meta.json"} <= files
    assert "model.safetensors" not in files  # the base's weights are not copied
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"])
    assert all(k.startswith("base_model.model.model.layers.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in load_file(out / ADAPTER_WEIGHTS))
    base = load_model(chat_base)[0].state_dict()
    adapted = load_model(out, merge=False)[0]
    trained = adapted.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in base.items())  # every base weight untouched
    assert all(m.lora_B.abs().max() > 0 for m in lora_layers(adapted).values())  # every adapter moved
    ids = torch.randint(0, 320, (2, 30))
    with torch.no_grad():
        merged = load_model(out)[0]
        assert not has_lora(merged) and all(p.requires_grad for p in merged.parameters())
        torch.testing.assert_close(merged(ids), adapted(ids), rtol=0, atol=1e-5)
        assert torch.equal(AdaptersOff(adapted)(ids), load_model(chat_base)[0](ids))  # the reference: the base


def test_a_base_kept_in_bf16_is_the_rounded_base_in_fp32_math_at_half_the_memory() -> None:
    """--lora.base-dtype bf16: the adapted layers' frozen weights are stored in bf16 and computed in fp32, so the
    model (adapters on or off) is exactly the fp32 model with those weights rounded to bf16; gradients reach only
    the adapters; merging gives fp32 weights."""
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(qkv_bias=True)).eval()
    rounded = Transformer(tiny_model_config(qkv_bias=True)).eval()
    rounded.load_state_dict(model.state_dict())
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    add_lora(model, LoraConfig(rank=4, alpha=8.0, targets=["q_proj", "down_proj"], base_dtype="bf16"))
    add_lora(rounded, LoraConfig(rank=4, alpha=8.0, targets=["q_proj", "down_proj"]))
    with torch.no_grad():
        for (name, m), r in zip(lora_layers(model).items(), lora_layers(rounded).values(), strict=True):
            assert m.weight.dtype == torch.bfloat16 and m.bias is None or m.bias.dtype == torch.float32, name
            r.weight.copy_(r.weight.to(torch.bfloat16).float())  # the same rounding, kept in fp32
            r.lora_A.copy_(m.lora_A)
        randomise_adapters(model)
        for m, r in zip(lora_layers(model).values(), lora_layers(rounded).values()):
            r.lora_B.copy_(m.lora_B)
    halved = sum(m.weight.numel() * 2 for m in lora_layers(model).values())  # bytes the bf16 storage saves
    adapters = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == before - halved + adapters
    ids = torch.randint(0, 320, (2, 24))
    out, ref = model(ids), rounded(ids)
    assert torch.equal(out, ref)
    with torch.no_grad(), adapters_off(model), adapters_off(rounded):
        assert torch.equal(model(ids), rounded(ids))  # the reference is the rounded base
    out.square().mean().backward()
    ref.square().mean().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {
        n for n, p in model.named_parameters() if p.requires_grad}
    for (n, p), q in zip(model.named_parameters(), rounded.parameters()):
        if p.requires_grad:
            assert torch.equal(p.grad, q.grad), n
    assert store_base(model, torch.bfloat16) == 0  # already stored so
    with torch.no_grad():
        merge_lora(model)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        torch.testing.assert_close(model(ids), ref, rtol=0, atol=1e-5)


def test_resume_with_adapters_is_exact(chat_base, digits, tmp_path, monkeypatch) -> None:
    kw = {"loop.max_steps": 4, "lora.dropout": 0.1, "lora.base_dtype": "bf16"}  # dropout: the RNG state too
    straight = run_sft(chat_base, digits, tmp_path / "straight", **kw)
    with ctrl_c_at(monkeypatch, ChatBatches, 2), pytest.raises(SystemExit, match="continue with --resume"):
        run_sft(chat_base, digits, tmp_path / "cut", **kw)
    resumed = run_sft(chat_base, digits, tmp_path / "cut", resume=True, **kw)
    a, b = load_file(straight / ADAPTER_WEIGHTS), load_file(resumed / ADAPTER_WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stages_chain_and_each_reference_is_the_stage_before(chat_base, digits, pairs, tmp_path) -> None:
    first = run_sft(chat_base, digits, tmp_path / "sft", **{"loop.max_steps": 2})
    second = dpo.main(build_config(dpo.DPOConfig, ("test", {
        "init": str(first), "data": str(pairs), "out": str(tmp_path / "dpo"), **TINY, **LORA, "reward_model": "",
        "max_new_tokens": 8, "replay": ["arithmetic"], "replay_batch": 2,
        "loop.max_steps": 2, "loop.batch_size": 4})))
    assert json.loads((second / "meta.json").read_text())["lora_base"]["path"] == str(first.resolve())
    ids = torch.randint(0, 320, (2, 30))
    with torch.no_grad():
        model = load_model(second, merge=False)[0]
        assert torch.equal(AdaptersOff(model)(ids), load_model(first)[0](ids))  # DPO's reference: the SFT model
    # a full fine-tune from a LoRA checkpoint starts from its merged weights and saves full weights
    full = run_sft(second, digits, tmp_path / "full", **{"loop.max_steps": 1, "lora.rank": 0})
    assert (full / "model.safetensors").is_file() and not (full / ADAPTER_WEIGHTS).exists()


def test_every_rl_stage_trains_adapters(chat_base, pairs, tmp_path) -> None:
    rm = tiny_reward_model(tmp_path / "rm", chat_base)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}
                                                      for i in range(40)])
    rl = {**TINY, **LORA, "init": str(chat_base), "max_new_tokens": 8, "val_size": 4, "loop.max_steps": 2,
          "prompts_per_step": 4, "loop.batch_size": 8}
    runs = {
        "grpo": (grpo, grpo.GRPOConfig, {**rl, "data": [prompts], "group_size": 4, "kl_coef": 0.1}),
        "rloo": (rloo, rloo.RLOOConfig, {**rl, "data": [prompts], "group_size": 4, "kl_coef": 0.1,
                                         "reward_model": str(rm)}),
        "ppo": (ppo, ppo.PPOConfig, {**rl, "data": str(pairs), "reward_model": str(rm), "replay": ["arithmetic"],
                                     "replay_batch": 2}),
        "reward": (reward, reward.RewardConfig, {**QUIET, **LORA, "init": str(chat_base), "data": str(pairs),
                                                 "loop.max_steps": 2, "loop.batch_size": 4}),
    }
    base = load_model(chat_base)[0].state_dict()
    for name, (module, cls, cfg) in runs.items():
        out = module.main(build_config(cls, ("test", {**cfg, "out": str(tmp_path / name)})))
        model = load_model(out, merge=False)[0]
        assert has_lora(model) and all(torch.equal(model.state_dict()[k], v) for k, v in base.items()), name
        assert any(m.lora_B.abs().max() > 0 for m in lora_layers(model).values()), name
    heads = load_file(tmp_path / "ppo" / "heads.safetensors")  # the value model: its adapters and head only
    assert heads and all(".lora_" in k or k.startswith("value.head.") for k in heads)
    assert set(load_file(tmp_path / "reward" / "heads.safetensors")) == {"head.weight", "head.bias"}
    # PPO resumes with the value model's adapters
    ppo.main(build_config(ppo.PPOConfig, ("test", {**runs["ppo"][2], "out": str(tmp_path / "ppo"), "resume": True,
                                                   "loop.max_steps": 3})))
    assert json.loads((tmp_path / "ppo" / "meta.json").read_text())["step"] == 3


@pytest.mark.usefixtures("user_rewards")
def test_grpo_step_with_adapters_is_its_loss_with_the_kl_to_the_adapters_off(chat_base, tmp_path) -> None:
    from cakelm.losses import aggregate, clipped_policy_loss, group_advantages, kl_k3
    from cakelm.rollout import completion_logprobs
    from tests.test_rl import (
        GROUPS,
        check,
        loss_and_grad_norm,
        ref_logprobs,
        reply_mask,
        rollouts_of,
        rows_of,
        two_steps,
    )

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me of {w}.", "answer": str(i % 7)}
                                                       for i, w in enumerate(("kings", "queens", "swords") * 4)])
    cfg = {"init": str(chat_base), "data": [prompts], "rewards": ["my_rewards:e_share"], "kl_coef": 0.3,
           **GROUPS, **QUIET, **LORA, "max_new_tokens": 16}  # 8 tokens drew no "e" at all in one model's step 1
    after1, out = two_steps(grpo.main, grpo.GRPOConfig, cfg, tmp_path)
    assert rows_of(out)[0]["zero_signal"] < 1  # the premise: step 1 had a reward signal, so it moved the adapters
    o = build_config(grpo.GRPOConfig, ("test", cfg))
    d = rollouts_of(out)
    # step 2: a new phase, sampled by step 1's policy, whose KL to --init the loss holds
    model = load_model(after1, merge=False)[0].train()
    assert has_lora(model)
    adv, _ = group_advantages(d["rewards"].float(), o.group_size, o.scale_rewards)
    logp, _ = completion_logprobs(model, d["input"], d["target"], o.temperature)
    per_token, _ = clipped_policy_loss(logp, d["old_logp"], adv, o.epsilon_low, o.epsilon_high)
    # the rollouts were sampled by the adapted policy (the engine runs the adapters too): ratio 1 at the start
    torch.testing.assert_close(logp.detach() * reply_mask(d), d["old_logp"], atol=2e-5, rtol=0)
    ref = ref_logprobs(load_model(chat_base)[0], d, o.temperature)  # the reference: --init, a separate copy here
    assert (logp.detach() - ref).abs().max() > 1e-3  # step 1 moved the policy away from it
    loss, units = aggregate(per_token + o.kl_coef * kl_k3(logp, ref), reply_mask(d), o.aggregation,
                            o.max_new_tokens)
    check(rows_of(out)[1], *loss_and_grad_norm(model, loss / units))


@pytest.mark.parametrize("args, message", [
    (["--lora.rank", "4", "--lora.targets", "qkv"], "'qkv' names no module of the model"),
    (["--lora.rank", "-1"], "need --lora.rank >= 0"),
    (["--lora.rank", "4"], "LoRA adapters train with AdamW"),  # SFT's default optimizer is Muon
])
def test_bad_lora_options_are_one_line_errors(chat_base, digits, tmp_path, capsys, args, message) -> None:
    out = tmp_path / "out"
    assert cli(["sft", "--init", str(chat_base), "--data", digits, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()  # nothing written


def test_crafted_or_orphaned_adapters_are_one_line_errors(chat_base, digits, tmp_path) -> None:
    good = run_sft(chat_base, digits, tmp_path / "good", **{"loop.max_steps": 1})

    def copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(good, dst, symlinks=True)
        return dst / "current"

    c = copy("rank")  # a rank that the tensors do not have (checked before anything is allocated)
    config = json.loads((c / ADAPTER_CONFIG).read_text())
    (c / ADAPTER_CONFIG).write_text(json.dumps({**config, "r": 10**9}))
    with pytest.raises(CakeError, match="adapters do not match adapter_config.json"):
        load_model(c.parent)
    c = copy("dora")
    (c / ADAPTER_CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CakeError, match="use_dora True is not supported"):
        load_model(c.parent)
    c = copy("targets")
    (c / ADAPTER_CONFIG).write_text(json.dumps({**config, "target_modules": ["lm_head"]}))
    with pytest.raises(CakeError, match="'lm_head' names no module"):
        load_model(c.parent)
    c = copy("missing")  # a tensor left out
    t = load_file(c / ADAPTER_WEIGHTS)
    save_file(dict(list(t.items())[1:]), c / ADAPTER_WEIGHTS, metadata={"step": "1", "format": "pt"})
    with pytest.raises(CakeError, match="the file holds none"):
        load_model(c.parent)
    # the base moved or changed: refused, not silently applied to other weights
    base = tmp_path / "base"
    shutil.copytree(chat_base, base, symlinks=True)
    moved = run_sft(base, digits, tmp_path / "on-copy", **{"loop.max_steps": 1})
    shutil.rmtree(base)
    with pytest.raises(CakeError, match="the base checkpoint of its LoRA adapters, .* is missing"):
        load_model(moved)
    model, tok, _ = load_model(chat_base)
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    save_checkpoint(base, model, tok, {"stage": "sft", "step": 0, "complete": True, "chat_format": "chat"})
    with pytest.raises(CakeError, match="has changed since the adapters were trained"):
        load_model(moved)



def test_adapters_that_recorded_their_base_by_its_file_sha256_still_load(chat_base, digits, tmp_path) -> None:
    """LoRA checkpoints of an older cakelm recorded their base by the plain sha256 of its weights file, not by
    `tensors_digest`: they load as before, and a record that matches neither is refused."""
    ck = run_sft(chat_base, digits, tmp_path / "lora", **{"loop.max_steps": 1})
    meta_file = (ck / "meta.json").resolve()
    meta = json.loads(meta_file.read_text())
    plain = hashlib.sha256((chat_base / "model.safetensors").read_bytes()).hexdigest()
    assert meta["lora_base"]["weights_sha256"] != plain  # what is recorded now
    expected = load_model(ck)[0].state_dict()
    meta_file.write_text(json.dumps({**meta, "lora_base": {**meta["lora_base"], "weights_sha256": plain}}))
    assert all(torch.equal(v, expected[k]) for k, v in load_model(ck)[0].state_dict().items())
    meta_file.write_text(json.dumps({**meta, "lora_base": {**meta["lora_base"], "weights_sha256": "0" * 64}}))
    with pytest.raises(CakeError, match="has changed since the adapters were trained"):
        load_model(ck)


# ---------------------------------------------------------------------------------------------------------------
# Against peft and transformers, for each family


@pytest.mark.parametrize("name", ["llama3", "qwen2-tied", "qwen3"])
def test_peft_loads_our_adapters_onto_our_export_for_each_family(name, digits, tok_dir, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from cakelm.hf_compat import from_hf_state_dict, model_config_from_hf
    from tests.test_families import hf_model

    hf = hf_model(name)
    cfg = model_config_from_hf(hf.config.to_dict())
    base_model = Transformer(cfg)
    base_model.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    base = save_checkpoint(tmp_path / "base", base_model, Tokenizer.load(tok_dir),
                           {"stage": "sft", "step": 0, "complete": True, "chat_format": "chat"})
    lora = run_sft(base, digits, tmp_path / "lora", **{"loop.max_steps": 2, "lora.targets": ["all-linear"]})
    for src, dst in ((base, "hf-base"), (lora, "hf-merged")):
        export_stage.main(export_stage.ExportConfig(ckpt=str(src), out_dir=str(tmp_path / dst)))
    ours = load_model(lora, merge=False)[0]
    ids = torch.randint(0, 320, (2, 40))
    with torch.no_grad():
        expected = ours(ids)
        assert (expected - base_model(ids)).abs().max() > 1e-2  # the adapters matter at this tolerance
        theirs = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf-base"), str(lora)).eval()
        torch.testing.assert_close(theirs(ids).logits, expected, rtol=0, atol=1e-4)
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf-merged").eval()
        torch.testing.assert_close(merged(ids).logits, expected, rtol=0, atol=1e-4)
