"""`cakelm label CKPT --prompts FILE`: a web page where people pick the better of two replies, saved in SQLite;
`cakelm label export DB --out FILE` turns the judgements into the preference JSONL that `cakelm reward` and
`cakelm dpo` read. With `--rater rule`, the rule-based rater of `cakelm prefs` judges instead of a person,
through the same storage and code path.

    cakelm label runs/default/sft --prompts chitchat                  # http://127.0.0.1:8000/ ; Ctrl-C stops
    cakelm label runs/default/sft --prompts my_prompts.jsonl --pairs 200 --labellers names.txt --host 0.0.0.0
    cakelm label runs/default/sft --prompts chitchat --rater rule     # the rater labels every pair, then exits
    cakelm label export runs/default/label.db --out runs/default/labelled.jsonl [--rounds 1 2]

What happens:
1. The database (--db, default `label.db` next to the checkpoint: runs/default/sft -> runs/default/label.db)
   holds the pairs of every round. When round --round has no pairs yet, --pairs single-turn prompts are drawn
   from --prompts (the training side of each source, as `cakelm prefs` draws them), the checkpoint samples two
   replies to each (temperature --temperature), and the pairs are stored. A restart reuses them (and needs
   neither --prompts nor the model).
2. `--rater human` serves the page: prompt, reply A, reply B (two samples of one model: their order is random
   and the page never sees which model wrote them); buttons A / B / Tie / Both bad (keys 1-4 or a, b, t, x), an
   optional reason; progress (labelled / --target) and agreement between labellers. Several people may label at
   once; each judgement is committed before the page is told it is saved.
   Who may label, and under which name:
   - `--labellers names.txt` (one name a line; blank lines and #-comments skipped): each name gets a random
     token of its own, printed as one URL per person at start-up (new tokens at each start). Every /api/
     request needs one (`Authorization: Bearer TOKEN`), and the labeller's name is the token's: a request that
     names someone else is refused (403), so one person cannot vote under invented names.
   - `--token TOKEN` (or $CAKELM_LABEL_TOKEN): one shared token, for one person (or people who trust each
     other). The page asks for a name and the name is the client's word: anyone holding the token can judge
     under several names. Names are normalised (case, Unicode NFKC, invisible characters), so names that only
     look different are one labeller with one vote per pair, but only --labellers makes a vote one person's.
   - neither: as the shared token, for a server on loopback only. An empty token is an error; binding beyond
     loopback without a token needs --allow-no-key.
   The server answers only requests addressed to it (Host, Origin; --allowed-hosts adds names) with JSON
   bodies (see `cakelm.webapp`).
3. Export: per pair, the majority choice; "a"/"b" becomes a preference row, ties, both-bad and split votes
   none (see `cakelm.data.labels`).

HTTP: GET / (the page), GET /health, GET /api/me -> {"labeller": the token's name | null},
GET /api/next?labeller=NAME -> {"pair": {"id", "prompt", "a", "b"} | null, "stats"},
POST /api/judgements {"pair_id", "labeller", "choice", "reason"?, "shown_at"?} -> 201 {"id", "stats"},
GET /api/stats?labeller=NAME (with a per-labeller token, NAME may be left out). Errors are
{"error": {"message", "type", "param", "code"}} (`cakelm.webapp`, as `cakelm serve`) with
400/401/403/404/409/413/415.
"""

from __future__ import annotations

import secrets
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from cakelm import webapp
from cakelm.chat_format import format_of
from cakelm.checkpoint import load_model
from cakelm.common import CakeError, pick_device, print0, seed_everything
from cakelm.config import ConfigError, opt
from cakelm.data.chat import BUILTIN_CHAT
from cakelm.data.labels import LabelError, LabelStore, check_labeller, export, normalise_name
from cakelm.data.prompts import PromptRow, choose_prompts
from cakelm.engine import SamplingParams
from cakelm.rlhf import rule_label, sample_pairs
from cakelm.rollout import EngineGenerator

# ----------------------------------------------------------------------------------------------------------------
# The web app


class Judgement(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pair_id: str = Field(max_length=64)
    labeller: str | None = Field(None, max_length=256)  # the store checks the name; a per-labeller token names it
    choice: str = Field(max_length=16)
    reason: str = ""
    shown_at: float | None = Field(None, allow_inf_nan=False)


def create_label_app(store: LabelStore, token: str | None = None, target: int | None = None,
                     round: int | None = None, body_limit: int = 64_000, users: dict[str, str] | None = None,
                     host: str = "127.0.0.1", allowed_hosts: Sequence[str] = ()) -> FastAPI:
    """The labelling app over `store`, serving the pairs of `round` (all: None); progress is shown against
    `target` (default: every pair). With `token`, /api/ requests need `Authorization: Bearer TOKEN` and name
    their labeller; with `users` ({token: labeller name}) they need one of the tokens, whose name they judge
    under. It answers requests addressed to `host` (its bound address) and `allowed_hosts`."""
    app = webapp.create_app("cakelm label", token, "/api/", "missing or wrong access token (open the URL `cakelm "
                            "label` printed, with its ?token=..., or send 'Authorization: Bearer TOKEN')",
                            body_limit=body_limit, host=host, allowed_hosts=allowed_hosts,
                            users={t: normalise_name(n) for t, n in users.items()} if users else None)
    app.state.store = store
    codes = {400: "invalid_request", 403: "not_your_name", 404: "not_found", 409: "already_judged"}

    @app.exception_handler(LabelError)
    async def label_error(_: Request, e: LabelError) -> JSONResponse:
        return webapp.error_response(e.status, str(e), code=codes.get(e.status))

    # sync handlers: FastAPI runs them on its thread pool, so a commit's fsync never stalls the event loop
    def stats(labeller: str | None) -> dict:
        return store.stats(labeller, round, target)

    def who(request: Request, sent: str | None) -> str:
        """The labeller a request judges as: its token's (a different name sent is refused), else the name sent."""
        own = request.scope.get(webapp.USER)
        if own is None:
            return check_labeller(sent)
        if sent is not None and check_labeller(sent) != own:
            raise LabelError(403, f"labeller: this access token is {own}'s; it cannot judge as {sent[:64]!r}")
        return own

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "pairs": store.stats(None, round)["pairs"]}

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return resources.files("cakelm.web").joinpath("label.html").read_text(encoding="utf-8")

    @app.get("/api/me")
    def me(request: Request) -> dict:
        return {"labeller": request.scope.get(webapp.USER)}

    @app.get("/api/next")
    def next_pair(request: Request, labeller: str | None = Query(None, max_length=256)) -> dict:
        name = who(request, labeller)
        p = store.next_pair(name, round)
        # only what a labeller should see: no model names, no scores
        shown = None if p is None else {"id": p["id"], "prompt": p["prompt"], "a": p["a"], "b": p["b"]}
        return {"pair": shown, "stats": stats(name)}

    @app.get("/api/stats")
    def get_stats(request: Request, labeller: str | None = Query(None, max_length=256)) -> dict:
        if labeller is None:
            return stats(request.scope.get(webapp.USER))
        return stats(check_labeller(labeller))

    @app.post("/api/judgements", status_code=201)
    def judge(j: Judgement, request: Request) -> dict:
        name = who(request, j.labeller)
        jid = store.record(j.pair_id, name, j.choice, j.reason, j.shown_at)  # committed when it returns
        return {"id": jid, "stats": stats(name)}

    return app


# ----------------------------------------------------------------------------------------------------------------
# `cakelm label` and `cakelm label export`


@dataclass
class LabelConfig:
    ckpt: str = opt("", "chat checkpoint whose replies are compared", positional=True)
    prompts: list[str] = opt([], "prompt sources, needed when the round has no pairs yet: SRC or SRC=WEIGHT, each "
                                 + ", ".join(BUILTIN_CHAT) + " or a .jsonl file of prompts or conversations")
    db: str | None = opt(None, "label database (default: label.db next to the checkpoint's directory)")
    round: int = opt(1, "labelling round: its pairs are generated once, then reused")
    pairs: int = opt(100, "prompts to draw when the round has no pairs (prompts whose two replies are equal or "
                          "empty are dropped)")
    rater: str = opt("human", "who judges: people on the web page, or the rule-based rater", choices=("human",
                                                                                                      "rule"))
    host: str = opt("127.0.0.1", "address to bind (0.0.0.0 exposes the page to the network: use --labellers)")
    port: int = opt(8000, "port")
    token: str | None = opt(None, "one shared access token for /api/, for one labeller (default: "
                                  "$CAKELM_LABEL_TOKEN; empty is an error)")
    labellers: str | None = opt(None, "file of labeller names, one a line: each gets a token (a URL) of their own, "
                                      "and judges under that name only")
    allowed_hosts: str = opt("", "more names clients may reach the page by (Host header), comma-separated; '*' "
                                 "allows any (default: the bound address; loopback names)")
    allow_no_key: bool = opt(False, "serve a --host beyond loopback without --token or --labellers")
    target: int | None = opt(None, "pairs to label, for the progress display (default: every pair of the round)")
    min_gap: float = opt(0.5, "--rater rule: scores closer than this are a tie")
    max_new_tokens: int = opt(64, "longest reply in tokens")
    max_prompt_tokens: int = opt(64, "skip prompts longer than this many tokens")
    temperature: float = opt(1.0, "sampling temperature of the replies")
    seed: int = opt(1337, "random seed (which prompts, which replies; the round is added)")
    device: str = opt("auto", "device", choices=("auto", "cpu", "cuda", "mps"))

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        for name in ("round", "pairs", "max_new_tokens", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.target is not None and self.target < 1:
            raise ConfigError(f"--target must be >= 1, got {self.target}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be in 1..65535, got {self.port}")
        if not self.temperature > 0 or not self.min_gap >= 0:
            raise ConfigError("--temperature must be > 0 and --min-gap >= 0")
        if self.token is not None and not self.token.strip():
            raise ConfigError("--token is empty: give a token (or leave it out for no authentication on loopback)")
        if self.token is not None and self.labellers:
            raise ConfigError("give --token (one shared token) or --labellers (one token each), not both")


def default_db(ckpt: str | Path) -> Path:
    """runs/default/sft -> runs/default/label.db: one database per run directory, shared by its rounds."""
    return Path(ckpt).parent / "label.db"


def _draw_prompts(cfg: LabelConfig, tok: Any, context: int) -> list[PromptRow]:
    """--pairs distinct single-turn prompts that fit, drawn from the training side of the --prompts sources by
    weight, as `cakelm prefs` draws them; each round draws afresh (the seed has the round added)."""
    limit = min(cfg.max_prompt_tokens, context - 1)  # at least one token of reply must fit
    rows, _ = choose_prompts(cfg.prompts, cfg.pairs, 0, tok, limit, cfg.seed + cfg.round)
    return rows


def read_labellers(path: str | Path) -> list[str]:
    """The names in a --labellers file: one a line, blank lines and #-comments skipped; each a valid labeller
    name, no two the same once normalised."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CakeError(f"--labellers {path}: cannot read it ({e})") from None
    names: list[str] = []
    seen: dict[str, int] = {}
    for i, line in enumerate(lines, 1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        try:
            key = check_labeller(name)
        except LabelError as e:
            raise CakeError(f"--labellers {path} line {i}: {e}") from None
        if key in seen:
            raise CakeError(f"--labellers {path} line {i}: {name!r} is the same labeller as line {seen[key]} "
                            "(names are compared ignoring case and invisible characters)")
        seen[key] = i
        names.append(name)
    if not names:
        raise CakeError(f"--labellers {path}: no names in it (one a line)")
    return names


def main(cfg: LabelConfig) -> Path:
    db = Path(cfg.db) if cfg.db else default_db(cfg.ckpt)
    if not cfg.prompts and not db.exists():  # say so before creating an empty database
        raise CakeError(f"--prompts is required: {db} does not exist yet, so round {cfg.round} needs new pairs")
    access = _access(cfg) if cfg.rater == "human" else None  # refuse bad options before minutes of sampling
    store = LabelStore(db)
    try:
        have = len(store.pairs(cfg.round))
        if have:
            print0(f"label: round {cfg.round} has {have} pairs in {db}; labelling them (no new replies)")
        else:
            _make_pairs(cfg, store, db)
        if cfg.rater == "rule":
            counts = rule_label(store, cfg.round, cfg.min_gap)
            s = store.stats(round=cfg.round)
            print0(f"label: the rule-based rater judged {counts['judged']} pairs of round {cfg.round} (A "
                   f"{counts['a']}, B {counts['b']}, tie {counts['tie']}, both bad {counts['both_bad']}; "
                   f"{counts['skipped']} judged before); {s['labelled']}/{s['pairs']} pairs labelled -> {db}")
        else:
            _serve(cfg, store, db, *access)
    finally:
        store.close()
    return db


def _make_pairs(cfg: LabelConfig, store: LabelStore, db: Path) -> None:
    if not cfg.prompts:
        raise CakeError(f"--prompts is required: round {cfg.round} of {db} has no pairs yet")
    t0 = time.time()
    seed_everything(cfg.seed + cfg.round)
    model, tok, meta = load_model(cfg.ckpt, pick_device(cfg.device))
    if format_of(meta) != "chat":
        raise CakeError(f"label: {cfg.ckpt} is a base model; compare the replies of a chat model (run `cakelm sft`)")
    rows = _draw_prompts(cfg, tok, model.cfg.max_seq_len)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed + cfg.round)
    pairs = sample_pairs(EngineGenerator(model, tok), rows, str(cfg.ckpt), params, progress="label: sampling pairs")
    if not pairs:
        raise CakeError(f"label: the model's two replies were empty or equal for all {len(rows)} prompts; try "
                        "another checkpoint or a higher --temperature")
    store.add_pairs(pairs, cfg.round)
    print0(f"label: {len(pairs)} pairs for round {cfg.round} from {cfg.ckpt} ({len(rows) - len(pairs)} prompts with "
           f"empty or equal replies dropped) -> {db} ({time.time() - t0:.0f}s)")


def _access(cfg: LabelConfig) -> tuple[str | None, dict[str, str] | None]:
    """(the shared token or None, {token: name} for --labellers or None), checked against the bind address."""
    users = {secrets.token_urlsafe(16): n for n in read_labellers(cfg.labellers)} if cfg.labellers else None
    token = None if users else webapp.access_token(cfg.token, "CAKELM_LABEL_TOKEN", "--token")
    webapp.check_exposure(cfg.host, bool(token or users), cfg.allow_no_key, "--labellers FILE (or --token)")
    return token, users


def _serve(cfg: LabelConfig, store: LabelStore, db: Path, token: str | None, users: dict[str, str] | None
           ) -> None:
    app = create_label_app(store, token, cfg.target, cfg.round, users=users, host=cfg.host,
                           allowed_hosts=webapp.parse_hosts(cfg.allowed_hosts))
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    url = f"http://{host}:{cfg.port}/"

    def link(t: str) -> str:
        return f"{url}?token={urllib.parse.quote(t, safe='')}"

    after = f"(Ctrl-C stops; then `cakelm label export {db} --out FILE`)"
    if users:
        print0(f"label: round {cfg.round} of {db}; give each labeller their own URL {after}:")
        for t, name in users.items():
            print0(f"  {name}: {link(t)}")
    else:
        print0(f"label: open {link(token) if token else url} to label round {cfg.round} of {db} {after}")
    webapp.run(app, cfg.host, cfg.port)


@dataclass
class LabelExportConfig:
    db: str = opt("", "label database (`cakelm label` writes it)", positional=True)
    out: str = opt("", "preference JSONL to write (read by `cakelm reward --data` and `cakelm dpo --data`)")
    rounds: list[int] = opt([], "rounds to export (default: every round)")

    def __post_init__(self) -> None:
        if any(r < 1 for r in self.rounds):
            raise ConfigError(f"--rounds must be >= 1, got {' '.join(map(str, self.rounds))}")


def export_main(cfg: LabelExportConfig) -> Path:
    if not cfg.out:
        raise ConfigError("--out is required: the preference JSONL to write")
    c = export(cfg.db, cfg.out, cfg.rounds or None)
    print0(f"label export: {c['exported']} preference pairs from {c['pairs']} pairs ({c['judgements']} judgements; "
           f"dropped: {c['ties']} ties, {c['both_bad']} both bad, {c['split']} split votes, {c['unlabelled']} "
           f"unlabelled) -> {cfg.out}")
    return Path(cfg.out)
