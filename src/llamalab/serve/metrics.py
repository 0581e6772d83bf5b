"""The server's Prometheus metrics (``GET /metrics``) and the middleware that counts requests."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llamalab.serve.scheduler import Scheduler

# Buckets in seconds: a first token takes from milliseconds (a short prompt, a free row)
# to minutes (a long prompt behind a full queue on a CPU); a whole request, longer.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Request counts are labelled by route, never by the raw path, so a client that sends
# made-up paths cannot grow the label set without bound.
_ROUTES = frozenset(
    {
        "/",
        "/health",
        "/metrics",
        "/v1/models",
        "/v1/completions",
        "/v1/chat/completions",
        "/tokenize",
        "/detokenize",
    }
)


def _route_label(path: str) -> str:
    """The metrics label for a request path: its route, or "other"."""
    if path in _ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{name}"
    return "other"


class Metrics:
    """The server's Prometheus metrics, in a registry of their own.

    Each app has its own registry, not prometheus-client's global one, so several apps in
    one process (tests) never register the same name twice or mix their counts.
    """

    def __init__(self, scheduler: Scheduler) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llamalab_requests",
            "HTTP requests answered, by route and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "llamalab_prompt_tokens", "Prompt tokens of finished generations", registry=r
        )
        self.completion_tokens = Counter(
            "llamalab_completion_tokens", "Tokens sampled by finished generations", registry=r
        )
        # Read from the scheduler when scraped, so they can never drift from /health.
        Gauge("llamalab_queue_depth", "Requests waiting for a batch row", registry=r).set_function(
            lambda: scheduler.queued
        )
        Gauge(
            "llamalab_running_requests", "Requests generating in a batch row", registry=r
        ).set_function(lambda: scheduler.active_slots)
        self.ttft = Histogram(
            "llamalab_time_to_first_token_seconds",
            "Seconds from queueing a generation to its first token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "llamalab_request_duration_seconds",
            "Seconds from queueing a generation to its end",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        r.register(_Speculation(scheduler))


class _Speculation:
    """Speculation's drafted and accepted tokens and their ratio, read from the scheduler
    when scraped (its thread counts them as requests end)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self) -> Iterator[Metric]:
        """The metrics, as prometheus-client asks a collector for them."""
        # Accepted first (see Scheduler._end); a stand-in scheduler may count neither.
        accepted = getattr(self.scheduler, "accepted_draft_tokens", 0)
        drafted = getattr(self.scheduler, "draft_tokens", 0)
        yield CounterMetricFamily(
            "llamalab_draft_tokens",
            "Tokens drafted by speculation (prompt lookup) and verified, in ended requests",
            value=drafted,
        )
        yield CounterMetricFamily(
            "llamalab_accepted_draft_tokens",
            "Drafted tokens the model chose too, in ended requests",
            value=accepted,
        )
        yield GaugeMetricFamily(
            "llamalab_draft_acceptance_rate",
            "Accepted over drafted tokens since the server started (0 before any draft)",
            value=accepted / drafted if drafted else 0.0,
        )


class RequestCounter:
    """Pure ASGI middleware: count every response by route and status.

    It runs outside the other middlewares, so the 401s, 403s and 413s they answer with
    are counted too.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = _route_label(scope["path"])

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)
