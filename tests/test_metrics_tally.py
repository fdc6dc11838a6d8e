"""The per-token metrics (generated tokens, inter-token latency) kept as a lock-free tally read out at
scrape time: the same Prometheus series and values a prometheus_client Histogram would give."""

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.async_engine import EngineStats
from server.metrics import _LATENCY_BUCKETS, Metrics

ITL = "deltaserve:inter_token_latency_seconds"


def _samples(text: str, family: str) -> dict:
    return {(s.name, s.labels.get("le"), s.labels.get("model_name")): s.value
            for f in text_string_to_metric_families(text) if f.name == family for s in f.samples}


def test_token_tally_scrapes_as_a_prometheus_histogram_would():
    metrics = Metrics("m")
    registry = CollectorRegistry()
    reference = Histogram(ITL, "reference", ["model_name"], buckets=_LATENCY_BUCKETS, registry=registry)
    # (tokens, gap): first tokens (no gap), bursts that share a gap, values on and between bounds
    arrivals = [(1, None), (1, 0.0004), (3, 0.03), (1, 0.005), (2, 0.2), (1, 100.0), (4, None)]
    for count, gap in arrivals:
        metrics.tokens(count, gap)
        if gap is not None:
            for _ in range(count):
                reference.labels("m").observe(gap / count)
    text = metrics.render(EngineStats(0, 0, 0, 1)).decode()
    generated = _samples(text, "deltaserve:generation_tokens")
    assert generated == {("deltaserve:generation_tokens_total", None, "m"): 13}
    ours, expected = _samples(text, ITL), _samples(generate_latest(registry).decode(), ITL)
    assert set(ours) == set(expected) and len(expected) == len(_LATENCY_BUCKETS) + 3  # buckets, +Inf, count, sum
    for key, value in expected.items():
        assert abs(ours[key] - value) < 1e-9, key
    assert ours[(f"{ITL}_count", None, "m")] == 8  # 13 tokens, 5 of them without a gap
