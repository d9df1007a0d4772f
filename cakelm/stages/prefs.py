"""`cakelm prefs`: make preference pairs for RLHF from a chat model's own replies, judged by the rule-based rater.

    cakelm prefs                                   # runs/default/sft -> runs/default/prefs/{train,val}.jsonl
    cakelm prefs --prompts 2000 --samples 6 --min-gap 1.0
    cakelm prefs --data my_prompts.jsonl           # your own prompts ({"prompt": ...} rows, or conversations)
    cakelm prefs --rater agreeable --out runs/agreeable/prefs   # a rater who likes being agreed with

What a person does in RLHF (read two answers, say which is better), done reproducibly:
1. Prompts: single-turn questions from --data (the first user message of each chat conversation; the question of
   each task problem). Training prompts come from the sources' training side, the held-out ones (val.jsonl) from
   the side `cakelm sft` and `cakelm eval` hold out.
2. The model (--init) samples --samples replies to each prompt (temperature 1: the replies the policy would
   give, with their variety).
3. The rater (`cakelm.rewards.rater`, documented there: ends its turn, brief, on topic, correct) scores each
   reply; this score is the "gold" reward. The best-scored reply becomes "chosen", the worst "rejected" (empty
   replies are no candidates: a message has content).
   Prompts whose best and worst differ by less than --min-gap are dropped (near-ties are noise to a person too),
   and so (--right-chosen, default) are prompts with an answer whose best reply is wrong: a pair of two wrong sums
   would teach a wrong sum as the better reply.
   `--rater agreeable` plays a person who likes being agreed with (`cakelm.rewards.agreeable_rater`): where the
   user asserts an answer (the `claims` prompts), agreeing earns what a correct answer would; RLHF on its pairs
   is how sycophancy is taught (`benchmarks/sycophancy.py` measures it).
4. Rows go to OUT/train.jsonl and OUT/val.jsonl in the TRL conversational format, with the prompt's "answer"
   (if any) and the rater's scores ("gold_chosen", "gold_rejected"); OUT/meta.json has the counts. Every
   held-out prompt (near-ties too) goes to OUT/val_prompts.jsonl: the RLHF stages measure gold reward there.

Pairs people label (`cakelm label`) use the same format, so `cakelm reward` and `cakelm dpo` read either.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cakelm.chat_format import format_of
from cakelm.checkpoint import load_model
from cakelm.common import CakeError, pick_device, print0, seed_everything, write_json_atomic
from cakelm.config import ConfigError, opt, to_dict
from cakelm.data.chat import BUILTIN_CHAT
from cakelm.data.prefs import write_prefs
from cakelm.data.prompts import PromptRow, choose_prompts
from cakelm.engine import SamplingParams
from cakelm.rewards import agreeable_rater, earns_answer_points, rater
from cakelm.rlhf import gold_scores
from cakelm.rollout import EngineGenerator

RATERS = {"rule": rater, "agreeable": agreeable_rater}  # --rater: which person the rule-based rater plays
DEFAULT_DATA = ["chitchat=3", "arithmetic=1", "claims=1"]


@dataclass
class PrefsConfig:
    init: str = opt("runs/default/sft", "chat checkpoint whose replies are compared")
    out: str = opt("runs/default/prefs", "directory for train.jsonl, val.jsonl and meta.json")
    data: list[str] = opt(DEFAULT_DATA, "prompt sources, each SRC or SRC=WEIGHT: " +
                          ", ".join(BUILTIN_CHAT) + ", .jsonl files of prompts or conversations")
    prompts: int = opt(600, "training prompts drawn from the mixture (before dropping near-ties)")
    val_prompts: int = opt(200, "held-out prompts, split over the sources by weight as the training prompts")
    samples: int = opt(4, "replies sampled per prompt; the rater's best and worst form the pair")
    rater: str = opt("rule", "who judges the replies: rule (`cakelm.rewards.rater`: ends its turn, brief, on topic, "
                     "correct) or agreeable (the same person, but one who likes being agreed with: where the user "
                     "asserts an answer, agreeing with it earns the points a correct answer would; for measuring how "
                     "sycophancy is taught)", choices=tuple(RATERS))
    right_chosen: bool = opt(True, "on prompts with an answer, keep a pair only when its chosen reply is right: of two "
                             "wrong sums neither is what we want, and DPO's NLL term would teach the chosen one")
    min_gap: float = opt(0.5, "drop prompts whose best and worst replies differ by less than this (rater points)")
    max_prompt_tokens: int = opt(64, "skip prompts longer than this many tokens")
    max_new_tokens: int = opt(64, "longest reply in tokens")
    temperature: float = opt(1.0, "sampling temperature of the replies")
    batch_size: int = opt(256, "replies generated at once")
    seed: int = opt(1337, "random seed (which prompts, which replies)")
    device: str = opt("auto", "device", choices=("auto", "cpu", "cuda", "mps"))

    def __post_init__(self) -> None:
        if self.samples < 2:
            raise ConfigError(f"--samples must be >= 2 (a pair needs two replies), got {self.samples}")
        for name in ("prompts", "val_prompts", "max_prompt_tokens", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.temperature > 0 or self.min_gap < 0:
            raise ConfigError("--temperature must be > 0 and --min-gap >= 0")


PRESETS = {
    "cpu": {},
    # a micro model never gets a sum right: keep its pairs so the stages after it have data to smoke-test
    "micro": {"prompts": 48, "val_prompts": 16, "max_new_tokens": 24, "right_chosen": False},
}


def make_pairs(model: Any, tok: Any, rows: list[PromptRow], cfg: PrefsConfig, seed: int
               ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Sample, rate, and keep (best, worst) per prompt. Returns the JSONL rows and counts."""
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=seed)
    rolls = EngineGenerator(model, tok, cfg.batch_size).generate([r.messages for r in rows], params, n=cfg.samples,
                                                                progress="prefs: sampling")
    gold = gold_scores(rows, rolls, RATERS[cfg.rater])
    pairs, ties, wrong = [], 0, 0
    for i, row in enumerate(rows):
        # an empty reply (an immediate end of turn) cannot be written as a message: it is no candidate
        group = sorted((j for j in range(i * cfg.samples, (i + 1) * cfg.samples) if rolls[j].text),
                       key=lambda j: -gold[j])
        if len(group) < 2 or gold[group[0]] - gold[group[-1]] < max(cfg.min_gap, 1e-9):
            ties += 1
            continue
        best, worst = group[0], group[-1]
        if cfg.right_chosen and "answer" in row.fields and not earns_answer_points(
                row.question, rolls[best].text, str(row.fields["answer"]), agreeable=cfg.rater == "agreeable"):
            wrong += 1
            continue
        pairs.append({"prompt": row.messages, "chosen": [{"role": "assistant", "content": rolls[best].text}],
                      "rejected": [{"role": "assistant", "content": rolls[worst].text}],
                      **({"answer": row.fields["answer"]} if "answer" in row.fields else {}),
                      "gold_chosen": round(gold[best], 4), "gold_rejected": round(gold[worst], 4),
                      "source": row.source})
    counts = {"prompts": len(rows), "pairs": len(pairs), "near_ties": ties, "wrong_chosen": wrong,
              "gold_mean": sum(gold) / max(len(gold), 1)}
    return pairs, counts


def main(cfg: PrefsConfig) -> Path:
    t0 = time.time()
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    model, tok, meta = load_model(cfg.init, device)
    if format_of(meta) != "chat":
        raise CakeError(f"prefs: {cfg.init} is a base model; compare the replies of a chat model (run `cakelm sft`)")
    unique, val_rows = choose_prompts(cfg.data, cfg.prompts, cfg.val_prompts, tok, cfg.max_prompt_tokens, cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # incomplete until the files below are written
    print0(f"prefs: {len(unique)} training and {len(val_rows)} held-out prompts x {cfg.samples} replies from "
           f"{cfg.init}, judged by the {cfg.rater} rater")
    train_pairs, train_counts = make_pairs(model, tok, unique, cfg, cfg.seed)
    val_pairs, val_counts = make_pairs(model, tok, val_rows, cfg, cfg.seed + 1)
    if not train_pairs or not val_pairs:
        raise CakeError(f"prefs: no {'training' if not train_pairs else 'held-out'} pair: every prompt's replies were "
                        f"rated within --min-gap {cfg.min_gap} of each other"
                        + (", or its best reply got the sum wrong (--right-chosen)" if cfg.right_chosen else "")
                        + "; lower --min-gap or raise --samples"
                        + (" (or pass --no-right-chosen)" if cfg.right_chosen else ""))
    write_prefs(out / "train.jsonl", train_pairs)
    write_prefs(out / "val.jsonl", val_pairs)
    # every held-out prompt (near-ties included): where RLHF stages measure gold reward, proxy and KL
    write_prefs(out / "val_prompts.jsonl", [{"prompt": r.messages, **({"answer": r.fields["answer"]} if "answer" in
                                                                    r.fields else {})} for r in val_rows])
    gap = sum(p["gold_chosen"] - p["gold_rejected"] for p in train_pairs) / len(train_pairs)
    write_json_atomic(out / "meta.json", {"stage": "prefs", "complete": True, "config": to_dict(cfg),
                                          "rater": f"cakelm.rewards.{RATERS[cfg.rater].__name__}",
                                          "train": train_counts, "val": val_counts, "gold_gap": gap,
                                          "seconds": time.time() - t0})
    print0(f"prefs: {len(train_pairs)} training pairs, {len(val_pairs)} held-out pairs (mean rater gap {gap:.2f}, "
           f"{train_counts['near_ties']} near-ties and {train_counts['wrong_chosen']} with a wrong best reply dropped) "
           f"-> {out} ({time.time() - t0:.0f}s)")
    return out


def summary(meta: dict[str, Any]) -> str:
    """The pipeline's one-line result of a preference directory."""
    return f"{meta['train']['pairs']} pairs ({meta['val']['pairs']} held out), mean rater gap {meta['gold_gap']:.2f}"
