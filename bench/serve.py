"""Benchmark the serve app: closed-loop HTTP clients against the tiny model, and the HTTP path's overhead.

Prints one JSON line, every figure measured in this run:
- per concurrency (1, 8, 32): requests/s, p50 and p99 latency, mean X-Batch-Size;
- batching_speedup = throughput at concurrency 8 / throughput at concurrency 1 (goal >= 2.5);
- http_overhead = HTTP p50 at concurrency 1 / in-process p50 of the same generation - 1 (goal <= 0.15).
  The in-process figure runs the same GenerationEngine (sample + PNG) in this process, in blocks
  alternating with the HTTP blocks so that drifting machine load hits both alike.

    PYTHONPATH=. python bench/serve.py [--steps 10] [--seconds 30] [--rounds 3] [--concurrency 1 8 32]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests

from medsd.config import ServeConfig, load_config
from medsd.labels import CHEXPERT_OBSERVATIONS
from medsd.service.api import draw_seed
from medsd.service.schema import GenerateRequest
from medsd.service.validation import resolve_request

SPEEDUP_GOAL = 2.5
OVERHEAD_GOAL = 0.15
OVERHEAD_ROUNDS = 10  # alternating blocks of in-process and HTTP requests
REQUESTS_PER_BLOCK = 4
WARMUP_REQUESTS = 3
HTTP_TIMEOUT_S = 300
P99 = 0.99


def request_body(index: int, steps: int) -> dict:
    """The index-th request of a client: one image, labels rotating so prompts vary like real traffic."""
    label = CHEXPERT_OBSERVATIONS[index % len(CHEXPERT_OBSERVATIONS)]
    return {"labels": [label], "seed": index, "steps": steps, "format": "png"}


def post(url: str, body: dict, session: requests.Session) -> tuple[float, int]:
    """(seconds, X-Batch-Size) of one generation over HTTP."""
    started = time.perf_counter()
    answer = session.post(f"{url}/v1/generate", json=body, timeout=HTTP_TIMEOUT_S)
    seconds = time.perf_counter() - started
    answer.raise_for_status()
    return seconds, int(answer.headers["X-Batch-Size"])


def closed_loop(url: str, concurrency: int, seconds: float, steps: int) -> tuple[float, list[float], list[int]]:
    """``concurrency`` clients, each sending its next request as soon as the last one answers.

    Returns (elapsed seconds, latencies, X-Batch-Size of each answer).
    """
    deadline = time.perf_counter() + seconds
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    batch_sizes: list[int] = []

    def client() -> None:
        with requests.Session() as session:
            while time.perf_counter() < deadline:
                with lock:
                    index = next(counter)
                latency, batch_size = post(url, request_body(index, steps), session)
                with lock:
                    latencies.append(latency)
                    batch_sizes.append(batch_size)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()
    return time.perf_counter() - started, latencies, batch_sizes


def measure_levels(url: str, concurrencies: list[int], seconds: float, rounds: int, steps: int) -> dict:
    """Every concurrency for ``seconds`` per round, levels interleaved round by round so drifting load hits all."""
    elapsed = dict.fromkeys(concurrencies, 0.0)
    latencies: dict[int, list[float]] = {c: [] for c in concurrencies}
    batch_sizes: dict[int, list[int]] = {c: [] for c in concurrencies}
    for _ in range(rounds):
        for concurrency in concurrencies:
            seconds_taken, level_latencies, level_batches = closed_loop(url, concurrency, seconds / rounds, steps)
            elapsed[concurrency] += seconds_taken
            latencies[concurrency] += level_latencies
            batch_sizes[concurrency] += level_batches
    return {
        str(c): {
            "requests": len(latencies[c]),
            "throughput_rps": round(len(latencies[c]) / elapsed[c], 3),
            "p50_s": round(float(np.percentile(latencies[c], 50)), 4),
            "p99_s": round(float(np.percentile(latencies[c], 100 * P99)), 4),
            "mean_batch_size": round(statistics.fmean(batch_sizes[c]), 2),
        }
        for c in concurrencies
    }


def generate_in_process(engine, cfg: ServeConfig, body: dict) -> None:
    """What the HTTP path does for ``body``, minus HTTP and Ray: validate, sample, encode the PNG."""
    engine.run([resolve_request(GenerateRequest(**body), engine.describe(), cfg, draw_seed)])


def measure_overhead(url: str, engine, cfg: ServeConfig, steps: int) -> dict:
    """p50 of one image in-process vs over HTTP at concurrency 1, in alternating blocks."""
    in_process: list[float] = []
    over_http: list[float] = []
    index = itertools.count()
    with requests.Session() as session:
        for _ in range(OVERHEAD_ROUNDS):
            for _ in range(REQUESTS_PER_BLOCK):
                started = time.perf_counter()
                generate_in_process(engine, cfg, request_body(next(index), steps))
                in_process.append(time.perf_counter() - started)
            for _ in range(REQUESTS_PER_BLOCK):
                over_http.append(post(url, request_body(next(index), steps), session)[0])
    in_process_p50 = statistics.median(in_process)
    http_p50 = statistics.median(over_http)
    return {
        "in_process_p50_s": round(in_process_p50, 4),
        "http_p50_s": round(http_p50, 4),
        "http_overhead": round(http_p50 / in_process_p50 - 1, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per image")
    parser.add_argument("--seconds", type=float, default=30.0, help="closed-loop duration per concurrency")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds the duration is split into")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="ServeConfig key.path=value")
    args = parser.parse_args()

    import ray

    from medsd.service.engine import GenerationEngine
    from medsd.service.server import run_server

    cfg = load_config(ServeConfig, None, args.overrides)
    run_server(cfg, blocking=False)
    url = f"http://{cfg.host}:{cfg.port}"
    engine = GenerationEngine(cfg)
    try:
        load_before = os.getloadavg()[0]
        with requests.Session() as session:
            for index in range(WARMUP_REQUESTS):
                post(url, request_body(index, args.steps), session)
                generate_in_process(engine, cfg, request_body(index, args.steps))
        overhead = measure_overhead(url, engine, cfg, args.steps)
        levels = measure_levels(url, args.concurrency, args.seconds, args.rounds, args.steps)
    finally:
        ray.shutdown()
    figures: dict = {
        "bench": "serve",
        "model": cfg.model.model,
        "steps": args.steps,
        # Other work on the machine skews every figure: the 1-minute load average before and after.
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        **overhead,
        "levels": levels,
    }
    if "1" in levels and "8" in levels:
        speedup = levels["8"]["throughput_rps"] / levels["1"]["throughput_rps"]
        figures["batching_speedup_c8"] = round(speedup, 3)
        figures["goal_batching_speedup_c8_ge_2_5"] = speedup >= SPEEDUP_GOAL
    figures["goal_http_overhead_le_15pct"] = overhead["http_overhead"] <= OVERHEAD_GOAL
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
