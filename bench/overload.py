"""Overload: measure the route capacity, then offer 4x of it and see what the service does.

    python bench/overload.py                          # deploys serve_configs/local.yaml (MiniLM, synthetic arms)
    python bench/overload.py --url http://127.0.0.1:8000 --factor 4 --duration 30
    python bench/overload.py --embedder-mode inline   # the Ingress encodes in-process (embedder.mode: inline)

1. **Capacity** (closed loop): ``--concurrency`` clients post ``/v1/route`` back to back for
   ``--duration`` seconds (after a warm-up); capacity = answered 200s per second.
2. **Overload** (open loop): requests are sent on a fixed schedule at ``--factor`` x capacity for
   ``--duration`` seconds, whatever the answers (each is its own task: a slow answer does not slow
   the offered load). Latency is measured from each request's *scheduled* send time, so a client
   that falls behind cannot hide the service's queueing.

The load client is :mod:`httpload` (plain HTTP/1.1 on asyncio streams, keep-alive), not httpx: it
shares the service's cores, so it should spend as little CPU per request as it can; the report
prints the client's own CPU time per request sent, so that share is visible.

Prints goodput (200s per second during the open loop, and / capacity), latency p50/p99 of the
accepted (200) and of the rejected (503) requests, and the count of each status. The issue's
targets: no 5xx other than 503, rejected p99 <= 100 ms, goodput >= 0.8x capacity.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from httpload import LeanClient  # noqa: E402 - after the path set-up


def _queries(n: int) -> list[str]:
    spec = importlib.util.spec_from_file_location("serve_latency", REPO / "bench" / "serve_latency.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return list(mod.load_queries(n, max_chars=2000, data_dir=None))


def _pct(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"n": 0, "p50_ms": float("nan"), "p99_ms": float("nan")}
    a = np.asarray(xs) * 1000.0
    return {"n": len(xs), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


async def closed_loop(url: str, queries: list[str], concurrency: int, duration_s: float) -> dict[str, Any]:
    ok, statuses = 0, collections.Counter[int]()
    i = 0
    async with LeanClient(url, max_connections=concurrency, timeout_s=120) as client:
        deadline = time.perf_counter() + duration_s

        async def worker() -> None:
            nonlocal ok, i
            while time.perf_counter() < deadline:
                q = queries[i % len(queries)]
                i += 1
                r = await client.post("/v1/route", {"query": q})
                statuses[r.status] += 1
                ok += r.status == 200

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"capacity_rps": ok / wall, "statuses": dict(statuses), "seconds": wall}


async def open_loop(url: str, queries: list[str], rate: float, duration_s: float) -> dict[str, Any]:
    n = int(rate * duration_s)
    accepted: list[float] = []
    rejected: list[float] = []
    other: list[float] = []
    lag: list[float] = []  # how late this client sent each request (its own loop's backlog)
    statuses: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    cpu0 = time.process_time()
    async with LeanClient(url, max_connections=2000, timeout_s=60) as client:
        t0 = time.perf_counter()

        async def one(k: int) -> None:
            due = t0 + k / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lag.append(max(0.0, time.perf_counter() - due))
            try:
                r = await client.post("/v1/route", {"query": queries[k % len(queries)]})
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
                statuses[type(e).__name__] += 1
                other.append(time.perf_counter() - due)
                return
            took = time.perf_counter() - due
            statuses[str(r.status)] += 1
            if r.status == 200:
                accepted.append(took)
            elif r.status == 503:
                rejected.append(took)
                err = r.json().get("error")
                errors[err.get("code", "?") if isinstance(err, dict) else str(err)] += 1
            else:
                other.append(took)

        await asyncio.gather(*(one(k) for k in range(n)))
        wall = time.perf_counter() - t0
    return {
        "offered_rps": rate,
        "sent": n,
        "seconds": wall,
        "goodput_rps": len(accepted) / duration_s,
        "accepted": _pct(accepted),
        "rejected": _pct(rejected),
        "other": _pct(other),
        "client_send_lag": _pct(lag),
        "client_cpu_ms_per_request": 1000.0 * (time.process_time() - cpu0) / max(1, n),
        "statuses": dict(sorted(statuses.items())),
        "rejected_errors": dict(errors),
    }


def _deploy(state_dir: Path, arms_dir: Path, encoder: str, mode: str = "deployment") -> str:
    from ray_router.serve import launch
    from ray_router.serve.inline import as_inline
    from tests.serve.conftest import free_port, synthetic_arm_args

    cfg = launch.load_serve_config(REPO / "serve_configs" / "local.yaml")
    if mode == "inline":
        cfg = as_inline(cfg)
    for app in launch.our_apps(cfg):
        app["args"] = {**app["args"], **synthetic_arm_args(arms_dir, encoder=encoder)}
    cfg = launch.with_overrides(cfg, port=free_port(), args={"state": {"dir": str(state_dir)}})
    launch.init_ray(num_cpus=2)
    return launch.deploy(cfg, timeout_s=600)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running service (else local.yaml is deployed here)")
    p.add_argument("--encoder", default="minilm", help="when deploying: the encoder (minilm, or hash)")
    p.add_argument("--direct", action="store_true", help="when deploying: use the direct-ingress URL")
    p.add_argument(
        "--embedder-mode",
        choices=("deployment", "inline"),
        default="deployment",
        help="when deploying: the Embedder deployment behind a handle, or the Ingress encoding in-process",
    )
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop clients for the capacity")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of each phase")
    p.add_argument("--factor", type=float, default=4.0, help="offered load / capacity in the open loop")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from ray_router.serve import launch

    queries = _queries(2000)
    tmp = None
    url = args.url
    if url is None:
        tmp = tempfile.TemporaryDirectory(prefix="rr-overload-")
        url = _deploy(Path(tmp.name) / "state", Path(tmp.name), args.encoder, args.embedder_mode)
        if args.direct:
            url = (launch.reachable_urls(launch.direct_urls()) or [url])[0]
    try:
        asyncio.run(closed_loop(url, queries, args.concurrency, 5.0))  # warm-up
        cap = asyncio.run(closed_loop(url, queries, args.concurrency, args.duration))
        over = asyncio.run(open_loop(url, queries, args.factor * cap["capacity_rps"], args.duration))
    finally:
        if tmp is not None:
            launch.shutdown()
            tmp.cleanup()
    n5xx = sum(n for s, n in over["statuses"].items() if s.isdigit() and int(s) >= 500 and s != "503")
    report = {
        "url": url,
        "capacity": cap,
        "overload": over,
        "goodput_over_capacity": over["goodput_rps"] / cap["capacity_rps"] if cap["capacity_rps"] else float("nan"),
        "n_5xx_other_than_503": n5xx,
    }
    a, r = over["accepted"], over["rejected"]
    print(f"capacity (closed loop, {args.concurrency} clients): {cap['capacity_rps']:.1f} routes/s  {cap['statuses']}")
    print(
        f"offered (open loop): {over['offered_rps']:.1f} routes/s for {args.duration:.0f} s = {over['sent']} requests"
    )
    print(f"goodput: {over['goodput_rps']:.1f} routes/s = {report['goodput_over_capacity']:.2f}x capacity")
    print(f"accepted: n={a['n']} p50 {a['p50_ms']:.0f} ms p99 {a['p99_ms']:.0f} ms")
    print(f"rejected (503): n={r['n']} p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms  {over['rejected_errors']}")
    print(f"statuses: {over['statuses']}; 5xx other than 503: {n5xx}")
    lag = over["client_send_lag"]
    print(f"client send lag (included in the latencies): p50 {lag['p50_ms']:.1f} ms p99 {lag['p99_ms']:.1f} ms")
    print(f"client CPU: {over['client_cpu_ms_per_request']:.2f} ms per request sent (on the service's cores)")
    print(f"load average after the run: {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
