"""Prometheus metrics of one bot, in its own `CollectorRegistry` (never the global one).

Each Bot owns a `Metrics`: `Bot.handle` reports every request through `request()`,
the dashboard plugin reports fine-tunes and feedback from their hooks, and what
is a state rather than an event (queue depth, batch rows, prefix-cache hits, the
serving model) is read from the bot when scraped. `render()` is the text that
``GET /metrics`` serves (see docs/dashboard.md for the list).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds: CPU decoding makes multi-second replies normal; the top bucket catches stalls.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)


def generator_stats(**figures: int) -> dict[str, int]:
    """A generator's `stats()` (`chatcore.serving.Generator`, `chatcore.remote.RemoteGenerator`): every figure
    scraped here and shown by the dashboard, zero where that generator has none."""
    return {"waiting": 0, "running": 0, "busy": 0, "prefix_hits": 0, "prefix_misses": 0, "decode_steps": 0,
            "decode_rows": 0, "decode_threads": 0, "thread_switches": 0, **figures}


class Metrics:
    """Counters and histograms of one bot (see the module docstring)."""

    def __init__(self, bot: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("chatcore_requests", "Messages handled, by adapter and outcome "
                                "(answered, hook, silent, busy, error).", ["adapter", "outcome"], registry=r)
        self.first_token = Histogram("chatcore_time_to_first_token_seconds", "From message to the reply's first "
                                     "text, model replies only.", ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("chatcore_request_seconds", "From message to the whole reply, model replies only.",
                                 ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("chatcore_generated_tokens", "Tokens the model generated in replies.", registry=r)
        self.finetunes = Counter("chatcore_finetune_runs", "Fine-tune jobs that ended, by outcome "
                                 "(promoted, rejected, failed, cancelled).", ["outcome"], registry=r)
        self.gate = Gauge("chatcore_gate_last_val_loss", "Validation losses of the last gate decision.",
                          ["model"], registry=r)
        self.gate_promoted = Gauge("chatcore_gate_last_promoted", "1 if the last gate decision promoted.",
                                   registry=r)
        self.feedback = Counter("chatcore_feedback", "Ratings of replies, by value (good, bad).", ["value"],
                                registry=r)
        self.started = time.time()
        # (seconds, tokens) of the latest model replies: the dashboard's p50/p95 and tokens/s
        self.recent: deque[tuple[float, int]] = deque(maxlen=1000)
        r.register(_StateCollector(bot, self.started))

    def request(self, adapter: str) -> "RequestProbe":
        """Start timing one message; call `done` on the probe when it ends."""
        return RequestProbe(self, adapter)

    def finetune_finished(self, result: dict[str, Any]) -> None:
        self.finetunes.labels(result.get("status") or "unknown").inc()
        gate = result.get("gate") or {}
        if "candidate_val_loss" in gate:
            self.gate.labels("candidate").set(_num(gate["candidate_val_loss"]))
            self.gate.labels("serving").set(_num(gate["serving_val_loss"]))
            self.gate_promoted.set(1 if gate.get("promoted") else 0)

    def summary(self) -> dict[str, Any]:
        """p50/p95 latency and tokens/s over the latest model replies (None before the first)."""
        seconds = sorted(s for s, _ in self.recent)
        if not seconds:
            return {"replies": 0, "p50_seconds": None, "p95_seconds": None, "tokens_per_second": None}
        total = sum(seconds)
        return {"replies": len(seconds), "p50_seconds": _quantile(seconds, 0.5),
                "p95_seconds": _quantile(seconds, 0.95),
                "tokens_per_second": sum(t for _, t in self.recent) / total if total > 0 else None}

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestProbe:
    """Times one request: first delta, end, outcome."""

    def __init__(self, metrics: Metrics, adapter: str) -> None:
        self.metrics, self.adapter = metrics, adapter or "unknown"
        self.t0 = time.monotonic()
        self.first: float | None = None

    def wrap(self, on_delta: Callable[[str], Any] | None) -> Callable[[str], Any]:
        """`on_delta` that also notes when the first text came (the bot calls it for every delta)."""
        def noted(delta: str) -> Any:
            if self.first is None:
                self.first = time.monotonic()
            return on_delta(delta) if on_delta is not None else None
        return noted

    def done(self, outcome: str, reply: Any = None, count_tokens: Callable[[str], int] | None = None) -> None:
        m = self.metrics
        m.requests.labels(self.adapter, outcome).inc()
        if outcome == "answered":
            end = time.monotonic()
            m.latency.labels(self.adapter).observe(end - self.t0)
            m.first_token.labels(self.adapter).observe((self.first or end) - self.t0)
            tokens = count_tokens(reply.text) if reply is not None and count_tokens is not None else 0
            m.tokens.inc(tokens)
            m.recent.append((end - self.t0, tokens))


class _StateCollector:
    """What is read at scrape time: the serving model, the queue, batch rows, the prefix cache."""

    def __init__(self, bot: Any, started: float) -> None:
        self.bot, self.started = bot, started

    def collect(self) -> Iterator[Any]:
        bot = self.bot
        info = GaugeMetricFamily("chatcore_serving_model", "The model answering now (1, labelled with its id).",
                                 labels=["model_id"])
        info.add_metric([str(getattr(bot.engine, "model_id", "unknown"))], 1)
        yield info
        yield GaugeMetricFamily("chatcore_uptime_seconds", "Seconds since the bot started.",
                                value=time.time() - self.started)
        stats = bot.generator.stats()
        yield GaugeMetricFamily("chatcore_queue_depth", "Requests waiting for a batch row.", value=stats["waiting"])
        yield GaugeMetricFamily("chatcore_batch_size", "Conversations decoding together now.", value=stats["running"])
        yield CounterMetricFamily("chatcore_decode_steps", "Batched decode steps (current engine).",
                                  value=stats["decode_steps"])
        yield CounterMetricFamily("chatcore_decode_rows", "Conversations summed over decode steps: divided by "
                                  "chatcore_decode_steps, the mean batch size.", value=stats["decode_rows"])
        yield GaugeMetricFamily("chatcore_decode_threads", "CPU threads decoding now, when the batch worker adapts "
                                "them to the machine's load (serving.adapt_threads; 0: not adapting).",
                                value=stats["decode_threads"])
        yield CounterMetricFamily("chatcore_decode_thread_switches", "Times the batch worker changed its thread "
                                  "count because the other setting decoded faster.", value=stats["thread_switches"])
        yield CounterMetricFamily("chatcore_busy_answers", "Requests refused because the queue was full.",
                                  value=stats["busy"])
        yield CounterMetricFamily("chatcore_prefix_cache_hits", "Follow-ups that reused a cached prefix.",
                                  value=stats["prefix_hits"])
        yield CounterMetricFamily("chatcore_prefix_cache_misses", "Prompts with no cached prefix to reuse.",
                                  value=stats["prefix_misses"])

    def describe(self) -> list[Any]:
        return []  # described at collect time; no duplicate-name checks against the other metrics needed


def _quantile(ordered: list[float], q: float) -> float:
    """Nearest-rank quantile of a sorted list."""
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
