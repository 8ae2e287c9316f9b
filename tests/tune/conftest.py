"""Fixtures for the sweep tests: a small synthetic score table, sweep files, and subprocess runs of
``ray-router tune`` that clean up after themselves.

Ray tests run the CLI in a subprocess, each with its own capped local Ray (``--num-cpus 2``, a small
object store), started in a new session so that the test can SIGKILL the driver and then every
process of that session by its process-group id (never by name: other Ray instances may run on the
same machine). Waits block on what they wait for (a process's exit through a pidfd, a write into a
directory through inotify), never on a sleep.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.multinode import wait_for_exit  # pidfd waits

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "ray_router.cli"]


def write_synthetic_table(path: Path, n: int = 240, n_arms: int = 5, seed: int = 0) -> Path:
    """A score table in the generic format: 3 categories, ``n_arms`` arms whose quality depends on
    the category (so a router can learn), scores in {0, 1}, USD costs per arm."""
    rng = np.random.default_rng(seed)
    cats = np.array(["alpha", "beta", "gamma"])[rng.integers(0, 3, n)]
    quality = rng.uniform(0.2, 0.9, (3, n_arms))
    quality[0, 0] = quality[1, 1] = quality[2, 2 % n_arms] = 0.97
    ci = np.searchsorted(["alpha", "beta", "gamma"], cats)
    data: dict[str, Any] = {
        "sample_id": [f"q{i}" for i in range(n)],
        "prompt": [f"{c} question {i}: what is {i} * {i % 7}?" for i, c in enumerate(cats)],
        "eval_name": cats,
    }
    for k in range(n_arms):
        data[f"arm{k}"] = (rng.random(n) < quality[ci, k]).astype(float)
        data[f"arm{k}|total_cost"] = np.full(n, 1e-4 * (k + 1))
    pd.DataFrame(data).to_parquet(path, index=False)
    return path


def sweep_dict(data_path: Path, **overrides: Any) -> dict:
    """A tiny sweep over the synthetic table with the hash stand-in encoder (no model, no CCFT)."""
    base: dict[str, Any] = {
        "name": "tiny",
        "datasets": [{"name": str(data_path), "label": "synth"}],
        "splits": ["stratified", {"split": "holdout", "held_out": "smallest"}],
        "encoder": {"name": "hash"},
        "eval": {"n_rounds": 150, "n_seeds": 2, "cost_weight": 0.0},
        "space": {
            "weighting": {"name": {"choice": ["perf", "excel_mask"]}, "beta": {"loguniform": [1.0, 20.0]}},
            "fgts_cdb": {
                "eta": {"choice": [0.25, 1.0, 4.0]},
                "step_size": {"loguniform": [0.02, 0.5]},
                "n_steps": {"choice": [5, 10]},
            },
        },
        "fixed": {"fgts_cdb": {"distinct_arms": True}},
        "search": {"num_samples": 2, "report_every": 50, "scheduler": {"type": "fifo"}},
        "report": {"seeds": 2, "base_seed": 1000},
    }
    base.update(overrides)
    return base


def write_sweep(path: Path, d: dict) -> Path:
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


@pytest.fixture
def synth_table(tmp_path) -> Path:
    return write_synthetic_table(tmp_path / "synth.parquet")


@pytest.fixture
def tune_env(tmp_path) -> dict:
    """Environment of a CLI subprocess: local Ray settings (RAY_NOTES.md), a private cache."""
    env = dict(os.environ)
    env.update(
        {
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "RAY_ROUTER_CACHE_DIR": str(tmp_path / "cache"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.pop("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", None)
    return env


class Driver:
    """A ``ray-router tune`` subprocess in its own session (process group)."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 - open while the driver runs; closed in kill_group
        self.proc = subprocess.Popen(
            CLI + args, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.pgid = self.proc.pid  # the session leader's pid is the group id

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.flush()

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill_group(self) -> None:
        """SIGKILL every process of this driver's session (Ray's raylet, GCS and workers included)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while (left := group_alive(self.pgid)) and time.monotonic() < deadline:
            wait_for_exit(left, deadline - time.monotonic())
        self._log.close()


def group_alive(pgid: int) -> list[int]:
    """Pids still in process group ``pgid`` (read from /proc; zombies excluded)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d.name))
    return out


class DirWatch:
    """inotify on one directory: :meth:`wait_until` re-checks a condition each time a file in it is
    written or renamed into it, or when a watched process exits."""

    _IN_CLOSE_WRITE, _IN_MOVED_TO = 0x8, 0x80

    def __init__(self, path: Path):
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if (
            self.fd < 0
            or libc.inotify_add_watch(self.fd, os.fsencode(path), self._IN_CLOSE_WRITE | self._IN_MOVED_TO) < 0
        ):
            raise OSError(ctypes.get_errno(), f"inotify on {path}")

    def wait_until(self, condition: Callable[[], bool], timeout: float, while_alive: subprocess.Popen) -> bool:
        """True once ``condition()`` holds; False after ``timeout`` seconds or when ``while_alive`` has exited."""
        if while_alive.poll() is not None:
            return condition()
        proc_fd = os.pidfd_open(while_alive.pid)  # not reaped yet (poll() reaps): the pid is still ours
        deadline = time.monotonic() + timeout
        try:
            while not condition():
                left = deadline - time.monotonic()
                if left <= 0 or while_alive.poll() is not None:
                    return False
                ready, _, _ = select.select([self.fd, proc_fd], [], [], left)
                if self.fd in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.fd, 1 << 16)  # drain the events; the condition reads the files
            return True
        finally:
            os.close(proc_fd)

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def drivers():
    """Start drivers with ``start(args, env, log)``; every one is SIGKILLed with its group at the end."""
    started: list[Driver] = []

    def start(args: list[str], env: dict, log: Path) -> Driver:
        d = Driver(args, env, log)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill_group()
        left = group_alive(d.pgid)
        assert not left, f"processes of the sweep's session survived: {left}"
