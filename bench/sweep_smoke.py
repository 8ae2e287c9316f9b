"""How long the sweep's smoke test and its fail-fast check take (speed targets that
tests/tune/test_sweep_ray.py checks only for behaviour, never by the clock).

- ``ray-router tune tune_jobs/paper_sweep.yaml --smoke-test`` on a capped local Ray (2 CPUs, 128 MiB
  object store), real encoder and CCFT: target about 120 s on 2 idle cores (CI);
- a sweep whose trial asks for more CPUs than the cluster has: the one-line error before any trial
  starts; target under 100 s (it is mostly Ray's start).

Prints the wall time of each, its target and their ratio (below 1 meets it).

    RAY_ROUTER_DATA_DIR=../shared/data .venv/bin/python bench/sweep_smoke.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "ray_router.cli", "tune"]
RAY = ["--num-cpus", "2", "--object-store-mb", "128"]


def _timed(args: list[str], env: dict, expect_rc: int) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(CLI + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - t0
    if res.returncode != expect_rc:
        raise SystemExit(f"`ray-router tune {' '.join(args)}` exited {res.returncode}:\n{res.stderr[-3000:]}")
    return seconds


def main() -> None:
    from ray_router.data import resolve_data_dir
    from ray_router.data.download import present_release

    data = resolve_data_dir()
    if present_release("routerbench", data) is None:
        raise SystemExit(f"no RouterBench file in {data}: set RAY_ROUTER_DATA_DIR (e.g. ../shared/data)")
    work = Path(tempfile.mkdtemp(prefix="rr-sweep-bench-"))
    env = {
        **os.environ,
        "RAY_ROUTER_DATA_DIR": str(data),
        "RAY_ROUTER_CACHE_DIR": str(work / "cache"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
    }
    smoke = _timed(["tune_jobs/paper_sweep.yaml", "--smoke-test", "--storage-path", str(work / "st"), *RAY], env, 0)
    big = yaml.safe_load((REPO / "tune_jobs" / "paper_sweep.yaml").read_text())
    big["name"] = "too-big"
    big["search"]["resources_per_trial"] = {"cpu": 3}
    (work / "big.yaml").write_text(yaml.safe_dump(big))
    fail = _timed([str(work / "big.yaml"), "--storage-path", str(work / "st"), *RAY], env, 2)
    for name, seconds, target in (("smoke test (cold caches)", smoke, 120.0), ("trial too big: error", fail, 100.0)):
        print(f"{name:26s} {seconds:7.1f} s, target ~{target:.0f} s: ratio {seconds / target:.2f}")


if __name__ == "__main__":
    main()
