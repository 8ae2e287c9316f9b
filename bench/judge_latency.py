"""User-facing latency of chat requests with the judge's shadow duels at a 100% sampling rate vs
the judge off, in one run.

    python bench/judge_latency.py                  # 4 phases (off, on, off, on) x 200 requests
    python bench/judge_latency.py --requests 400 --rounds 3
    python bench/judge_latency.py --smoke-test     # tiny budget (CI)

A local Ray (2 CPUs) runs ``serve_configs/local.yaml`` with four stub arms (``tests/openai_stub.py``
on loopback: real OpenAI-protocol HTTP, each answer after ``--arm-latency-ms``) and a synthetic arm
table (hash encoder: no data needed). The app is deployed once per phase, alternately without a
``judge:`` section and with one at ``sample_rate: 1.0`` (a stub judge answering after
``--judge-latency-ms``), each phase on a fresh state directory, so machine drift falls on both
alike. In each phase one client sends ``--requests`` sequential single-mode chat requests (every
``--stream-every``-th streamed, read to its end) after a warm-up; the latency is what the client
waits for its whole answer. With the judge on, every request starts a shadow duel (a second arm's
answer and two judge calls, then a durable verdict) once the answer is out; the phase waits for
them to end and reports them (``/v1/stats`` → ``judge``), so a phase whose duels did not run
cannot pass.

It prints p50/p99 per phase and, pooled over the phases of each kind, p50(on) / p50(off) for the
non-streamed requests, the streamed ones and all of them, and the issue's target as a PASS/FAIL
line: p50 with the judge on within 5% of the judge off (all requests). On a shared machine,
compare ratios within one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET = 1.05  # p50 with the judge on / p50 with it off
ARMS = {"poor": 0.3, "fair": 0.5, "good": 0.7, "best": 0.9}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_config(
    port: int, state_dir: Path, table: Path, arms_url: str, judge_url: str | None, refresh_s: float | None
) -> dict[str, Any]:
    from ray_router.serve import launch

    cfg = launch.load_serve_config(REPO / "serve_configs" / "local.yaml")
    app = launch.our_apps(cfg)[0]
    app["args"] = {
        **app["args"],
        "arm_embeddings": {"file": str(table)},
        "encoder": {"name": "hash", "device": "auto"},
        "arms": [{"id": a, "price_usd": 0.001, "upstream": {"base_url": arms_url, "model": a}} for a in ARMS],
    }
    args: dict[str, Any] = {
        "state": {"dir": str(state_dir), **({} if refresh_s is None else {"refresh_min_interval_s": refresh_s})},
        "policy": {"config": {"offline_prior": "none", "feature_map": "hadamard_bias"}},
        "auth": {
            "clients": [{"name": "default", "key_env": "RAY_ROUTER_CLIENT_KEY", "rate_per_s": 1e4, "burst": 10**4}]
        },
    }
    if judge_url is not None:
        args["judge"] = {"upstream": {"base_url": judge_url, "model": "judge"}, "sample_rate": 1.0, "timeout_s": 30}
    return launch.with_overrides(cfg, port=port, args=args)


def chat(client, text: str, stream: bool) -> float:
    """Seconds until the client has the whole answer."""
    body = {"model": "router", "messages": [{"role": "user", "content": text}], "router": {"mode": "single"}}
    t0 = time.perf_counter()
    if stream:
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            lines = list(r.iter_lines())
        seconds = time.perf_counter() - t0
        if r.status_code != 200 or "data: [DONE]" not in lines:
            raise RuntimeError(f"stream failed: {r.status_code} {lines[-3:]}")
        return seconds
    r = client.post("/v1/chat/completions", json=body)
    seconds = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"chat failed: {r.status_code} {r.text[:300]}")
    return seconds


def run_phase(url: str, state_dir: Path, n: int, warmup: int, stream_every: int, judged: bool) -> dict[str, Any]:
    import httpx

    key = (state_dir / "secrets" / "client_default").read_text().strip()
    plain: list[float] = []
    streamed: list[float] = []
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as client:
        for i in range(warmup + n):
            stream = stream_every > 0 and i % stream_every == stream_every - 1
            s = chat(client, f"[general] benchmark question {i}: how do I reverse a list in Python?", stream)
            if i >= warmup:
                (streamed if stream else plain).append(s)
        judge: dict[str, Any] | None = None
        if judged:  # the duels must have run, or the comparison means nothing
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                judge = client.get("/v1/stats").json()["judge"]
                if judge["inflight"] == 0 and sum(judge["duels"].values()) >= warmup + n:
                    break
                time.sleep(0.2)
    return {"plain": plain, "streamed": streamed, "judge": judge}


def p50_99(samples: list[float]) -> tuple[float, float]:
    if not samples:
        return float("nan"), float("nan")
    a = np.asarray(samples) * 1000.0
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200, help="measured requests per phase")
    ap.add_argument("--warmup", type=int, default=20, help="unmeasured requests at the start of each phase")
    ap.add_argument("--rounds", type=int, default=2, help="pairs of phases (off, on)")
    ap.add_argument("--stream-every", type=int, default=5, help="every k-th request is streamed (0: none)")
    ap.add_argument("--arm-latency-ms", type=float, default=40.0, help="each stub arm answers after this")
    ap.add_argument("--judge-latency-ms", type=float, default=40.0, help="the stub judge answers after this")
    ap.add_argument(
        "--refresh-interval-s",
        type=float,
        default=None,
        help="state.refresh_min_interval_s (default: the config's); larger batches the verdicts into fewer SGLD refreshes",
    )
    ap.add_argument("--smoke-test", action="store_true", help="tiny budget: 1 round of 20 requests")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args(argv)
    if a.smoke_test:
        a.requests, a.warmup, a.rounds = 20, 5, 1

    from ray_router.serve.launch import RAY_ENV_DEFAULTS

    for k, v in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    for k in ("RAY_ROUTER_TOKEN", "RAY_ROUTER_HMAC_KEY", "RAY_ROUTER_ADMIN_TOKEN"):
        os.environ.setdefault(k, secrets.token_hex(16))  # the replicas inherit them

    from ray_router.serve import launch
    from tests.openai_stub import StubJudge, StubModel, StubServer
    from tests.serve.helpers import write_synthetic_arm_table

    lat = a.arm_latency_ms / 1000.0
    arms = StubServer({m: StubModel(m, quality=q, latency_s=lat, ttft_s=lat) for m, q in ARMS.items()}, seed=1)
    judge = StubServer(judge=StubJudge("judge", strength=ARMS, accuracy=0.8, latency_s=a.judge_latency_ms / 1000.0))
    port = free_port()
    phases: list[dict[str, Any]] = []
    with arms, judge, tempfile.TemporaryDirectory(prefix="judge-latency-") as tmp:
        table = write_synthetic_arm_table(Path(tmp), list(ARMS), "hash", seed=0)
        launch.init_ray(num_cpus=2)
        try:
            for r in range(a.rounds):
                for judged in (False, True):
                    state = Path(tmp) / f"state-{r}-{'on' if judged else 'off'}"
                    cfg = app_config(
                        port, state, table, arms.base_url, judge.base_url if judged else None, a.refresh_interval_s
                    )
                    url = launch.deploy(cfg, timeout_s=600)
                    out = run_phase(url, state, a.requests, a.warmup, a.stream_every, judged)
                    out["judged"], out["round"] = judged, r
                    phases.append(out)
                    p50, p99 = p50_99(out["plain"] + out["streamed"])
                    extra = ""
                    if judged:
                        j = out["judge"] or {}
                        extra = f"  duels {j.get('duels')}  judge calls {j.get('calls')}"
                    print(
                        f"round {r} judge {'on ' if judged else 'off'}: p50 {p50:.2f} ms  p99 {p99:.2f} ms{extra}",
                        flush=True,
                    )
        finally:
            launch.shutdown()

    def pooled(judged: bool, kind: str) -> list[float]:
        return [
            s
            for p in phases
            if p["judged"] == judged
            for s in (p["plain"] + p["streamed"] if kind == "all" else p[kind])
        ]

    figures: dict[str, Any] = {}
    for kind in ("plain", "streamed", "all"):
        off, on = p50_99(pooled(False, kind)), p50_99(pooled(True, kind))
        figures[kind] = {"off_p50_ms": off[0], "on_p50_ms": on[0], "off_p99_ms": off[1], "on_p99_ms": on[1]}
        figures[kind]["ratio_p50"] = on[0] / off[0] if off[0] else float("nan")
        print(
            f"{kind:>8}: p50 off {off[0]:.2f} ms, on {on[0]:.2f} ms, ratio {figures[kind]['ratio_p50']:.3f}  "
            f"(p99 off {off[1]:.2f}, on {on[1]:.2f})"
        )
    verdicts = sum(p["judge"]["duels"]["verdict"] for p in phases if p["judged"] and p["judge"])
    expected = sum(a.requests + a.warmup for p in phases if p["judged"])
    ran = verdicts == expected
    ratio = figures["all"]["ratio_p50"]
    ok = ran and ratio <= TARGET
    print(f"shadow duels with a verdict: {verdicts} of {expected} judged requests")
    print(f"{'PASS' if ok else 'FAIL'}: p50 with the judge on / off = {ratio:.3f} (target <= {TARGET})")
    if a.json:
        a.json.write_text(json.dumps({"figures": figures, "verdicts": verdicts, "expected": expected}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
