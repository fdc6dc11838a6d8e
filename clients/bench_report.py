"""What a bench-serve run measured: one record per request, the summary over them, and the printed table.

Times are seconds in records and milliseconds in the summary. Per request: TTFT is from sending the
request to the first streamed text; ITL is each gap between successive text events; TPOT is
(end-to-end - TTFT) / (output tokens - 1), the mean time per token after the first; E2E is from
sending to the end of the stream. Percentiles interpolate linearly between the closest ranks (numpy's
default), so p50 <= p90 <= p99 always holds. Each row also gives n, how many values it rests on: a p99
over 3 requests is only a point between the two slowest, and the table should not let it pass for a tail.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)
UNFINISHED = "unfinished"  # the prefix of the error of a request cut off by --max-duration or Ctrl-C


@dataclass
class RequestRecord:
    index: int
    prompt_tokens: int
    start_s: float | None = None  # when it was sent, from the start of the run
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0  # the server's usage count
    finish_reason: str | None = None
    error: str | None = None  # None: it finished; else why not
    itl_s: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2e_s is not None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution_ms(values_s: list[float]) -> dict[str, float | None]:
    values = [1000 * v for v in values_s]
    stats: dict[str, float | None] = {"n": len(values), "mean": sum(values) / len(values) if values else None}
    stats |= {f"p{q}": percentile(values, q) for q in PERCENTILES}
    return stats


def summarize(records: list[RequestRecord], duration_s: float) -> dict[str, Any]:
    done = [r for r in records if r.ok]
    failed = [r for r in records if r.error is not None and not r.error.startswith(UNFINISHED)]
    output_tokens = sum(r.output_tokens for r in done)
    input_tokens = sum(r.prompt_tokens for r in done)
    per_s = 1 / duration_s if duration_s > 0 else 0.0
    return {
        "requests": len(records),
        "completed": len(done),
        "failed": len(failed),
        "unfinished": len(records) - len(done) - len(failed),
        "duration_s": duration_s,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "request_throughput": len(done) * per_s,  # completed requests / s
        "output_throughput": output_tokens * per_s,  # generated tokens / s
        "total_token_throughput": (input_tokens + output_tokens) * per_s,
        "ttft_ms": distribution_ms([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_ms": distribution_ms([t for r in done if (t := r.tpot_s) is not None]),
        "itl_ms": distribution_ms([gap for r in done for gap in r.itl_s]),
        "e2e_ms": distribution_ms([r.e2e_s for r in done]),
        "finish_reasons": dict(Counter(r.finish_reason for r in done)),
        "errors": dict(Counter(r.error for r in failed).most_common(5)),
    }


def render(summary: dict[str, Any], title: str) -> str:
    s = summary
    lines = [title,
             f"completed {s['completed']} of {s['requests']} request{'' if s['requests'] == 1 else 's'} in "
             f"{s['duration_s']:.2f} s "
             f"({s['failed']} failed, {s['unfinished']} unfinished)",
             f"  request throughput  {s['request_throughput']:10.2f} req/s",
             f"  output throughput   {s['output_throughput']:10.1f} tok/s",
             f"  total throughput    {s['total_token_throughput']:10.1f} tok/s (input + output)",
             f"  {'':18}{'n':>8}{'mean':>10}" + "".join(f"{f'p{q}':>10}" for q in PERCENTILES)]
    for key, name in (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl_ms", "ITL (ms)"),
                      ("e2e_ms", "E2E (ms)")):
        row = s[key]
        cells = [row["mean"]] + [row[f"p{q}"] for q in PERCENTILES]
        lines.append(f"  {name:18}{row['n']:8d}"
                     + "".join(f"{c:10.2f}" if c is not None else f"{'-':>10}" for c in cells))
    for message, count in s["errors"].items():
        lines.append(f"  error x{count}: {message}")
    return "\n".join(lines)
