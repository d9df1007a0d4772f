"""`cakelm serve`'s /metrics: counters and histograms in the Prometheus text format (version 0.0.4), as vLLM and
TGI expose theirs, so a Prometheus server or any scraper can watch a running server.

    cakelm_requests_total{endpoint="/v1/completions",status="200"}   responses sent, by API route and status
                                                                     (499: the client hung up first, as nginx logs)
    cakelm_prompt_tokens_total, cakelm_generation_tokens_total       tokens read and generated
    cakelm_num_requests_running, cakelm_num_requests_waiting         gauges (also in /health)
    cakelm_time_to_first_token_seconds                               histogram: arrival to the first token (queueing
                                                                     included, as vLLM measures it)
    cakelm_inter_token_latency_seconds                               histogram: between one choice's tokens

The format is a few lines of text per family (`# HELP`, `# TYPE`, then `name{label="value"} number`; a histogram
has cumulative `_bucket{le=...}` lines ending at `+Inf`, then `_sum` and `_count`), so it is written here rather
than adding `prometheus_client` as a dependency; the tests read it back with that library's parser. Names follow
Prometheus's conventions: base units (seconds), `_total` counters, colons left to recording rules.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
API_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models")  # the `endpoint` label; others: "other"


class Histogram:
    """Observations counted into fixed buckets (upper bounds), with their sum."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        self.counts[i] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, count in zip((*map(_number, self.bounds), "+Inf"), self.counts):
            total += count
            out.append(f'{name}_bucket{{le="{bound}"}} {total}')
        return out + [f"{name}_sum {_number(self.sum)}", f"{name}_count {total}"]


def _number(x: float) -> str:
    return repr(float(x))


class ServerMetrics:
    """What /metrics reports. Updated from the request handlers and the generation threads (one lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)

    def response(self, path: str, status: int) -> None:
        with self.lock:
            self.requests[(path if path in API_ROUTES else "other", status)] += 1

    def prompt(self, tokens: int) -> None:
        with self.lock:
            self.prompt_tokens += tokens

    def token(self, ttft: float | None = None, gap: float | None = None) -> None:
        """One generated token: the request's first (`ttft` seconds after it arrived) or one `gap` seconds after
        the previous token of its choice."""
        with self.lock:
            self.generation_tokens += 1
            if ttft is not None:
                self.ttft.observe(ttft)
            if gap is not None:
                self.itl.observe(gap)

    def render(self, running: int, waiting: int) -> str:
        """The text a scrape gets."""

        def family(name: str, kind: str, help: str, lines: list[str]) -> list[str]:
            return [f"# HELP {name} {help}", f"# TYPE {name} {kind}", *lines]

        with self.lock:
            requests = [f'cakelm_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                        for (e, s), n in sorted(self.requests.items())]
            out = [
                *family("cakelm_requests_total", "counter", "API responses sent, by route and HTTP status.",
                        requests),
                *family("cakelm_prompt_tokens_total", "counter", "Prompt tokens read.",
                        [f"cakelm_prompt_tokens_total {self.prompt_tokens}"]),
                *family("cakelm_generation_tokens_total", "counter", "Tokens generated.",
                        [f"cakelm_generation_tokens_total {self.generation_tokens}"]),
                *family("cakelm_num_requests_running", "gauge", "Requests generating now.",
                        [f"cakelm_num_requests_running {running}"]),
                *family("cakelm_num_requests_waiting", "gauge", "Requests queued for a free generation slot.",
                        [f"cakelm_num_requests_waiting {waiting}"]),
                *family("cakelm_time_to_first_token_seconds", "histogram",
                        "Seconds from a request's arrival to its first generated token.",
                        self.ttft.lines("cakelm_time_to_first_token_seconds")),
                *family("cakelm_inter_token_latency_seconds", "histogram",
                        "Seconds between consecutive tokens of one choice.",
                        self.itl.lines("cakelm_inter_token_latency_seconds")),
            ]
        return "\n".join(out) + "\n"


class CountResponses:
    """ASGI middleware: counts every response to a path under /v1/ by route and status, including those the
    request checks send (400 Host, 401, 413, 415), when it is the outermost middleware; with `log`, also hands it
    one line per such request when it ends: method, path, status, tokens (the handler's `request.state.usage`,
    {"prompt": n, "completion": m}, when it set one) and seconds."""

    def __init__(self, app: Callable, metrics: ServerMetrics, log: Callable[[str], None] | None = None) -> None:
        self.app, self.metrics, self.log = app, metrics, log

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), [0]

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                self.metrics.response(scope["path"], message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            if self.log is not None:
                usage = scope.get("state", {}).get("usage")
                tokens = f" {usage['prompt']}+{usage['completion']} tokens" if usage else ""
                gone = " (client gone)" if status[0] in (0, 499) else ""
                self.log(f"{scope['method']} {scope['path']} {status[0] or 499}{tokens} "
                         f"{time.monotonic() - start:.2f}s{gone}")
