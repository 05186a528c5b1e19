"""Capstone, exercise 6.3 — a performance report from the server's Prometheus metrics."""
from __future__ import annotations

from helpers.course.serving.metrics import histogram_quantile, parse


def summarize(metrics_text: str) -> dict:
    """Exercise 6.3 — read the text of `GET /metrics` and return
        {"requests": completions answered 200 (serving_requests_total{endpoint="/v1/completions",status="200"}),
         "errors": completions answered with any other status,
         "tokens": serving_generated_tokens_total,
         "busy_seconds": {replica index (int): serving_replica_busy_seconds_total of that replica},
         "p50": , "p99": latency quantiles in seconds from serving_request_latency_seconds (as PromQL's
                histogram_quantile interpolates; NaN with no request)}
    Use helpers.course.serving.metrics.parse / histogram_quantile, or prometheus_client's parser.
    """
    samples = parse(metrics_text)
    ok = errors = 0.0
    busy = {}
    for (name, labels), v in samples.items():
        labels = dict(labels)
        if name == "serving_requests_total" and labels.get("endpoint") == "/v1/completions":
            if labels.get("status") == "200":
                ok += v
            else:
                errors += v
        elif name == "serving_replica_busy_seconds_total":
            busy[int(labels["replica"])] = v
    return {"requests": int(ok), "errors": int(errors),
            "tokens": int(samples.get(("serving_generated_tokens_total", frozenset()), 0)),
            "busy_seconds": dict(sorted(busy.items())),
            "p50": histogram_quantile(samples, "serving_request_latency_seconds", 0.5),
            "p99": histogram_quantile(samples, "serving_request_latency_seconds", 0.99)}
