"""How fast does `ray-router data download` give up on a machine without internet? (speed targets
that tests/test_data_download.py checks only for behaviour, never by the clock)

Three cases, each repeated ``--repeats`` times, no network touched (the probe is replaced):

- ``HF_HUB_OFFLINE=1``: fails before any connection; target under 1 s;
- the Hub refuses the connection: fails on the refused probe; target under 1 s;
- the probe hangs (a DNS lookup that ignores timeouts): abandoned after ``timeout`` (0.2 s here);
  target under 2 s.

Prints one line per case: the slowest of the repeats, the target and their ratio (below 1 meets it).

    .venv/bin/python bench/download_offline.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable

from ray_router.data import download_dataset
from ray_router.errors import OfflineError


def _seconds(call: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    try:
        call()
    except OfflineError:
        return time.perf_counter() - t0
    raise SystemExit("expected an OfflineError")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dest = tempfile.mkdtemp(prefix="rr-download-bench-")
    release = threading.Event()
    real = socket.create_connection

    def refused(*a, **kw):
        raise ConnectionRefusedError("refused")

    def hang(*a, **kw):
        release.wait()
        raise OSError("too late")

    cases = []
    os.environ["HF_HUB_OFFLINE"] = "1"
    cases.append(
        (
            "HF_HUB_OFFLINE=1",
            1.0,
            [_seconds(lambda: download_dataset("routerbench", dest)) for _ in range(args.repeats)],
        )
    )
    os.environ["HF_HUB_OFFLINE"] = "0"
    os.environ.pop("HF_ENDPOINT", None)
    try:
        socket.create_connection = refused
        cases.append(
            (
                "connection refused",
                1.0,
                [_seconds(lambda: download_dataset("routerbench", dest, timeout=2.0)) for _ in range(args.repeats)],
            )
        )
        socket.create_connection = hang
        cases.append(
            (
                "probe hangs, timeout 0.2 s",
                2.0,
                [_seconds(lambda: download_dataset("routerbench", dest, timeout=0.2)) for _ in range(args.repeats)],
            )
        )
    finally:
        socket.create_connection = real
        release.set()
    for name, target, seconds in cases:
        worst = max(seconds)
        print(
            f"{name:28s} slowest {worst:6.3f} s of {len(seconds)}, target < {target:.1f} s: ratio {worst / target:.3f}"
        )


if __name__ == "__main__":
    main()
