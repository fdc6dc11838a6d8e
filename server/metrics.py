"""Prometheus metrics under `deltaserve:`, named after vLLM's so its dashboards need only the prefix changed.

One registry per app (tests start several). Gauges are read from the engine when scraped; counters and
histograms are fed by server/generation.py as outputs arrive.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from engine.async_engine import EngineStats

disable_created_metrics()  # the *_created series only double what a scrape needs; vLLM omits them too

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                240.0, 480.0, 960.0)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"deltaserve:{name}", doc, labels, registry=self.registry)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(f"deltaserve:{name}", doc, labels + list(extra), registry=self.registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"deltaserve:{name}", doc, labels, buckets=buckets, registry=self.registry)

        self._model = model_name
        self.running = gauge("num_requests_running", "Engine requests holding slots (prefilling or decoding).")
        self.waiting = gauge("num_requests_waiting", "Engine requests queued for a slot.")
        self.slots_used = gauge("slots_used", "Slots of the state pool in use.")
        self.slots_total = gauge("slots_total", "Slots in the state pool.")
        self.slot_usage = gauge("slot_usage_perc", "Share of the state pool in use, 0 to 1.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens prefilled.")
        self.success = counter("request_success", "Finished choices, by finish reason.", ("finished_reason",))
        self.rejected = counter("request_rejected", "Requests refused with 503, by reason.", ("reason",))
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first generated token.", _LATENCY_BUCKETS)
        # Bumped once per streamed token: a lock-free tally, exported when scraped (_PerTokenCollector).
        self._per_token = _PerTokenTally(_LATENCY_BUCKETS)
        self.registry.register(_PerTokenCollector(model_name, self._per_token))
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token.", _E2E_BUCKETS)
        # The engine's running totals (engine.engine.StepCounters), each with the EngineStats field it comes from.
        self._engine_counters = [
            (counter("engine_steps", "Engine steps run (each: prompt chunks and/or one decode token per running "
                     "sequence)."), "steps"),
            (counter("engine_step_seconds", "Wall time the engine spent inside steps; over engine_steps, the mean "
                     "step time."), "step_seconds"),
            (counter("engine_overlapped_decode_steps", "Decode steps launched on the previous step's tokens on the "
                     "device while the host finished that step."), "overlapped_steps"),
            (counter("engine_kernel_builds", "Triton kernels built inside engine steps (each stalls its step): "
                     "launch shapes the start-up warm-up did not meet."), "kernel_builds"),
            (counter("engine_kernel_build_seconds", "Time engine steps spent building Triton kernels."),
             "kernel_build_seconds"),
        ]
        self._engine_seen = EngineStats(0, 0, 0, 0)  # the counters' values at the last scrape
        self._children: dict[tuple, object] = {}  # (metric, extra label values) -> its child for this model

    def render(self, stats: EngineStats) -> bytes:
        self.running.labels(self._model).set(stats.num_running)
        self.waiting.labels(self._model).set(stats.num_waiting)
        self.slots_used.labels(self._model).set(stats.slots_used)
        self.slots_total.labels(self._model).set(stats.slots_total)
        self.slot_usage.labels(self._model).set(stats.slots_used / max(stats.slots_total, 1))
        # The engine keeps running totals; a counter moves by what changed since the last scrape.
        seen = self._engine_seen
        for metric, field in self._engine_counters:
            self._child(metric).inc(max(getattr(stats, field) - getattr(seen, field), 0))
        self._engine_seen = stats
        return generate_latest(self.registry)

    # ---- fed by the request path ----------------------------------------------------------------

    def first_token(self, ttft_s: float, prompt_tokens: int) -> None:
        self._child(self.ttft).observe(ttft_s)
        self._child(self.prompt_tokens).inc(prompt_tokens)

    def tokens(self, count: int, gap_s: float | None) -> None:
        """`count` tokens of one choice arrived, `gap_s` after its previous ones (None for its first)."""
        tally = self._per_token
        tally.tokens += count
        if gap_s is not None:  # tokens that arrive together share the gap
            tally.observe(gap_s / count, count)

    def choice_finished(self, reason: str) -> None:
        self._child(self.success, reason).inc()

    def request_finished(self, e2e_s: float) -> None:
        self._child(self.e2e).observe(e2e_s)

    def _child(self, metric, *labels: str):
        """metric.labels(model, *labels), looked up once: labels() takes a lock and builds the key each call
        (~1 us, a few times per request). Made on first use, as before, so that a series appears in a scrape
        once it has a value."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(self._model, *labels)
        return child

    def reject(self, reason: str) -> None:
        self.rejected.labels(self._model, reason).inc()


class _PerTokenTally:
    """The generated-token counter and the inter-token latency histogram, as plain numbers. Only the
    event loop's thread bumps them; prometheus_client's own metrics take a lock per observation, which
    was ~6% of the server's CPU when streaming (~1.2 us a token)."""

    __slots__ = ("bounds", "counts", "gap_sum", "tokens")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket (last: above every bound), not cumulative
        self.gap_sum = 0.0
        self.tokens = 0

    def observe(self, value: float, times: int) -> None:
        self.counts[bisect_left(self.bounds, value)] += times  # the first bound >= value: Prometheus' le
        self.gap_sum += value * times


class _PerTokenCollector:
    """Exports a _PerTokenTally under the names vLLM uses (a scrape reads a snapshot of the counts, so
    each histogram it writes is consistent: its count is its +Inf bucket)."""

    def __init__(self, model_name: str, tally: _PerTokenTally):
        self._model = model_name
        self._tally = tally

    def collect(self):
        tally = self._tally
        cumulative = list(itertools.accumulate(list(tally.counts)))
        buckets = [(floatToGoString(b), n) for b, n in zip(tally.bounds, cumulative)] + [("+Inf", cumulative[-1])]
        itl = HistogramMetricFamily("deltaserve:inter_token_latency_seconds",
                                    "Time between generated tokens of a request.", labels=["model_name"])
        itl.add_metric([self._model], buckets, tally.gap_sum)
        generated = CounterMetricFamily("deltaserve:generation_tokens", "Tokens generated.", labels=["model_name"])
        generated.add_metric([self._model], tally.tokens)
        return [generated, itl]
