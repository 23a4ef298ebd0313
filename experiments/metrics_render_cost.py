"""How long one scrape of vLLM's ``/metrics`` takes when ``vllm:lora_requests_info`` holds
many series (issue 15: the real runs' ITL/TPOT gap is the scrape, README_validate).

vLLM sets that gauge to the current time under labels that are the comma-joined names of
the running and of the waiting adapters; every label string it has ever seen stays a
series. With many adapters nearly every step's running set is new, so an hour leaves
thousands of series, all rendered by each scrape on the API server's event loop. This
builds such a gauge with ``prometheus_client`` (the library vLLM uses; not a twin
dependency: ``pip install prometheus_client`` to run this) and times ``generate_latest``
for 1k-100k series of 24 running adapters each (a third with 2 waiting), medians of 3.

    python experiments/metrics_render_cost.py

The last line is one JSON object: milliseconds per scrape by series count, and µs per series.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time

SERIES = (1_000, 10_000, 50_000, 100_000)


def render_ms(n: int, rng: random.Random) -> float:
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    names = [f"adapter-{i}" for i in range(256)]
    reg = CollectorRegistry()
    gauge = Gauge("vllm:lora_requests_info", "Running stats on lora requests.",
                  labelnames=["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
                  registry=reg)
    for i in range(n):
        waiting = ",".join(rng.sample(names, 2)) if i % 3 == 0 else ""
        gauge.labels("64", waiting, ",".join(rng.sample(names, 24))).set_to_current_time()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        generate_latest(reg)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        sys.exit("needs prometheus_client (pip install prometheus_client): vLLM's metrics "
                 "library, not a dependency of the twin")
    rng = random.Random(0)
    out = {}
    for n in SERIES:
        out[str(n)] = round(render_ms(n, rng), 1)
        print(f"{n:>7,} series: {out[str(n)]:8.1f} ms per scrape", flush=True)
    per = statistics.median(out[str(n)] * 1000 / n for n in SERIES)
    print(json.dumps({"scrape_ms_by_series": out, "us_per_series": round(per, 1)}))


if __name__ == "__main__":
    main()
