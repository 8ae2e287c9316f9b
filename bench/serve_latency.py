"""Latency and throughput of ``POST /v1/route`` against the bare encoder (the floor), in one run.

    python bench/serve_latency.py                       # deploys serve_configs/local.yaml itself
    python bench/serve_latency.py --url http://127.0.0.1:8000   # a service that already runs
    python bench/serve_latency.py --smoke-test          # tiny budget (CI)

Measures, on the same RouterBench queries (their query text, mean about 260 characters):

- the bare encoder in this process (same model, same number of torch threads as one embedder
  replica: ``--encoder-threads``, default the config's ``embedder.num_cpus``): one query at a time
  (p50/p99) and batched (queries/s at the embedder's ``max_batch_size``);
- ``/v1/route`` over real HTTP with 1 client (sequential) and 16 concurrent clients: p50/p99 and
  requests/s, through each path the service offers: Serve's proxy (the config's port) and, when
  Serve's direct ingress is on (``ray-router serve``'s default), the Ingress replica's own HTTP
  server, which skips the proxy hop;

and prints the ratios the issue sets targets for, per path: p50 at 1 client / bare single-query
encode (target <= 1.5) and requests/s at 16 clients / bare batched encoder (target >= 0.7). The
report's headline figures (``route_*``, ``ratio_*``) are the fastest path's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def percentiles(samples_s: list[float]) -> tuple[float, float]:
    a = np.asarray(samples_s) * 1000.0
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def load_queries(n: int, max_chars: int, data_dir: str | None) -> list[str]:
    """RouterBench queries (the loader's query text) in a fixed random order."""
    try:
        from ray_router.data import load_dataset, resolve_data_dir

        table = load_dataset("routerbench", data_dir=resolve_data_dir(data_dir))
        rng = np.random.default_rng(0)
        texts = [str(t) for t in table.texts[rng.permutation(table.n_queries)]]
        texts = [t for t in texts if 0 < len(t) <= max_chars]
    except Exception as e:  # noqa: BLE001 - a benchmark may run without the data
        print(f"[bench] RouterBench not available ({e}); using synthetic queries", file=sys.stderr)
        texts = []
    while len(texts) < n:
        texts.append(f"Synthetic question {len(texts)}: how do I sort a list of {len(texts)} numbers in Python?")
    return texts[:n]


def encoder_floor(queries: list[str], threads: int, batch_size: int, encoder_name: str) -> dict:
    import torch

    from ray_router.embeddings import get_encoder

    torch.set_num_threads(max(1, threads))
    enc = get_encoder(encoder_name, cache_dir=False, device="cpu")
    enc.encode(queries[:4])  # load + warm up
    single = []
    for q in queries:
        t0 = time.perf_counter()
        enc.encode([q])
        single.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(0, len(queries), batch_size):
        enc.encode(queries[i : i + batch_size], batch_size)
    batched = time.perf_counter() - t0
    p50, p99 = percentiles(single)
    return {
        "encoder_single_p50_ms": p50,
        "encoder_single_p99_ms": p99,
        "encoder_batched_qps": len(queries) / batched,
        "encoder_threads": threads,
    }


async def _load(url: str, queries: list[str], concurrency: int, duration_s: float, max_requests: int) -> dict:
    import httpx

    lat: list[float] = []
    errors = 0
    counter = {"i": 0}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        deadline = time.perf_counter() + duration_s

        async def worker():
            nonlocal errors
            while time.perf_counter() < deadline and counter["i"] < max_requests:
                q = queries[counter["i"] % len(queries)]
                counter["i"] += 1
                t0 = time.perf_counter()
                r = await client.post("/v1/route", json={"query": q})
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t0)
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    p50, p99 = percentiles(lat) if lat else (float("nan"), float("nan"))
    return {"p50_ms": p50, "p99_ms": p99, "qps": len(lat) / wall, "n": len(lat), "errors": errors}


def measure_route(url: str, queries: list[str], concurrency: int, duration_s: float, max_requests: int) -> dict:
    return asyncio.run(_load(url, queries, concurrency, duration_s, max_requests))


def _deploy(config: Path, state_dir: str) -> tuple[str, dict]:
    from ray_router.serve import launch

    sock_port = _free_port()
    cfg = launch.with_overrides(launch.load_serve_config(config), port=sock_port, args={"state": {"dir": state_dir}})
    launch.init_ray(num_cpus=2)
    return launch.deploy(cfg, timeout_s=600), cfg


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "serve_configs" / "local.yaml"))
    p.add_argument("--url", default=None, help="an already running service (else the config is deployed here)")
    p.add_argument("--n-queries", type=int, default=300, help="queries for the encoder floor and the 1-client run")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of the 16-client run")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument(
        "--encoder-threads", type=int, default=None, help="torch threads of the floor (default: embedder.num_cpus)"
    )
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument("--smoke-test", action="store_true", help="tiny budget: checks that the benchmark runs")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from ray_router.serve import launch

    cfg = launch.load_serve_config(args.config)
    app_args = launch.our_apps(cfg)[0]["args"]
    threads = args.encoder_threads or max(1, round(app_args.get("embedder", {}).get("num_cpus", 1)))
    batch = int(app_args.get("embedder", {}).get("max_batch_size", 32))
    encoder_name = app_args.get("encoder", {}).get("name", "minilm")
    n = 8 if args.smoke_test else args.n_queries
    duration = 1.0 if args.smoke_test else args.duration
    queries = load_queries(max(n, 64), max_chars=4000, data_dir=args.data_dir)

    started_here = args.url is None
    tmp = None
    paths = {"given": args.url} if args.url else {}
    if started_here:
        tmp = tempfile.TemporaryDirectory(prefix="rr-bench-state-")
        url, _ = _deploy(Path(args.config), tmp.name)
        direct = launch.direct_urls()
        paths = {"proxy": url, **({"direct": direct[0]} if direct else {})}
    c = args.concurrency
    runs: dict[str, dict] = {}
    try:
        floors = [encoder_floor(queries[:n], threads, batch, encoder_name)]  # the service up and idle
        for name, url in paths.items():
            measure_route(url, queries, 1, 60.0, 4 if args.smoke_test else 20)  # warm up (and the connection)
            runs[name] = {
                "c1": measure_route(url, queries[:n], 1, 3600.0, n),
                "cc": measure_route(url, queries, c, duration, 10**9),
            }
        floors.append(encoder_floor(queries[:n], threads, batch, encoder_name))
        # the floor is measured before and after the routes; the ratios use the faster of the two
        # (the stricter floor), so machine noise cannot flatter them
        floor = {
            **min(floors, key=lambda f: f["encoder_single_p50_ms"]),
            "encoder_batched_qps": max(f["encoder_batched_qps"] for f in floors),
            "encoder_single_p50_ms_runs": [f["encoder_single_p50_ms"] for f in floors],
            "encoder_batched_qps_runs": [f["encoder_batched_qps"] for f in floors],
        }
    finally:
        if started_here:
            launch.shutdown()
            tmp.cleanup()
    per_path = {}
    for name, r in runs.items():
        c1, cc = r["c1"], r["cc"]
        per_path[name] = {
            "url": paths[name],
            "route_c1_p50_ms": c1["p50_ms"],
            "route_c1_p99_ms": c1["p99_ms"],
            "route_c1_qps": c1["qps"],
            "route_c16_p50_ms": cc["p50_ms"],
            "route_c16_p99_ms": cc["p99_ms"],
            "route_c16_qps": cc["qps"],
            "ratio_p50_c1": c1["p50_ms"] / floor["encoder_single_p50_ms"],
            "ratio_qps_c16": cc["qps"] / floor["encoder_batched_qps"],
            "errors": c1["errors"] + cc["errors"],
            "n_c1": n,
            "n_c16": cc["n"],
        }
    best = min(per_path, key=lambda k: per_path[k]["route_c1_p50_ms"])
    report = {
        **floor,
        **per_path[best],
        "path": best,
        "paths": per_path,
        "concurrency": c,
        "cpus": os.cpu_count(),
        "batch": batch,
    }
    mean_chars = float(np.mean([len(q) for q in queries[:n]]))
    print(
        f"{n} RouterBench queries (mean {mean_chars:.0f} chars) sequentially, then {duration:g}s at {c} clients, "
        f"per path; encoder floor in this process on {threads} torch thread(s), batch {batch}; {report['cpus']} CPUs"
    )
    print(f"{'':34s}{'p50 ms':>10s}{'p99 ms':>10s}{'req/s':>10s}")
    print(
        f"{'bare encoder, 1 query':34s}{floor['encoder_single_p50_ms']:10.1f}{floor['encoder_single_p99_ms']:10.1f}"
        f"{1000.0 / floor['encoder_single_p50_ms']:10.1f}"
    )
    print(f"{'bare encoder, batched':34s}{'':10s}{'':10s}{floor['encoder_batched_qps']:10.1f}")
    print(
        "  (floor measured before and after the routes: single p50 "
        + ", ".join(f"{v:.1f}" for v in floor["encoder_single_p50_ms_runs"])
        + " ms; batched "
        + ", ".join(f"{v:.1f}" for v in floor["encoder_batched_qps_runs"])
        + " q/s; the ratios use the faster)"
    )
    for name, r in per_path.items():
        print(
            f"{f'/v1/route via {name}, 1 client':34s}{r['route_c1_p50_ms']:10.1f}{r['route_c1_p99_ms']:10.1f}"
            f"{r['route_c1_qps']:10.1f}"
        )
        print(
            f"{f'/v1/route via {name}, {c} clients':34s}{r['route_c16_p50_ms']:10.1f}{r['route_c16_p99_ms']:10.1f}"
            f"{r['route_c16_qps']:10.1f}"
        )
    for name, r in per_path.items():
        print(f"via {name} ({r['url']}):")
        print(f"  ratio p50(route, 1 client) / p50(bare encode)          = {r['ratio_p50_c1']:.2f}  (target <= 1.5)")
        print(f"  ratio req/s(route, {c} clients) / req/s(bare batched)  = {r['ratio_qps_c16']:.2f}  (target >= 0.7)")
        if r["errors"]:
            print(f"  non-200 answers: {r['errors']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
