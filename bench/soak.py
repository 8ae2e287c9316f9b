"""Soak: the real app at half its measured capacity for a long while; 5xx count and memory growth.

    python bench/soak.py                      # 10 minutes, serve_configs/local.yaml, real arms if the data is there
    python bench/soak.py --duration 60        # a shorter soak
    python bench/soak.py --arms synthetic     # no data needed (seeded arm table, same encoder)
    python bench/soak.py --smoke-test         # a few seconds: checks that the benchmark runs

1. Deploys ``--config`` on a local Ray (2 CPUs, as ``ray-router serve`` does) with a fresh state
   directory; the arms are the config's (RouterBench's offline split, the packaged MiniLM) or, with
   ``--arms synthetic`` (the default when the data is absent), the same 11 arms with seeded random
   embeddings in the encoder's space.
2. Capacity: a closed loop of ``--concurrency`` clients for ``--capacity-s`` seconds, each doing
   ``POST /v1/route`` and, for a ``--feedback-fraction`` of the routes, ``POST /v1/feedback`` on the
   decision; capacity = successful HTTP requests per second (both kinds).
3. Soak: an open loop (Poisson arrivals) at ``--load`` x capacity (default 0.5) for ``--duration``
   seconds with the same mix. Every ``--sample-s`` seconds it prints the window's requests, status
   counts, route latency and the RSS of every Serve process: the Serve controller, the HTTP proxy
   actor, the HAProxy manager and its ``haproxy`` child (Serve's HTTP port by default) and each
   replica (pids from the GCS actor table of this Ray instance, so another Ray on the machine is
   never counted).
4. Prints the totals: 5xx count (target 0), each process's RSS at the start and the end of the soak
   and its growth in % (target <= 5%), and whether any replica was replaced (its pid changed).

The load generator runs in this process, on the same 2 cores as the service: the capacity it
measures is the capacity of this setup, client included; the machine's load average is printed at
the start and at the end, since other work on the machine changes it. A soak is meant for a quiet
machine: when other jobs take the cores, the service falls behind its half-capacity load and sheds
(503), which counts against the 0 x 5xx target, as any 5xx does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SERVE_CLASSES = ("ServeController", "ProxyActor", "HAProxyManager", "ServeReplica")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the app
def synthetic_arm_table(directory: Path, base_args: dict, encoder: str, seed: int = 0) -> dict:
    """The config's arms as an ``arm_embeddings.file`` that needs no data (the tests' synthetic table)."""
    from tests.serve.helpers import write_synthetic_arm_table

    ids = [a["id"] for a in base_args["arms"]]
    return {"arm_embeddings": {"file": str(write_synthetic_arm_table(directory, ids, encoder, seed))}}


def data_available(data_dir: str | None) -> bool:
    from ray_router.data import resolve_data_dir

    d = resolve_data_dir(data_dir)
    return (d / "routerbench_5shot_arc_mbpp_winogrande.parquet").is_file()  # the rows the loader reads


def deploy(config: Path, state_dir: Path, arms: str, data_dir: str | None, num_cpus: int) -> str:
    from ray_router.serve import launch

    cfg = launch.load_serve_config(config)
    app = launch.our_apps(cfg)[0]
    overrides: dict[str, Any] = {"state": {"dir": str(state_dir)}}
    if arms == "synthetic":
        encoder = (app["args"].get("encoder") or {}).get("name", "minilm")
        app["args"] = {**app["args"], **synthetic_arm_table(state_dir.parent, app["args"], encoder)}
    elif data_dir:
        overrides["arm_embeddings"] = {"from_dataset": {"data_dir": str(Path(data_dir).resolve())}}
    cfg = launch.with_overrides(cfg, port=_free_port(), args=overrides)
    launch.init_ray(num_cpus=num_cpus)
    return launch.deploy(cfg, timeout_s=900)


def serve_processes() -> dict[str, int]:
    """name -> pid of every live Serve actor of this Ray instance (controller, proxy, replicas).
    (``raycompat.actor_table``: Ray's public state API needs the dashboard.)"""
    from ray_router.raycompat import actor_table

    out = {}
    for a in actor_table():
        name = a["class_name"]
        if a["state"] == "ALIVE" and name.startswith(SERVE_CLASSES) and a["pid"]:
            out[name.replace("ServeReplica:", "")] = int(a["pid"])
            if name == "HAProxyManager":  # and the haproxy binary it runs (Serve's HTTP port)
                for i, pid in enumerate(_children(int(a["pid"]), "haproxy")):
                    out[f"haproxy{i or ''}"] = pid
    return out


def _children(pid: int, comm: str) -> list[int]:
    """Child processes of ``pid`` whose command name is ``comm`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
            name = fields[0].split("(", 1)[1]
            if int(fields[1].split()[1]) == pid and name == comm:
                out.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return sorted(out)


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def queries(n: int, data_dir: str | None) -> list[str]:
    try:
        from ray_router.data import load_dataset, resolve_data_dir

        table = load_dataset("routerbench", data_dir=resolve_data_dir(data_dir))
        rng = np.random.default_rng(0)
        texts = [str(t) for t in table.texts[rng.permutation(table.n_queries)] if 0 < len(str(t)) <= 2000]
    except Exception as e:  # noqa: BLE001 - the soak runs without the data too
        print(f"[soak] RouterBench queries not available ({e}); synthetic queries", file=sys.stderr)
        texts = []
    while len(texts) < n:
        texts.append(f"Synthetic question {len(texts)}: how do I sort a list of {len(texts)} numbers in Python?")
    return texts[:n]


# -------------------------------------------------------------------------------- load
class Tally:
    def __init__(self) -> None:
        self.status: Counter = Counter()  # (endpoint, status) -> count; status 0: a transport error
        self.route_lat: list[float] = []
        self.errors: Counter = Counter()  # exception class -> count

    def ok(self) -> int:
        return sum(n for (_, s), n in self.status.items() if s == 200)

    def fivexx(self) -> int:
        return sum(n for (_, s), n in self.status.items() if 500 <= s < 600)

    def total(self) -> int:
        return sum(self.status.values())


async def one_op(client, q: str, token: str, feedback_fraction: float, rng: random.Random, tally: Tally) -> None:
    """POST /v1/route, then (for a fraction of the routes) POST /v1/feedback on its decision."""
    import httpx

    t0 = time.perf_counter()
    try:
        r = await client.post("/v1/route", json={"query": q})
    except httpx.HTTPError as e:
        tally.status[("route", 0)] += 1
        tally.errors[type(e).__name__] += 1
        return
    tally.status[("route", r.status_code)] += 1
    if r.status_code != 200:
        return
    tally.route_lat.append(time.perf_counter() - t0)
    if rng.random() >= feedback_fraction:
        return
    body = {"decision_id": r.json()["decision_id"], "outcome": rng.choice(["first", "second", "tie"])}
    try:
        f = await client.post("/v1/feedback", json=body, headers={"Authorization": f"Bearer {token}"})
    except httpx.HTTPError as e:
        tally.status[("feedback", 0)] += 1
        tally.errors[type(e).__name__] += 1
        return
    tally.status[("feedback", f.status_code)] += 1


async def closed_loop(url: str, qs: list[str], token: str, concurrency: int, seconds: float, ff: float) -> dict:
    import httpx

    tally = Tally()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        deadline = time.perf_counter() + seconds

        async def worker(i: int) -> None:
            rng = random.Random(i)
            while time.perf_counter() < deadline:
                await one_op(client, rng.choice(qs), token, ff, rng, tally)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"rps": tally.ok() / wall, "requests": tally.total(), "fivexx": tally.fivexx(), "wall_s": wall}


def _pct(lat: list[float]) -> tuple[float, float]:
    if not lat:
        return float("nan"), float("nan")
    a = np.asarray(lat) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


async def open_loop(
    url: str, qs: list[str], token: str, rps: float, seconds: float, ff: float, sample_s: float, on_sample
) -> Tally:
    """Poisson arrivals of route(+feedback) operations so that HTTP requests arrive at ``rps``."""
    import httpx

    total = Tally()
    window = Tally()
    op_rate = rps / (1.0 + ff)  # each operation is one route plus a feedback for a fraction ff
    rng = random.Random(12345)
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
    pending: set[asyncio.Task] = set()
    t_start = time.perf_counter()
    next_sample = t_start + sample_s
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def op() -> None:
            t = Tally()
            await one_op(client, rng.choice(qs), token, ff, rng, t)
            for tl in (total, window):
                tl.status.update(t.status)
                tl.route_lat.extend(t.route_lat)
                tl.errors.update(t.errors)

        t_next = t_start
        while (now := time.perf_counter()) < t_start + seconds:
            if now >= next_sample:
                on_sample(now - t_start, window, len(pending))
                window = Tally()
                next_sample += sample_s
            if now < t_next:
                await asyncio.sleep(min(t_next - now, max(0.0, next_sample - now)))
                continue
            task = asyncio.create_task(op())
            pending.add(task)
            task.add_done_callback(pending.discard)
            t_next += rng.expovariate(op_rate)
        if pending:
            await asyncio.gather(*pending)
        on_sample(time.perf_counter() - t_start, window, 0)
    return total


# -------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "serve_configs" / "local.yaml"))
    p.add_argument("--arms", choices=["auto", "real", "synthetic"], default="auto")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of the soak (default 10 minutes)")
    p.add_argument("--load", type=float, default=0.5, help="offered load as a fraction of the measured capacity")
    p.add_argument("--capacity-s", type=float, default=20.0, help="seconds of the closed-loop capacity run")
    p.add_argument("--concurrency", type=int, default=8, help="clients of the capacity run")
    p.add_argument("--feedback-fraction", type=float, default=0.5, help="routes followed by a feedback")
    p.add_argument("--sample-s", type=float, default=60.0, help="seconds between progress lines")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument("--smoke-test", action="store_true", help="a few seconds of each phase")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.duration, args.capacity_s, args.sample_s = 6.0, 3.0, 3.0

    from ray_router.serve.launch import RAY_ENV_DEFAULTS

    for k, v in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    token = os.environ.setdefault("RAY_ROUTER_TOKEN", secrets.token_hex(16))  # the replicas inherit it
    os.environ.setdefault("RAY_ROUTER_HMAC_KEY", secrets.token_hex(16))
    admin = os.environ.setdefault("RAY_ROUTER_ADMIN_TOKEN", secrets.token_hex(16))
    arms = args.arms
    if arms == "auto":
        arms = "real" if data_available(args.data_dir) else "synthetic"
    from ray_router.serve import launch

    load_before = os.getloadavg()
    tmp = tempfile.TemporaryDirectory(prefix="rr-soak-")
    state_dir = Path(tmp.name) / "state"
    try:
        t0 = time.perf_counter()
        url = deploy(Path(args.config), state_dir, arms, args.data_dir, args.num_cpus)
        print(f"[soak] deployed {args.config} ({arms} arms) in {time.perf_counter() - t0:.0f}s at {url}", flush=True)
        qs = queries(512, args.data_dir)
        asyncio.run(closed_loop(url, qs, token, 2, min(5.0, args.capacity_s), args.feedback_fraction))  # warm up
        cap = asyncio.run(closed_loop(url, qs, token, args.concurrency, args.capacity_s, args.feedback_fraction))
        rate = args.load * cap["rps"]
        print(
            f"[soak] capacity: {cap['rps']:.1f} req/s ({args.concurrency} clients, {cap['wall_s']:.0f}s, "
            f"{cap['fivexx']} x 5xx); soaking at {rate:.1f} req/s for {args.duration:.0f}s",
            flush=True,
        )
        procs_start = serve_processes()
        rss_start = {n: rss_mb(pid) for n, pid in procs_start.items()}
        names = sorted(procs_start)
        print("[soak]   t_s   reqs  5xx  other  route_p50_ms  route_p99_ms  inflight  " + "  ".join(names), flush=True)

        def on_sample(t: float, w: Tally, inflight: int) -> None:
            p50, p99 = _pct(w.route_lat)
            other = sum(n for (_, s), n in w.status.items() if s != 200 and not 500 <= s < 600)
            procs = serve_processes()
            rss = "  ".join(f"{rss_mb(procs[n]) or float('nan'):.0f}MB" if n in procs else "gone" for n in names)
            print(
                f"[soak] {t:5.0f} {w.total():6d} {w.fivexx():4d} {other:6d} {p50:13.1f} {p99:13.1f} {inflight:9d}  {rss}",
                flush=True,
            )

        total = asyncio.run(
            open_loop(url, qs, token, rate, args.duration, args.feedback_fraction, args.sample_s, on_sample)
        )
        procs_end = serve_processes()
        rss_end = {n: rss_mb(pid) for n, pid in procs_end.items()}
        import httpx

        post = httpx.get(f"{url}/v1/admin/status", headers={"Authorization": f"Bearer {admin}"}, timeout=60).json()
    finally:
        launch.shutdown()
        tmp.cleanup()
    load_after = os.getloadavg()
    p50, p99 = _pct(total.route_lat)
    processes = {}
    for n in sorted(set(procs_start) | set(procs_end)):
        a, b = rss_start.get(n), rss_end.get(n)
        processes[n] = {
            "pid_start": procs_start.get(n),
            "pid_end": procs_end.get(n),
            "replaced": procs_start.get(n) != procs_end.get(n),
            "rss_start_mb": a,
            "rss_end_mb": b,
            "rss_growth_pct": (100.0 * (b - a) / a) if a and b else None,
        }
    report = {
        "config": args.config,
        "arms": arms,
        "duration_s": args.duration,
        "capacity_rps": cap["rps"],
        "offered_rps": rate,
        "requests": total.total(),
        "achieved_rps": total.total() / args.duration,
        "status_counts": {f"{e} {s}": n for (e, s), n in sorted(total.status.items())},
        "fivexx": total.fivexx(),
        "fivexx_503": sum(n for (_, st), n in total.status.items() if st == 503),
        "transport_errors": dict(total.errors),
        "route_p50_ms": p50,
        "route_p99_ms": p99,
        "feedback_logged": post["posterior"]["last_seq"],
        "feedback_applied": post["posterior"]["last_applied_seq"],
        "processes": processes,
        "max_rss_growth_pct": max((v["rss_growth_pct"] or 0.0) for v in processes.values()) if processes else None,
        "loadavg_start": load_before,
        "loadavg_end": load_after,
    }
    print(
        f"\n[soak] {report['requests']} requests in {args.duration:.0f}s ({report['achieved_rps']:.1f} req/s offered "
        f"{rate:.1f}); statuses {report['status_counts']}"
    )
    print(
        f"[soak] 5xx: {report['fivexx']} (target 0; of which 503, shed load: {report['fivexx_503']}); transport errors: {report['transport_errors'] or 0}; "
        f"route p50 {p50:.1f} ms, p99 {p99:.1f} ms; feedback logged {report['feedback_logged']}, "
        f"applied {report['feedback_applied']}"
    )
    print(f"[soak] {'process':40s} {'pid':>8s} {'RSS start':>10s} {'RSS end':>10s} {'growth':>8s}")
    for n, v in processes.items():
        g = v["rss_growth_pct"]
        print(
            f"[soak] {n:40s} {v['pid_end']!s:>8s} {v['rss_start_mb'] or float('nan'):9.1f}M "
            f"{v['rss_end_mb'] or float('nan'):9.1f}M {(f'{g:+.1f}%' if g is not None else 'n/a'):>8s}"
            + ("  REPLACED" if v["replaced"] else "")
        )
    print(
        f"[soak] max RSS growth {report['max_rss_growth_pct']:+.1f}% (target <= 5%); load average "
        f"{load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end (2 cores)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
