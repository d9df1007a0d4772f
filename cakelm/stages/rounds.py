"""`cakelm rlhf-round`: one round of RLHF with people (or the rule-based rater) in the loop.

    cakelm rlhf-round                                # round 1 on runs/default: SFT's pairs, rule-labelled -> DPO
    cakelm rlhf-round                                # round 2: the round-1 policy's pairs -> DPO again
    cakelm rlhf-round --rater human                  # stops after writing the pairs; label them in the browser:
    cakelm label runs/default/sft --db runs/default/rounds/label.db --round 1   # (the command it prints)
    cakelm rlhf-round --rater human                  # ... then the same command again trains on the labels
    cakelm rlhf-round --method ppo                   # PPO against the round's reward model instead of DPO

"Typically this is repeated for a few rounds" (InstructGPT, Ouyang et al. 2022): the policy's newest replies are
judged, the reward model learns from every judgement so far, and the policy improves on them. Round N:
1. Policy: round N-1's policy (RUN/rounds/N-1/policy), or RUN/sft in round 1.
2. Pairs: --pairs training prompts are drawn (seed + N) and those asked in an earlier round dropped; the policy
   samples two replies (temperature 1) to each; they go into the rounds' label database RUN/rounds/label.db
   (`cakelm.label`; `cakelm label`'s own default database is a different file), tagged round N.
3. Labels: with --rater rule the rule-based rater (`cakelm.rewards.rater`) judges them now, through the same
   storage and code path as a person (`rlhf.rule_label` -> `LabelStore.record`); with --rater human the round
   stops until `cakelm label` has collected judgements on at least --min-judged of the round's pairs.
4. Reward model: `cakelm reward` from RUN/sft on the pairs of every round so far (`data.labels.export`: a pair is the
   majority choice of its judgements; ties and "both bad" are no pairs) -> RUN/rounds/N/rm.
5. Policy update from the round's policy on this round's pairs (on-policy, as iterative DPO: the reference is the
   round's starting policy): `cakelm dpo`, or with --method ppo, `cakelm ppo` against the round's reward model
   -> RUN/rounds/N/policy (its meta.json records "rlhf_round": N).
6. Measure on fixed held-out prompts (the same every round): the rater's gold reward, the round's reward model's
   proxy score and the KL to SFT, reply length and turn endings -> RUN/rounds/N/round.json, and the table of all
   rounds (round 0 is the SFT model) -> RUN/rounds.json, which the report card shows.

Rounds are appended, never redone in place: a round that stopped (Ctrl-C, a crash, waiting for people) continues
where it stopped when the same command runs again (its pairs, judgements and export are kept; the training stages
resume from their checkpoints). The options that define the measurement (--data, --val-prompts, --seed, the
token limits) are saved in RUN/rounds.json and must stay the same in later rounds.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cakelm.chat_format import format_of
from cakelm.checkpoint import is_checkpoint, load_meta, load_model, update_meta
from cakelm.common import CakeError, pick_device, print0, read_json, seed_everything, write_json_atomic
from cakelm.config import ConfigError, build_config, opt
from cakelm.data.labels import LabelStore, export
from cakelm.data.prefs import load_prefs, write_prefs
from cakelm.data.prompts import PromptRow, choose_prompts
from cakelm.engine import SamplingParams
from cakelm.rlhf import RLHFEval, load_scalar_model, rule_label, sample_pairs
from cakelm.rollout import EngineGenerator
from cakelm.stages.prefs import DEFAULT_DATA
from cakelm.stages.table import STAGE

EVAL_SAMPLES = 4  # replies per held-out prompt for gold, proxy and KL
PINNED = ("data", "val_prompts", "seed", "max_prompt_tokens", "max_new_tokens")  # the same in every round


@dataclass
class RoundConfig:
    run: str = opt("runs/default", "run directory: RUN/sft starts round 1; rounds go to RUN/rounds/N, labels to "
                   "RUN/rounds/label.db")
    round: int = opt(0, "round to run (0: the one after the last finished round; a finished round is not redone)")
    rater: str = opt("rule", "who judges the pairs: rule (the rule-based rater, now) or human (`cakelm label`)",
                     choices=("rule", "human"))
    method: str = opt("dpo", "policy update: dpo (on this round's pairs) or ppo (against the round's reward model)",
                      choices=("dpo", "ppo"))
    preset: str = opt("cpu", "size of the reward, dpo and ppo stages (their presets)", choices=("cpu", "micro"))
    data: list[str] = opt(DEFAULT_DATA, "prompt sources, each SRC or SRC=WEIGHT (as `cakelm prefs`)")
    pairs: int = opt(1000, "training prompts per round: two replies to each make one pair to judge (the rule-based "
                     "rater calls most pairs of one model's replies a tie; about a third remain)")
    val_prompts: int = opt(128, "held-out prompts for gold, proxy and KL (the same ones every round)")
    min_judged: float = opt(1.0, "--rater human: share of the round's pairs that must be judged before training")
    min_gap: float = opt(0.5, "--rater rule: replies rated closer than this are a tie")
    max_prompt_tokens: int = opt(64, "skip prompts longer than this many tokens")
    max_new_tokens: int = opt(64, "longest reply in tokens")
    seed: int = opt(1337, "random seed (round N draws its prompts and replies with seed + N)")
    device: str = opt("auto", "device", choices=("auto", "cpu", "cuda", "mps"))

    def __post_init__(self) -> None:
        if self.round < 0:
            raise ConfigError(f"--round must be >= 1 (or 0 for the next one), got {self.round}")
        if self.pairs < 2 or self.val_prompts < 1 or self.max_new_tokens < 1 or self.max_prompt_tokens < 1:
            raise ConfigError("need --pairs >= 2, --val-prompts >= 1, --max-new-tokens >= 1, --max-prompt-tokens >= 1")
        if not 0.0 < self.min_judged <= 1.0:
            raise ConfigError(f"--min-judged must be in (0, 1], got {self.min_judged}")


def finished_rounds(run: Path) -> list[int]:
    """Rounds whose round.json exists, in order."""
    return sorted(int(p.parent.name) for p in (run / "rounds").glob("*/round.json") if p.parent.name.isdigit())


def split_export(rows_path: Path, out: Path, val_rows: list[PromptRow], round: int | None = None) -> int:
    """Write OUT/{train,val}.jsonl (split by prompt, as `load_prefs` splits one file) from an exported JSONL,
    keeping only `round`'s pairs if given, and OUT/val_prompts.jsonl: the fixed held-out prompts. Returns the
    number of training pairs."""
    train, val, _ = load_prefs(rows_path)
    if round is not None:
        train, val = ([p for p in ps if p.fields.get("round") == round] for ps in (train, val))
    if not train or not val:
        raise CakeError(f"{rows_path}: too few judged pairs to train on (round {round}: {len(train)} training, "
                        f"{len(val)} held out); label more pairs or raise --pairs")
    out.mkdir(parents=True, exist_ok=True)
    for name, ps in (("train", train), ("val", val)):
        write_prefs(out / f"{name}.jsonl", [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
                                             **p.fields} for p in ps])
    write_prefs(out / "val_prompts.jsonl", [{"prompt": r.messages, **r.fields} for r in val_rows])
    return len(train)


def measure(policy_dir: Path, rm_dir: Path, ref: Any, rows: list[PromptRow], cfg: RoundConfig, device: Any
            ) -> dict[str, float]:
    """Gold, proxy (this round's reward model), KL to SFT and more of a policy on the held-out prompts."""
    policy, tok, _ = load_model(policy_dir, device)
    rm = load_scalar_model(rm_dir, device)[0]
    judge = RLHFEval(rows, tok, rm, ref, cfg.max_new_tokens, seed=cfg.seed, n=EVAL_SAMPLES)
    return judge(policy.eval())


def main(cfg: RoundConfig) -> Path:
    t0 = time.time()
    run = Path(cfg.run)
    sft_dir = run / "sft"
    if not is_checkpoint(sft_dir):
        raise CakeError(f"rlhf-round: no SFT checkpoint in {sft_dir} (run `cakelm pipeline --out {run}` or "
                        f"`cakelm sft --out {sft_dir}` first)")
    done = finished_rounds(run)
    n = cfg.round or (done[-1] + 1 if done else 1)
    if n in done:
        raise CakeError(f"rlhf-round: round {n} is finished ({run / 'rounds' / str(n) / 'round.json'}); rounds are "
                        f"appended: run round {done[-1] + 1}, or delete {run / 'rounds'} to start over")
    if n > 1 and n - 1 not in done:
        raise CakeError(f"rlhf-round: round {n} starts from round {n - 1}'s policy, and round {n - 1} is not "
                        f"finished (no {run / 'rounds' / str(n - 1) / 'round.json'})")
    table_path = run / "rounds.json"
    saved = read_json(table_path) if table_path.is_file() else {}
    table = saved.get("rounds", [])
    settings = {k: getattr(cfg, k) for k in PINNED}
    if table:
        pinned = saved.get("settings", {})
        changed = [k for k in PINNED if k in pinned and pinned[k] != settings[k]]
        if changed:
            raise CakeError(f"rlhf-round: --{changed[0].replace('_', '-')} {settings[changed[0]]} differs from the "
                            f"earlier rounds' {pinned[changed[0]]} ({table_path}); rounds are measured alike")
    policy_in = sft_dir if n == 1 else run / "rounds" / str(n - 1) / "policy"
    rdir = run / "rounds" / str(n)
    rdir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed + n)
    device = pick_device(cfg.device)
    model, tok, meta = load_model(policy_in, device)
    if format_of(meta) != "chat":
        raise CakeError(f"rlhf-round: {policy_in} is a base model; rounds start from a chat model")
    # a prompt must leave room for the reply (as rlhf.heldout_rows)
    budget = min(cfg.max_prompt_tokens, model.cfg.max_seq_len - cfg.max_new_tokens)
    # the held-out prompts are the same every round (seed, not seed + round): gold is comparable across rounds
    val_rows = choose_prompts(cfg.data, 1, cfg.val_prompts, tok, budget, cfg.seed)[1]
    db = run / "rounds" / "label.db"
    print0(f"rlhf-round {n}: policy {policy_in}, labels in {db} (rater: {cfg.rater})")
    with LabelStore(db) as store:
        # 2. pairs (once per round: a re-run finds them in the database)
        if not store.pairs(n):
            asked = {json.dumps(p["prompt"], sort_keys=True) for p in store.pairs()}
            train_rows = choose_prompts(cfg.data, cfg.pairs, 1, tok, budget, cfg.seed + n)[0]
            fresh = [r for r in train_rows if json.dumps(r.messages, sort_keys=True) not in asked]
            params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=1.0, seed=cfg.seed + n)
            pairs = sample_pairs(EngineGenerator(model, tok), fresh, str(policy_in), params,
                                 progress=f"rlhf-round {n}: sampling")
            store.add_pairs(pairs, round=n)
            print0(f"rlhf-round {n}: {len(store.pairs(n))} pairs from {len(fresh)} prompts "
                   f"({len(train_rows) - len(fresh)} asked in earlier rounds)")
        del model
        # 3. labels
        if cfg.rater == "rule":
            counts = rule_label(store, n, cfg.min_gap)
            print0(f"rlhf-round {n}: the rule-based rater judged {counts}")
        stats = store.stats(round=n)
    if stats["labelled"] < cfg.min_judged * stats["pairs"]:
        print0(f"rlhf-round {n}: {stats['labelled']} of {stats['pairs']} pairs judged; label them with\n"
               f"    cakelm label {policy_in} --db {db} --round {n}\n"
               f"then run the same `cakelm rlhf-round` command again")
        return rdir

    # 4. reward model on every round's judgements; 5. the policy update on this round's. The export is written
    # once: a re-run after an interruption trains on the same pairs even if people went on labelling.
    if not (rdir / "judged.jsonl").is_file():
        export(db, rdir / "judged.jsonl", rounds=list(range(1, n + 1)))
    n_all = split_export(rdir / "judged.jsonl", rdir / "prefs_all", val_rows)
    n_round = split_export(rdir / "judged.jsonl", rdir / "prefs", val_rows, round=n)
    common = {"loop.device": cfg.device, "loop.seed": cfg.seed + n, "resume": True}
    reward, update = STAGE["reward"], STAGE[cfg.method]
    rm_cfg = build_config(reward.config, (f"reward preset {cfg.preset}", (reward.presets or {})[cfg.preset]),
                          ("rlhf-round", {"init": str(sft_dir), "data": str(rdir / "prefs_all"),
                                          "out": str(rdir / "rm"), **common}))
    pol_cfg = build_config(update.config, (f"{cfg.method} preset {cfg.preset}", (update.presets or {})[cfg.preset]),
                           ("rlhf-round", {"init": str(policy_in), "data": str(rdir / "prefs"),
                                           "out": str(rdir / "policy"), "reward_model": str(rdir / "rm"), **common}))
    try:
        rm_dir = reward.main(rm_cfg)
        policy_dir = update.main(pol_cfg)
    except SystemExit as e:  # Ctrl-C inside a stage saved its checkpoint: this command continues it
        raise CakeError(f"round {n} stopped ({e}); run the same `cakelm rlhf-round` command again to "
                        "continue") from None
    pmeta = load_meta(policy_dir)
    if pmeta.get("rlhf_round") != n:  # which round produced this checkpoint
        update_meta(policy_dir, rlhf_round=n)

    # 6. measure (round 0, the SFT model, once, with round 1's reward model)
    ref = load_model(sft_dir, device)[0].eval()
    table = [r for r in table if r["round"] < n]
    if not table:
        table = [{"round": 0, "policy": str(sft_dir), **measure(sft_dir, rm_dir, ref, val_rows, cfg, device)}]
    rm_acc = load_meta(rm_dir).get("metrics", {}).get("val_pair_accuracy")
    row = {"round": n, "policy": str(policy_dir), "method": cfg.method, "rater": cfg.rater,
           "pairs": stats["pairs"], "labelled": stats["labelled"], "judgements": stats["judgements"],
           "agreement": stats["agreement"], "train_pairs_round": n_round, "train_pairs_rm": n_all,
           "rm_accuracy": rm_acc, **measure(policy_dir, rm_dir, ref, val_rows, cfg, device),
           "seconds": time.time() - t0}
    write_json_atomic(rdir / "round.json", row)
    table.append(row)
    write_json_atomic(table_path, {"rounds": table, "settings": settings, "held_out_prompts": len(val_rows),
                                   "samples_per_prompt": EVAL_SAMPLES})
    print0(f"rlhf-round {n}: gold {row['gold']:.3f} (round 0: {table[0]['gold']:.3f}), proxy {row['proxy']:.3f}, "
           f"KL to SFT {row['kl']:.2f}; reward model {rm_acc or float('nan'):.3f} held-out accuracy on "
           f"{n_all} pairs of rounds 1-{n} -> {rdir} ({time.time() - t0:.0f}s)")
    return rdir
