"""Prometheus text metrics of the service (``GET /metrics``)."""

from __future__ import annotations

import threading

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def render(self, name: str) -> list[str]:
        lines = [f"# TYPE {name} histogram"]
        for bound, count in zip(self.buckets, self.counts):
            lines.append(f'{name}_bucket{{le="{bound}"}} {count}')
        lines += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total}", f"{name}_count {self.count}"]
        return lines


def _counter(name: str, label: str, values: dict) -> list[str]:
    return [f"# TYPE {name} counter"] + [f'{name}{{{label}="{k}"}} {n}' for k, n in sorted(values.items())]


class Metrics:
    """* ``easynlp_requests_total{status}`` and ``easynlp_request_latency_seconds``: generation requests (EAS and
    OpenAI routes); status 499: the client went away before its answer.
    * ``easynlp_responses_total{status}``: every HTTP answer of every route (404, 413, 5xx … included).
    * ``easynlp_batch_size_images``: images per model call.
    * ``easynlp_dropped_images_total{stage}``: work nobody waited for any more — ``queued`` (dropped before it
      started), ``running`` (stopped between sampler steps), ``unclaimed`` (finished after its client had gone),
      ``shared`` (a repeated request that joined the identical one under way instead of generating again)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[int, int] = {}
        self.responses: dict[int, int] = {}
        self.dropped: dict[str, int] = {}
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch_sizes = Histogram(BATCH_BUCKETS)

    def record(self, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[status] = self.requests.get(status, 0) + 1
            self.latency.observe(seconds)

    def record_response(self, status: int) -> None:
        with self.lock:
            self.responses[status] = self.responses.get(status, 0) + 1

    def record_batch(self, units: int) -> None:
        with self.lock:
            self.batch_sizes.observe(units)

    def record_drop(self, stage: str, units: int) -> None:
        with self.lock:
            self.dropped[stage] = self.dropped.get(stage, 0) + units

    def render(self, queue_depth: int, ready: bool) -> str:
        with self.lock:
            lines = _counter("easynlp_requests_total", "status", self.requests)
            lines += self.latency.render("easynlp_request_latency_seconds")
            lines += _counter("easynlp_responses_total", "status", self.responses)
            lines += self.batch_sizes.render("easynlp_batch_size_images")
            lines += _counter("easynlp_dropped_images_total", "stage",
                              {stage: self.dropped.get(stage, 0) for stage in ("queued", "running", "unclaimed",
                                                                               "shared")})
        lines += ["# TYPE easynlp_queue_depth gauge", f"easynlp_queue_depth {queue_depth}",
                  "# TYPE easynlp_ready gauge", f"easynlp_ready {int(ready)}"]
        return "\n".join(lines) + "\n"
