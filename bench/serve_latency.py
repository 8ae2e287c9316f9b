"""Latency and throughput of ``POST /v1/route`` against the bare encoder (the floor), per encoder
backend, per embedder mode and per path, in one run.

    python bench/serve_latency.py                       # deploys serve_configs/local.yaml once per backend and mode
    python bench/serve_latency.py --backends torch      # one backend
    python bench/serve_latency.py --embedder-modes inline   # only the inline encoder (embedder.mode: inline)
    python bench/serve_latency.py --fast-route both     # also each deployment with service.fast_route off (FastAPI)
    python bench/serve_latency.py --url http://127.0.0.1:8000   # a service that already runs (its backend: --backends)
    python bench/serve_latency.py --smoke-test          # tiny budget (CI)

``--backends`` defaults to every value the installed ``EncoderSpec.backend`` accepts (only ``torch``
where it has no such field); ``--embedder-modes`` to ``deployment,inline``: the config is deployed
once per backend and mode with ``encoder.backend`` set, as it is (``deployment``: the Ingress calls
the Embedder deployment) or converted by :func:`ray_router.serve.inline.as_inline` (``inline``: the
Ingress encodes in-process, on the embedder's CPUs). For each backend and mode, on the same
RouterBench queries (their query text, mean about 260 characters):

- one client, paired: for each query, a bare encode with that backend in this process (on as many
  threads as one embedder replica has CPUs: ``--encoder-threads``, default the config's
  ``embedder.num_cpus``) and one ``/v1/route`` over real HTTP through each path, in an order that
  rotates with the query, so machine noise falls on all alike: p50/p99 of each. The routes are timed
  with the standard library's ``http.client`` on a keep-alive connection (:class:`PlainClient`):
  httpx spends about a millisecond of CPU per request, which a 10 ms route would carry as if it
  were the service's; one more route per query through the first path with httpx is printed beside
  it, so the client's share stays visible. Paths: ``default``,
  the URL ``ray-router serve`` prints (Serve's HAProxy on the config's port, or Serve's Python proxy
  where ``RAY_SERVE_ENABLE_HA_PROXY=0``), and ``replica``, the Ingress replica's own HTTP server
  (Serve's direct ingress, no hop: what the default path's hop is measured against);
- the throughput floors of the bare encoder: one query at a time (q/s of the paired run), and
  windows of the embedder's ``max_batch_size``, plain (one call per window) and length-aware
  (``ray_router/serve/batching.py``, what the embedder runs), before the concurrent runs and after
  each of their slices. The *floor* is the better of one-at-a-time and length-aware batched;
- ``/v1/route`` at ``--concurrency`` clients for ``--duration`` seconds through each path, in
  four slices, each between two batched floors: req/s, the *paired* ratio (median over slices of
  req/s / the floor around the slice) and the *strict* one (req/s / the run's best floor); for an
  inline encoder also its counters over the slices (``/v1/admin/status``: the share of the time it
  was encoding, ms per query, the mean window), which say whether the service left it idle.

It prints, per backend, mode and path, route p50 / bare encode p50 of the same backend and req/s at
16 clients / the floor of the same backend, the default path's hop (its p50 / the replica's), and the
issue's targets as PASS/FAIL lines: route p50 on the default URL <= 0.6x the float32 torch bare
encode (torch's bare encode measured in the same run: the lowest p50 of its torch runs, the stricter);
route p50 <= 1.2x the bare encode of the same backend; 16-client req/s >= 0.9x the floor (paired).
On a shared machine, compare ratios within one run, not absolute figures across runs: on this VM
the same encode loop ran 113-185 q/s a minute apart (2026-12-02).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import sys
import tempfile
import time
import typing
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

TARGET_DEFAULT_VS_TORCH = 0.6  # route p50 on the default URL / float32 torch bare encode p50
TARGET_ROUTE_VS_ENCODE = 1.2  # route p50 / bare encode p50, same backend
TARGET_QPS_VS_FLOOR = 0.9  # req/s at 16 clients / the better floor, same backend
TARGET_HOP = 1.10  # default-path p50 / replica-path p50 (the hop costs <= 10% of a route)


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


def spec_backends() -> list[str] | None:
    """The backends the installed ``EncoderSpec.backend`` accepts, or None when it has no such field."""
    from ray_router.embeddings.spec import EncoderSpec

    field = EncoderSpec.model_fields.get("backend")
    if field is None:
        return None
    return [str(v) for v in typing.get_args(field.annotation)] or [str(field.default)]


def bare_encoder(encoder_args: dict, backend: str | None):
    """The encoder an embedder replica builds from the same ``encoder`` args, on the CPU."""
    from ray_router.embeddings import get_encoder
    from ray_router.embeddings.spec import EncoderSpec

    spec = EncoderSpec.model_validate({**encoder_args, **({"backend": backend} if backend else {}), "device": "cpu"})
    options = getattr(spec, "encoder_options", None)
    opts = options() if options else ({} if spec.max_seq_length is None else {"max_seq_length": spec.max_seq_length})
    return get_encoder(spec.name, cache_dir=False, device="cpu", **opts)


def batched_floors(enc, queries: list[str], batch_size: int) -> dict:
    """Batched q/s over windows of ``batch_size``: plain (one call per window) and length-aware."""
    from ray_router.serve.batching import LengthAwareEncoder

    t0 = time.perf_counter()
    for i in range(0, len(queries), batch_size):
        enc.encode(queries[i : i + batch_size], batch_size)
    plain = time.perf_counter() - t0
    aware = LengthAwareEncoder(enc)
    aware.calibrate()
    t0 = time.perf_counter()
    for i in range(0, len(queries), batch_size):
        aware.encode(queries[i : i + batch_size])
    length_aware = time.perf_counter() - t0
    return {"encoder_batched_plain_qps": len(queries) / plain, "encoder_batched_qps": len(queries) / length_aware}


def server_timing(header: str) -> dict[str, float]:
    """``{"embed": ms, "encode": ms, ...}`` of a ``Server-Timing`` header."""
    out = {}
    for part in header.split(","):
        fields = dict(f.strip().partition("=")[::2] for f in part.split(";")[1:])
        name = part.split(";")[0].strip()
        if name and "dur" in fields:
            out[name] = float(fields["dur"])
    return out


class PlainClient:
    """One keep-alive HTTP/1.1 connection through the standard library (``http.client``), for the
    1-client latencies: the request goes out in one ``send`` (headers and body together) and the
    answer is read whole. httpx spends about a millisecond of CPU per request on its own machinery
    (bench/httpload.py), which a 10 ms route would carry as if it were the service's; the 1-client
    run therefore times routes with this client and reports httpx's figure beside it."""

    def __init__(self, base_url: str, timeout_s: float = 120.0):
        import http.client
        import socket
        from urllib.parse import urlsplit

        u = urlsplit(base_url)
        self.prefix = u.path.rstrip("/")
        self.conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port or 80, timeout=timeout_s)
        self.conn.connect()
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def post(self, path: str, payload: dict) -> tuple[int, str]:
        """``(status, Server-Timing header)``; the body is read (and dropped)."""
        body = json.dumps(payload).encode()
        self.conn.request(
            "POST", self.prefix + path, body, {"Content-Type": "application/json", "Content-Length": str(len(body))}
        )
        r = self.conn.getresponse()
        r.read()
        return r.status, r.getheader("server-timing") or ""

    def close(self) -> None:
        self.conn.close()


def paired_single(
    enc, paths: dict[str, str], queries: list[str], timings: dict[str, list[dict[str, float]]] | None = None
) -> tuple[list[float], dict[str, list[float]], list[float]]:
    """One client: for each query, a bare encode in this process, one ``/v1/route`` through every
    path (:class:`PlainClient`) and one more through the first path with httpx, in an order that
    rotates with the query, so machine noise falls on all of them alike. Seconds per call: the
    encodes, per path the 200 answers (a non-200 is counted as NaN), and httpx's answers.
    ``timings``: filled per path with each 200 answer's Server-Timing (ms)."""
    import httpx

    clients = {name: PlainClient(url) for name, url in paths.items()}
    first = next(iter(paths.values()))
    hx = httpx.Client(base_url=first, timeout=120)
    steps = ["encode", *paths, "<httpx>"]
    single: list[float] = []
    routes: dict[str, list[float]] = {name: [] for name in paths}
    via_httpx: list[float] = []
    try:
        for i, q in enumerate(queries):
            for step in steps[i % len(steps) :] + steps[: i % len(steps)]:
                t0 = time.perf_counter()
                if step == "encode":
                    enc.encode([q])
                    single.append(time.perf_counter() - t0)
                elif step == "<httpx>":
                    r = hx.post("/v1/route", json={"query": q})
                    via_httpx.append(time.perf_counter() - t0 if r.status_code == 200 else float("nan"))
                else:
                    status, st = clients[step].post("/v1/route", {"query": q})
                    routes[step].append(time.perf_counter() - t0 if status == 200 else float("nan"))
                    if timings is not None and status == 200:
                        timings.setdefault(step, []).append(server_timing(st))
    finally:
        for c in clients.values():
            c.close()
        hx.close()
    return single, routes, via_httpx


async def _load(url: str, queries: list[str], concurrency: int, duration_s: float, max_requests: int) -> dict:
    # the lean client (bench/httpload.py): it shares the service's cores, so it should cost little
    from httpload import LeanClient

    lat: list[float] = []
    errors = 0
    counter = {"i": 0}
    async with LeanClient(url, max_connections=concurrency, timeout_s=120) as client:
        deadline = time.perf_counter() + duration_s

        async def worker():
            nonlocal errors
            while time.perf_counter() < deadline and counter["i"] < max_requests:
                q = queries[counter["i"] % len(queries)]
                counter["i"] += 1
                t0 = time.perf_counter()
                r = await client.post("/v1/route", {"query": q})
                if r.status == 200:
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


SLICES = 4  # the concurrent runs are cut into this many slices, each bracketed by two batched floors


def embedder_counters(url: str) -> dict | None:
    """The inline encoder's counters (windows, queries, busy seconds) from ``/v1/admin/status``, or
    None (no admin token in ``$RAY_ROUTER_ADMIN_TOKEN``, or an ``Embedder`` deployment, which keeps none)."""
    import urllib.request

    token = os.environ.get("RAY_ROUTER_ADMIN_TOKEN")
    if not token:
        return None
    try:
        req = urllib.request.Request(url + "/v1/admin/status", headers={"authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            emb = json.load(r).get("embedder") or {}
    except Exception:  # noqa: BLE001 - the counters are a diagnosis, never a reason to lose the run
        return None
    return {k: emb[k] for k in ("windows", "queries", "busy_s", "windows_on_loop")} if "busy_s" in emb else None


def utilisation(before: dict | None, after: dict | None, wall_s: float) -> dict[str, float]:
    """What the inline encoder did between two readings: the share of the wall time it was encoding,
    its seconds per query, the mean window."""
    if before is None or after is None or after["queries"] <= before["queries"]:
        return {}
    q, w = after["queries"] - before["queries"], after["windows"] - before["windows"]
    busy = after["busy_s"] - before["busy_s"]
    return {"encoder_busy": busy / wall_s, "encoder_ms_per_query": busy / q * 1000, "mean_window": q / max(w, 1)}


def measure_backend(
    enc, paths: dict[str, str], queries: list[str], n: int, batch: int, c: int, duration: float, smoke: bool
) -> dict:
    """The floors and every path's routes, for one deployed backend.

    The concurrent runs are cut into :data:`SLICES` slices (each path ``duration / SLICES`` seconds
    per slice) and a batched floor is measured before the first slice and after each one, so every
    slice's req/s has a floor measured just before and just after it: the *paired* ratio is the
    median over slices of req/s / the better of (one at a time, the mean of its two batched floors).
    On this VM the same encode loop runs 113-185 q/s from one minute to the next, so a floor taken
    minutes away from the load measures the machine's drift as much as the service. The *strict*
    ratio (req/s over all slices / the best floor of the run) is reported beside it."""
    enc.encode(queries[:4])  # load + warm up
    for url in paths.values():
        measure_route(url, queries, 1, 60.0, 4 if smoke else 20)  # warm up (and the connection)
    timings: dict[str, list[dict[str, float]]] = {}
    single, routes, via_httpx = paired_single(enc, paths, queries[:n], timings)
    p50_s = float(np.median(single))
    http = {name: http_floor(url, p50_s, 20 if smoke else 200) for name, url in paths.items()}
    single_qps = len(single) / sum(single)
    slices = 1 if smoke else SLICES
    batched = [batched_floors(enc, queries[:n], batch)]  # the service up and idle
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    for _ in range(slices):
        for name, url in paths.items():
            before, t0 = embedder_counters(url), time.perf_counter()
            run = measure_route(url, queries, c, duration / slices, 10**9)
            run.update(utilisation(before, embedder_counters(url), time.perf_counter() - t0))
            runs[name].append(run)
        batched.append(batched_floors(enc, queries[:n], batch))
    cc: dict[str, dict] = {}
    for name, rs in runs.items():
        done = sum(r["n"] for r in rs)
        wall = sum(r["n"] / r["qps"] for r in rs if r["qps"] > 0)
        paired = []
        for k, r in enumerate(rs):
            floor_k = max(single_qps, (batched[k]["encoder_batched_qps"] + batched[k + 1]["encoder_batched_qps"]) / 2)
            paired.append(r["qps"] / floor_k)
        lat = [r["p50_ms"] for r in rs if r["p50_ms"] == r["p50_ms"]]
        cc[name] = {
            "qps": done / wall if wall else 0.0,
            "p50_ms": float(np.median(lat)) if lat else float("nan"),
            "p99_ms": max((r["p99_ms"] for r in rs if r["p99_ms"] == r["p99_ms"]), default=float("nan")),
            "errors": sum(r["errors"] for r in rs),
            "n": done,
            "paired_ratios": paired,
            "slices": rs,
        }
    p50, p99 = percentiles(single)
    floor = {
        "encoder_single_p50_ms": p50,
        "encoder_single_p99_ms": p99,
        "encoder_single_qps": single_qps,
        # the fastest of the floors around the slices: the strict floor, so noise cannot flatter that ratio
        **{k: max(f[k] for f in batched) for k in ("encoder_batched_plain_qps", "encoder_batched_qps")},
        "batched_runs": batched,
    }
    floor["floor_qps"] = max(floor["encoder_single_qps"], floor["encoder_batched_qps"])
    per_path = {}
    hx_ok = [x for x in via_httpx if x == x]
    for name, lat in routes.items():
        ok = [x for x in lat if x == x]
        r50, r99 = percentiles(ok) if ok else (float("nan"), float("nan"))
        per_path[name] = {
            "url": paths[name],
            "route_c1_p50_ms": r50,
            "route_c1_p99_ms": r99,
            "route_cc_p50_ms": cc[name]["p50_ms"],
            "route_cc_p99_ms": cc[name]["p99_ms"],
            "route_cc_qps": cc[name]["qps"],
            "ratio_p50_c1": r50 / p50,
            **http[name],
            # the route less the bare encode and less the HTTP floor after an idle gap: the handler's own
            # work beyond the encode (the choice, the thread hand-off, the answer)
            "route_own_ms": r50 - p50 - http[name]["http_floor_after_idle_p50_ms"],
            # the first path again, timed with httpx as the client (its own CPU included)
            **({"route_c1_httpx_p50_ms": percentiles(hx_ok)[0]} if name == next(iter(routes)) and hx_ok else {}),
            "ratio_qps_cc": float(np.median(cc[name]["paired_ratios"])),
            "ratio_qps_cc_paired": cc[name]["paired_ratios"],
            "ratio_qps_cc_strict": cc[name]["qps"] / floor["floor_qps"],
            # the inline encoder during the concurrent slices (busy share, ms per query, mean window)
            **{
                f"cc_{k}": float(np.median([r[k] for r in cc[name]["slices"] if k in r]))
                for k in ("encoder_busy", "encoder_ms_per_query", "mean_window")
                if any(k in r for r in cc[name]["slices"])
            },
            "errors": (len(lat) - len(ok)) + cc[name]["errors"],
            "n_c1": len(ok),
            "n_cc": cc[name]["n"],
            # medians of the 1-client answers' Server-Timing parts (ms): embed (the embedder call or the
            # inline window), encode (inside it), choose, app (the handler)
            "server_timing_p50_ms": {
                k: float(np.median([t[k] for t in timings.get(name, []) if k in t]))
                for k in ("embed", "encode", "choose", "app")
                if any(k in t for t in timings.get(name, []))
            },
        }
    return {"floor": floor, "paths": per_path}


MODES = ("deployment", "inline")


def _deploy(
    cfg: dict, state_dir: str, backend: str | None, mode: str = "deployment", fast_route: bool | None = None
) -> dict[str, str]:
    from ray_router.serve import launch
    from ray_router.serve.inline import as_inline

    args: dict = {"state": {"dir": state_dir}}
    if fast_route is not None:
        args["service"] = {"fast_route": fast_route}
    if backend is not None:
        args["encoder"] = {"backend": backend}
    if mode == "inline":
        cfg = as_inline(cfg)
    url = launch.deploy(launch.with_overrides(cfg, args=args), timeout_s=900)
    direct = launch.direct_urls()
    return {"default": url, **({"replica": direct[0]} if direct else {})}


def _free_port() -> int:
    """A free port below Linux's ephemeral range (32768+) and above Ray's worker ports (up to 19999),
    away from Serve's direct-ingress range (30000-31000): HAProxy binds it after Ray's processes have
    opened many outgoing connections, any of which may take an ephemeral port picked earlier."""
    import random
    import socket

    for port in random.Random().sample(range(20000, 29999), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-29999")


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def http_floor(url: str, gap_s: float, n: int) -> dict[str, float]:
    """The HTTP path's own cost on this machine: p50 (ms) of a request the service answers before
    any encode (``POST /v1/route`` with ``{}``, a 422 from its body check), ``n`` back to back and
    ``n`` each after an idle ``gap_s`` (sleep). The second is what a route pays for its hops once
    the processes on them have slept through an encode: on a VM whose idle vCPUs halt (this
    machine's ``cpuidle`` is haltpoll with polling off) every wake-up of the client, HAProxy and the
    replica costs more after a pause than in a burst."""
    client = PlainClient(url)
    out: dict[str, float] = {}
    try:
        for label, gap in (("back_to_back", 0.0), ("after_idle", gap_s)):
            lat = []
            for _ in range(n):
                if gap:
                    time.sleep(gap)
                t0 = time.perf_counter()
                status, _ = client.post("/v1/route", {})
                if status == 422:
                    lat.append(time.perf_counter() - t0)
            out[f"http_floor_{label}_p50_ms"] = percentiles(lat)[0] if lat else float("nan")
    finally:
        client.close()
    return out


def report_lines(results: dict, c: int) -> list[str]:
    out = []
    head = f"{'backend':10s} {'mode':11s}{'path':8s}{'encode p50':>11s}{'p99':>8s}{'route p50':>11s}{'p99':>8s}"
    head += f"{'route/enc':>10s}{f'req/s@{c}':>10s}{'floor q/s':>10s}{'paired':>7s}{'strict':>7s}"
    out.append(head)
    for r in results.values():
        f = r["floor"]
        for name, p in r["paths"].items():
            out.append(
                f"{r['backend']:10s} {r['mode']:11s}{name:8s}{f['encoder_single_p50_ms']:11.1f}"
                f"{f['encoder_single_p99_ms']:8.1f}"
                f"{p['route_c1_p50_ms']:11.1f}{p['route_c1_p99_ms']:8.1f}{p['ratio_p50_c1']:10.2f}"
                f"{p['route_cc_qps']:10.1f}{f['floor_qps']:10.1f}{p['ratio_qps_cc']:7.2f}{p['ratio_qps_cc_strict']:7.2f}"
                + (f"  ({p['errors']} non-200)" if p["errors"] else "")
            )
        first = next(iter(r["paths"].values()))
        if "route_c1_httpx_p50_ms" in first:
            out.append(
                f"{'':10s} 1-client route p50 with httpx as the client (first path): "
                f"{first['route_c1_httpx_p50_ms']:.1f} ms against {first['route_c1_p50_ms']:.1f} ms with http.client"
            )
        for name, p in r["paths"].items():
            if "http_floor_after_idle_p50_ms" in p:
                out.append(
                    f"{'':10s} {name}: HTTP floor (a 422 before any encode) p50 {p['http_floor_back_to_back_p50_ms']:.2f} ms "
                    f"back to back, {p['http_floor_after_idle_p50_ms']:.2f} ms after an idle gap of the encode p50; "
                    f"route - encode - that = {p['route_own_ms']:.2f} ms"
                )
        for name, p in r["paths"].items():
            line = f"{'':10s} {name} at {c} clients: req/s / the floor around it, per slice " + " ".join(
                f"{x:.2f}" for x in p["ratio_qps_cc_paired"]
            )
            if "cc_encoder_busy" in p:
                line += (
                    f"; the inline encoder busy {p['cc_encoder_busy']:.0%} of the time, "
                    f"{p['cc_encoder_ms_per_query']:.2f} ms per query, windows of {p['cc_mean_window']:.1f}"
                )
            out.append(line)
        st = r["paths"].get("default", next(iter(r["paths"].values())))["server_timing_p50_ms"]
        if st:
            out.append(
                f"{'':10s} Server-Timing p50 (ms, 1 client, default path): "
                + ", ".join(f"{k} {v:.2f}" for k, v in st.items())
            )
        out.append(
            f"{'':10s} floors (q/s): one at a time {f['encoder_single_qps']:.1f}, batched plain "
            f"{f['encoder_batched_plain_qps']:.1f}, batched length-aware {f['encoder_batched_qps']:.1f} (before "
            "the slices and after each: "
            + " / ".join(f"{x['encoder_batched_qps']:.1f}" for x in f["batched_runs"])
            + ")"
        )
    return out


def torch_encode_p50(results: dict) -> float | None:
    """The float32 torch bare encode p50 of this run: the lowest of its torch runs (one per mode, the
    same encode in this process measured at different times), so noise cannot flatter the ratio."""
    runs = [r["floor"]["encoder_single_p50_ms"] for r in results.values() if r["backend"] == "torch"]
    return min(runs) if runs else None


def target_lines(results: dict) -> list[str]:
    out = []
    for label, r in results.items():  # "<backend> <mode>"
        torch_p50 = torch_encode_p50(results)
        paths = r["paths"]
        d = paths.get("default") or next(iter(paths.values()))
        if torch_p50 is not None:
            v = d["route_c1_p50_ms"] / torch_p50
            out.append(
                f"{_verdict(v <= TARGET_DEFAULT_VS_TORCH)}  {label}: route p50 on the default URL / float32 torch "
                f"bare encode p50 = {v:.2f} (target <= {TARGET_DEFAULT_VS_TORCH})"
            )
        for name, p in paths.items():
            out.append(
                f"{_verdict(p['ratio_p50_c1'] <= TARGET_ROUTE_VS_ENCODE)}  {label} via {name}: route p50 / bare "
                f"encode p50 = {p['ratio_p50_c1']:.2f} (target <= {TARGET_ROUTE_VS_ENCODE})"
            )
            out.append(
                f"{_verdict(p['ratio_qps_cc'] >= TARGET_QPS_VS_FLOOR)}  {label} via {name}: req/s / better floor "
                f"= {p['ratio_qps_cc']:.2f}, paired (median over slices; strict, vs the run's best floor: "
                f"{p['ratio_qps_cc_strict']:.2f}) (target >= {TARGET_QPS_VS_FLOOR})"
            )
        if "default" in paths and "replica" in paths:
            hop = paths["default"]["route_c1_p50_ms"] / paths["replica"]["route_c1_p50_ms"]
            out.append(
                f"{_verdict(hop <= TARGET_HOP)}  {label}: the default URL's hop, route p50 default / replica "
                f"= {hop:.2f} (target <= {TARGET_HOP:.2f})"
            )
    if torch_encode_p50(results) is None:
        out.append("n/a   route p50 on the default URL / float32 torch bare encode: torch was not measured")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "serve_configs" / "local.yaml"))
    p.add_argument("--url", default=None, help="an already running service (else the config is deployed here)")
    p.add_argument(
        "--backends", default=None, help="comma-separated encoder backends (default: all EncoderSpec accepts)"
    )
    p.add_argument(
        "--embedder-modes",
        default=",".join(MODES),
        help="comma-separated embedder modes to deploy, each its own rows: deployment (the Embedder deployment "
        "behind a handle), inline (the Ingress encodes in-process); default both",
    )
    p.add_argument(
        "--fast-route",
        choices=("config", "off", "both"),
        default="config",
        help="service.fast_route: as the config has it (default), off (FastAPI answers /v1/route), or both "
        "(each backend and mode deployed twice; the rows with it off are marked '/fastapi')",
    )
    p.add_argument("--n-queries", type=int, default=300, help="queries for the encoder floor and the 1-client run")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of the concurrent run")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument(
        "--encoder-threads", type=int, default=None, help="torch threads of the floor (default: embedder.num_cpus)"
    )
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument("--smoke-test", action="store_true", help="tiny budget: checks that the benchmark runs")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from ray_router.serve import launch

    cfg = launch.load_serve_config(args.config)
    app_args = launch.our_apps(cfg)[0]["args"]
    threads = args.encoder_threads or max(1, round(app_args.get("embedder", {}).get("num_cpus", 1)))
    batch = int(app_args.get("embedder", {}).get("max_batch_size", 32))
    encoder_args = dict(app_args.get("encoder") or {})
    accepted = spec_backends()
    if args.backends:
        backends: list[str | None] = [b.strip() for b in args.backends.split(",") if b.strip()]
        unknown = [b for b in backends if b not in (accepted or ["torch"])]
        if unknown:
            p.error(f"--backends: {unknown} not accepted by this EncoderSpec (accepts {accepted or ['torch']})")
    else:
        backends = list(accepted) if accepted else ["torch"]
    modes = [m.strip() for m in args.embedder_modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--embedder-modes: {modes} (each one of {list(MODES)})")
    if args.url is not None:
        backends = backends[:1]  # the running service has one backend
        modes = ["given"]  # and the mode it was deployed with
    n = 8 if args.smoke_test else args.n_queries
    duration = 1.0 if args.smoke_test else args.duration
    c = args.concurrency
    queries = load_queries(max(n, 64), max_chars=4000, data_dir=args.data_dir)
    torch.set_num_threads(max(1, threads))  # the floor's threads (the onnx sessions follow torch's)

    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    started_here = args.url is None
    tmp = tempfile.TemporaryDirectory(prefix="rr-bench-state-") if started_here else None
    try:
        if started_here:
            # an admin token of our own, so the run can read the inline encoder's counters
            os.environ.setdefault("RAY_ROUTER_ADMIN_TOKEN", secrets.token_urlsafe(32))
            launch.init_ray(num_cpus=2)
            cfg = launch.with_overrides(cfg, port=_free_port())
        fast: list[bool | None] = {"config": [None], "off": [False], "both": [None, False]}[args.fast_route]
        for backend, base_mode, fr in [(b, m, f) for b in backends for m in modes for f in fast]:
            mode = base_mode if fr is None else f"{base_mode}/fastapi"
            name = f"{backend} {mode}"
            try:
                if started_here:
                    assert tmp is not None
                    state = str(Path(tmp.name) / f"{backend}-{mode.replace('/', '-')}")
                    paths = _deploy(cfg, state, backend if accepted else None, base_mode, fr)
                else:
                    paths = {"given": args.url}
                enc = bare_encoder(encoder_args, backend if accepted else None)
                print(f"[bench] {name}: measuring {', '.join(f'{k} {v}' for k, v in paths.items())}", file=sys.stderr)
                r = measure_backend(enc, paths, queries, n, batch, c, duration, args.smoke_test)
                results[name] = {"backend": str(backend), "mode": mode, **r}
            except Exception as e:  # noqa: BLE001 - one backend failing must not lose the others' figures
                failed[name] = f"{type(e).__name__}: {e}"
                print(f"[bench] {name}: FAILED {failed[name]}", file=sys.stderr)
            finally:
                if started_here:
                    from ray import serve

                    with contextlib.suppress(Exception):
                        serve.delete(launch.APP_NAME, _blocking=True)
    finally:
        if started_here:
            launch.shutdown()
        if tmp is not None:
            tmp.cleanup()

    if not results:
        raise SystemExit(f"no backend could be measured: {failed}")
    first = next(iter(results.values()))
    head_path = first["paths"].get("default") or next(iter(first["paths"].values()))
    report = {
        # headline: the first backend's default path (the keys older callers read)
        **{k: v for k, v in first["floor"].items() if k != "batched_runs"},
        "route_c1_p50_ms": head_path["route_c1_p50_ms"],
        "route_c16_qps": head_path["route_cc_qps"],
        "ratio_p50_c1": head_path["ratio_p50_c1"],
        "ratio_qps_c16": head_path["ratio_qps_cc"],
        "backends": results,
        "failed": failed,
        "concurrency": c,
        "cpus": os.cpu_count(),
        "encoder_threads": threads,
        "batch": batch,
        "haproxy": launch.haproxy_on(),
    }
    mean_chars = float(np.mean([len(q) for q in queries[:n]]))
    proxy = "HAProxy" if report["haproxy"] else "Serve's Python proxy"
    print(
        f"{n} RouterBench queries (mean {mean_chars:.0f} chars) sequentially, then {duration:g}s at {c} clients, per "
        f"backend, embedder mode and path (default = the printed URL, {proxy}; replica = the Ingress replica's own server); bare "
        f"encoder in this process on {threads} thread(s), windows of {batch}; {report['cpus']} CPUs; times in ms"
    )
    for line in report_lines(results, c) + target_lines(results):
        print(line)
    for name, why in failed.items():
        print(f"FAIL  {name}: not measured: {why}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
