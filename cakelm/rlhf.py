"""What the RLHF stages share: a Transformer with a scalar head (the reward model and PPO's value model), sequence
scores and log-probs, the held-out measurement of gold reward, proxy reward and KL (reward over-optimisation), and
pairs of a policy's replies for people (or the rule-based rater) to judge.

- `ScalarModel`: the Transformer body (its LM head unused and frozen) and a linear head C -> 1 at every position.
  The reward model reads it at the last real token of prompt + reply (the <|end|> that closes the reply), the
  value model at every reply position.
- `last_scores`: the score at each row's last real token, for right or left padding (left-padded rows are run as
  their own segment, so their positions start at 0 and padding is never attended to).
- `sequence_logprobs`: the sum of log p(token) over a reply's tokens: the one function DPO applies to policy and
  reference alike, so both see the same mask.
- `RLHFEval`: sample replies from a policy on held-out prompts (pure sampling, seeded), score them with the rater
  (`cakelm.rewards.rater`, the "gold" reward) and the reward model (the "proxy"), and estimate KL(policy ||
  reference) as the mean over replies of sum_t log pi(y_t) - log pi_ref(y_t) (k1 on the policy's own samples).
  Plotting gold and proxy against KL shows over-optimisation (Gao et al. 2022, arXiv 2210.10760).
- `sample_pairs` / `rule_label`: two replies of a policy to each prompt for `cakelm label` and `cakelm
  rlhf-round`, and the rule-based rater judging them through the label store, as a person would.

    rm, tok, meta = load_scalar_model("runs/default/rm")
    scores = last_scores(rm, batch["ids"], batch["real"])            # (N,)
    judge = RLHFEval(rows, tok, rm, ref, max_new_tokens=64)
    judge(policy)   # {"gold", "proxy", "kl", "reply_len", "end_of_turn", "accuracy" (rows with answers)}
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from cakelm.checkpoint import load_heads, load_meta, load_model
from cakelm.common import CakeError
from cakelm.data.chat import read_chat_jsonl
from cakelm.data.labels import CHOICES, LabelError, LabelStore
from cakelm.data.prefs import Pair
from cakelm.data.prompts import PromptRow, fitting, prompts_of
from cakelm.engine import SamplingParams
from cakelm.losses import IGNORE_INDEX
from cakelm.model import Transformer
from cakelm.rewards import Reward, rater
from cakelm.rollout import EngineGenerator, Generator, Rollout, completion_logprobs, frozen_logprobs, to_batch
from cakelm.tasks import is_correct
from cakelm.tokenizer import Tokenizer

RULE_LABELLER = "rule"


class ScalarModel(nn.Module):
    """body: a Transformer; head: Linear(C, 1). forward(ids) -> (B, T) scores, one per position."""

    def __init__(self, body: Transformer, head_std: float | None = None) -> None:
        super().__init__()
        self.body = body
        # the LM head is not used: frozen, so optimizers and DDP skip it (it is saved unchanged); a tied one is the
        # embedding, which trains as before (or stays frozen under LoRA)
        if not body.cfg.tie_embeddings:
            body.lm_head.weight.requires_grad_(False)
        self.head = nn.Linear(body.cfg.dim, 1)
        with torch.no_grad():
            # std 1/sqrt(C + 1) as TRL's reward head; a fresh head starts from a near-zero score
            self.head.weight.normal_(0.0, head_std if head_std is not None else (body.cfg.dim + 1) ** -0.5)
            self.head.bias.zero_()

    def forward(self, ids: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
        h = self.body(ids, segments=segments, hidden=True)  # (B, T, C)
        return self.head(h).squeeze(-1).float()  # (B, T)

    def head_tensors(self) -> dict[str, torch.Tensor]:
        return {"head.weight": self.head.weight, "head.bias": self.head.bias}

    def load_head(self, heads: dict[str, torch.Tensor], where: str | Path, prefix: str = "head.") -> None:
        """Copy the scalar head saved under `prefix` in a checkpoint's heads.safetensors (`where` names it)."""
        try:
            with torch.no_grad():
                self.head.weight.copy_(heads[prefix + "weight"])
                self.head.bias.copy_(heads[prefix + "bias"])
        except (KeyError, RuntimeError):
            raise CakeError(f"{where}: heads.safetensors has no scalar head of width {self.body.cfg.dim}") from None


def load_scalar_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[ScalarModel, Tokenizer,
                                                                                     dict[str, Any]]:
    """A reward model checkpoint (`cakelm reward` output: the body's weights + heads.safetensors)."""
    body, tok, meta = load_model(path, device)
    model = ScalarModel(body)
    model.load_head(load_heads(path), path)
    return model.to(device).eval(), tok, meta


def refuse_reward_model(ckpt: str | Path, command: str) -> None:
    """A one-line error for a reward model (meta.json stage "reward", or a scalar head in heads.safetensors):
    its body was trained to score replies, and `cakelm chat`/`serve` would chat with that body without a word."""
    meta = load_meta(ckpt)
    heads = Path(ckpt) / "heads.safetensors"
    scalar = False
    if heads.is_file():
        try:
            with safe_open(str(heads), framework="pt") as fh:
                scalar = "head.weight" in fh.keys()  # a PPO value model is saved as value.*; a reward head as head.*
        except (SafetensorError, OSError):
            scalar = False  # not ours to judge here: the model loads from model.safetensors alone
    if meta.get("stage") == "reward" or scalar:
        raise CakeError(f"{ckpt}: a reward model (it scores replies, it does not write them); `cakelm {command}` "
                        "needs a chat or base model, e.g. the checkpoint the reward model was trained from "
                        "(`cakelm reward score` scores replies with it)")


def last_index(real: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of real (N, L): the last real token under right or left padding."""
    L = real.size(1)
    return L - 1 - real.flip(1).argmax(1)


def last_scores(model: ScalarModel, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(N,) score at the last real token of each row of ids (N, L). Rows that start with padding (left padding)
    run as two segments, padding and text, so the text's positions start at 0 and it never attends to padding:
    the score is the same under either padding."""
    segments = real.long() if bool((real[:, 0] == 0).any()) else None
    values = model(ids, segments=segments)  # (N, L)
    return values.gather(1, last_index(real)[:, None]).squeeze(1)


def sequence_logprobs(model: nn.Module, ids: torch.Tensor, reply: torch.Tensor, temperature: float = 1.0
                      ) -> torch.Tensor:
    """(N,) sum of log p(token) over the reply tokens of right-padded rows ids (N, L), reply (N, L) 1 on reply
    tokens. Token t is predicted by the logits at t - 1."""
    target = torch.where(reply[:, 1:] > 0, ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE_INDEX))
    logp, _ = completion_logprobs(model, ids[:, :-1], target, temperature)
    return logp.sum(1)


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (N, L) ids and their real-token mask."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    real = torch.zeros(len(seqs), L)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(list(s))
        real[i, :len(s)] = 1.0
    return ids, real


@torch.no_grad()
def score_rollouts_rm(rm: ScalarModel, rolls: Sequence[Rollout], pad_id: int, batch: int = 64) -> torch.Tensor:
    """(N,) reward-model score of each rollout's prompt + completion, read at its last token."""
    device = next(rm.parameters()).device
    out = []
    for i in range(0, len(rolls), batch):
        ids, real = pad_sequences([r.prompt_ids + r.ids for r in rolls[i:i + batch]], pad_id)
        out.append(last_scores(rm, ids.to(device), real.to(device)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def prompt_rows(pairs: Sequence[Pair]) -> list[PromptRow]:
    """The distinct prompts of preference pairs, in order, with their "answer" when the rows carry one."""
    seen, rows = set(), []
    for p in pairs:
        key = repr(p.prompt)
        if key not in seen:
            seen.add(key)
            fields = {"answer": str(p.fields["answer"])} if "answer" in p.fields else {}
            rows.append(PromptRow(p.name, p.prompt, fields))
    return rows


def heldout_rows(data: str | Path, val_pairs: Sequence[Pair], tok: Tokenizer, budget: int) -> list[PromptRow]:
    """The prompts RLHF stages measure gold reward, proxy and KL on: a preference directory's val_prompts.jsonl
    (every held-out prompt, as `cakelm prefs` writes it), else the distinct prompts of the held-out pairs; only
    those of at most `budget` tokens in chat format (the rest of the context is left for the reply)."""
    path = Path(data) / "val_prompts.jsonl"
    if Path(data).is_dir() and path.is_file():
        rows = prompts_of(read_chat_jsonl(path, reply_required=False)[0])
    else:
        rows = prompt_rows(val_pairs)
    return fitting(rows, tok, budget)


def gold_scores(rows: Sequence[PromptRow], rolls: Sequence[Rollout], judge: Reward = rater) -> list[float]:
    """The rater's score of every rollout (its prompt's answer, if any, and whether it ended its turn); `judge`
    another rater of the same signature (`rewards.agreeable_rater`)."""
    return [judge(rows[r.prompt].question, r.text, answer=rows[r.prompt].fields.get("answer"),
                  finish_reason="stop" if r.ended else "length") for r in rolls]


def heldout_summary(meta: dict[str, Any]) -> str:
    """The pipeline's one-line result of a DPO or PPO checkpoint: its last held-out gold, proxy and KL."""
    m = meta["metrics"]
    nan = float("nan")
    return (f"held-out gold {m.get('val_gold', nan):.3f}, proxy {m.get('val_proxy', nan):.3f}, "
            f"KL {m.get('val_kl', nan):.2f}")


class RLHFEval:
    """Measures a policy on fixed held-out prompts: gold (rater), proxy (reward model) and KL to the reference.
    Replies are sampled at temperature 1 with a fixed seed (the KL estimate needs the policy's own samples)."""

    def __init__(self, rows: Sequence[PromptRow], tok: Tokenizer, rm: ScalarModel | None,
                 ref: Transformer | None, max_new_tokens: int = 64, seed: int = 0, n: int = 1) -> None:
        if not rows:
            raise CakeError("no held-out prompts to measure gold reward and KL on")
        self.rows, self.tok, self.rm, self.ref = list(rows), tok, rm, ref
        self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
        self.n = n

    @torch.no_grad()
    def __call__(self, policy: Transformer, generator: Generator | None = None) -> dict[str, float]:
        """Measure `policy`, whose replies `generator` samples (default: the in-process engine over it)."""
        device = next(policy.parameters()).device
        generator = generator or EngineGenerator(policy, self.tok)
        rolls = generator.generate([r.messages for r in self.rows], self.params, n=self.n)
        gold = gold_scores(self.rows, rolls)
        out = {"gold": sum(gold) / len(gold), "reply_len": sum(len(r.ids) for r in rolls) / len(rolls),
               "end_of_turn": sum(r.ended for r in rolls) / len(rolls)}
        answered = [r for r in rolls if "answer" in self.rows[r.prompt].fields]
        if answered:
            out["accuracy"] = sum(is_correct(r.text, str(self.rows[r.prompt].fields["answer"]))
                                  for r in answered) / len(answered)
        if self.rm is not None:
            out["proxy"] = score_rollouts_rm(self.rm, rolls, self.tok.pad_id).mean().item()
        if self.ref is not None:
            b = to_batch(rolls, self.tok.pad_id)
            kl = frozen_logprobs(policy, b, 1.0, 64, device) - frozen_logprobs(self.ref, b, 1.0, 64, device)
            out["kl"] = kl.sum(1).mean().item()
        return out


# ----------------------------------------------------------------------------------------------------------------
# Pairs to judge (`cakelm label`, `cakelm rlhf-round`)


def sample_pairs(generator: Generator, rows: list[PromptRow], ckpt: str, params: SamplingParams,
                 progress: str | None = None) -> list[dict]:
    """Two replies of the generator's policy to each prompt, as rows for `LabelStore.add_pairs`. Two independent
    samples, so which one is A is random by construction. Prompts where a reply is empty (a message has content)
    or both replies are the same text are skipped (there is nothing to choose)."""
    rolls = generator.generate([r.messages for r in rows], params, n=2, progress=progress)
    out = []
    for i, row in enumerate(rows):
        ra, rb = rolls[2 * i], rolls[2 * i + 1]
        if not ra.text or not rb.text or ra.text == rb.text:
            continue
        out.append({"prompt": row.messages, "a": ra.text, "b": rb.text, "ended_a": ra.ended, "ended_b": rb.ended,
                    "model_a": ckpt, "model_b": ckpt,
                    "fields": {**row.fields, "source": row.source, "name": row.name}})
    return out


def rule_label(store: LabelStore, round: int | None = None, min_gap: float = 0.5, labeller: str = RULE_LABELLER
               ) -> dict:
    """The rule-based rater (`cakelm.rewards.rater`, as in `cakelm prefs`) judges every pair of `round` it has
    not judged, through `store.record` like a person on the page: both replies under 1 point -> "both_bad";
    scores within `min_gap` -> "tie"; else the better one. Returns {choice: count, "judged", "skipped"}."""
    counts = {**dict.fromkeys(CHOICES, 0), "judged": 0, "skipped": 0}
    done = {j["pair_id"] for j in store.judgements(round) if j["labeller"] == labeller}
    for p in store.pairs(round):
        if p["id"] in done:
            counts["skipped"] += 1
            continue
        question, answer = p["prompt"][-1]["content"], p["fields"].get("answer")
        sa, sb = (rater(question, text, answer=answer, finish_reason="stop" if ended else "length")
                  for text, ended in ((p["a"], p["ended_a"]), (p["b"], p["ended_b"])))
        if sa < 1.0 and sb < 1.0:
            choice = "both_bad"
        elif abs(sa - sb) < max(min_gap, 1e-9):  # equal scores are a tie even with --min-gap 0
            choice = "tie"
        else:
            choice = "a" if sa > sb else "b"
        try:
            store.record(p["id"], labeller, choice, reason=f"rater: A {sa:.2f}, B {sb:.2f}")
        except LabelError as e:
            if e.status != 409:
                raise
            counts["skipped"] += 1  # another rule labeller on the same database judged it meanwhile
            continue
        counts[choice] += 1
        counts["judged"] += 1
    return counts
