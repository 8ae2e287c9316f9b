"""Restart time of the posterior after 10k, 100k and 1M logged feedback (issue 12, item 4).

For each size, a fresh state directory is filled through the real code path of the posterior,
without Ray: ``PosteriorState.begin_feedback`` builds each record (d = 384 float32 embedding, 11
arms, random nonce and request id), ``FeedbackJournal.append`` writes and fsyncs it in group-commit
batches, ``end_feedback`` marks the nonce used, ``apply`` runs ``policy.update``, and snapshots are
taken when ``snapshot_due`` says so (every ``--snapshot-every`` feedbacks, as ``state.snapshot_every_n``
of the shipped configs), each deleting the log segments it covers. The feedback arrives at
``--rate`` per second of a simulated clock, so the single-use table holds ``rate x decision_ttl_s``
nonces at most (what a service at that rate carries). No SGLD refresh while writing (a restart
does not depend on how many there were). The last snapshot is taken at ``n - (snapshot_every - 1)``
and the writer then "crashes" (no final snapshot), so every size leaves the same log tail, the
longest the snapshot policy lets a crash leave: ``snapshot_every - 1`` records to replay.

The restart runs in a fresh Python process: construct ``PosteriorState`` and ``open()`` it (lock,
meta, snapshot, log tail, one refresh); the time printed is that, after the imports. The page cache
is warm (the files were just written).

Targets: <= 5 s at 1M, and the three times within 2x of each other (flat in the log length).

    python bench/restart.py                     # 10k, 100k, 1M (the 1M fill takes several minutes)
    python bench/restart.py --sizes 10000,100000 --rate 20
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ray_router.policies.offline_prior import OfflinePrior
from ray_router.serve.specs import PosteriorSpec
from ray_router.serve.state import PosteriorState
from ray_router.serve.tokens import DecisionClaims

DIM, N_ARMS = 384, 11
ARM_IDS = tuple(f"arm-{i:02d}/model-{i}" for i in range(N_ARMS))  # names of the shipped configs' length
OUTCOMES = ("first", "second", "tie")

RESTART = r"""
import pickle, sys, time, json
from ray_router.serve.state import PosteriorState
spec = pickle.load(open(sys.argv[1], "rb"))
t0 = time.perf_counter()
st = PosteriorState(spec)
t1 = time.perf_counter()
rec = st.open()
t2 = time.perf_counter()
print(json.dumps({"construct_s": t1 - t0, "open_s": t2 - t1, "total_s": t2 - t0, "recovery": rec,
                  "n_updates": int(st.policy.n_updates), "used": len(st.used)}))
st.close()
"""


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_spec(state_dir: Path, snapshot_every: int, ttl_s: float) -> PosteriorSpec:
    rng = np.random.default_rng(0)

    def unit(n: int) -> np.ndarray:
        A = rng.normal(size=(n, DIM))
        return A / np.linalg.norm(A, axis=1, keepdims=True)

    prior = OfflinePrior.from_profile(
        unit(3), rng.uniform(0.2, 0.8, size=(3, N_ARMS)), np.full(3, 20.0), ["code", "math", "chat"]
    )
    return PosteriorSpec(
        arm_ids=ARM_IDS,
        prices=tuple([0.001] * N_ARMS),
        arm_embeddings=unit(N_ARMS),
        encoder_identity="bench-restart-384",
        state_dir=str(state_dir),
        # the shipped configs' policy block (serve_configs/local.yaml)
        policy_config={
            "offline_prior": "category",
            "arm_selection": "exploit_first",
            "distinct_arms": True,
            "max_history": 10000,
        },
        decision_ttl_s=ttl_s,
        snapshot_every_n=snapshot_every,
        snapshot_every_s=1e12,  # by count only: the simulated clock runs faster than real time
        fsync=True,
        lock_timeout_s=5,
        offline_prior=prior.to_dict(),
    )


def fill(spec: PosteriorSpec, n: int, rate: float, batch: int, seed: int) -> dict:
    """n feedbacks through the posterior's durable path; a crash (no final snapshot) at the end."""
    clock = Clock(time.time() - n / rate)  # the last feedback arrives "now": the restart's clock is real
    st = PosteriorState(spec, clock=clock)
    st.open()
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    snapshots, written = 0, 0
    snap_s = 0.0
    cut = n - (spec.snapshot_every_n - 1)  # the last snapshot: the crash leaves a full tail behind
    while written < n:
        if written == cut or (written < cut and st.snapshot_due(clock.t)):
            ts = time.perf_counter()
            st.take_snapshot()
            snap_s += time.perf_counter() - ts
            snapshots += 1
            if snapshots % 20 == 0:
                st.prune()  # the service prunes every second; here every 20 snapshots (memory only)
        k = min(batch, n - written, cut - written if written < cut else n)
        X = rng.normal(size=(k, DIM)).astype(np.float32)
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        pairs = rng.integers(0, N_ARMS, size=(k, 2))
        recs = []
        for i in range(k):
            clock.t += 1.0 / rate
            first = int(pairs[i, 0])
            second = int(pairs[i, 1]) if pairs[i, 1] != first else (first + 1) % N_ARMS
            offered = None if i % 4 else tuple(sorted({first, second, (first + 3) % N_ARMS}))
            claims = DecisionClaims(
                nonce=rng.bytes(12).hex(),
                expires_at=int(clock.t + spec.decision_ttl_s),
                mode="duel",
                first=first,
                second=second,
                offered=offered,
                x=X[i],
            )
            rec = st.begin_feedback(claims, OUTCOMES[int(rng.integers(3))], rng.bytes(16).hex())
            assert isinstance(rec, dict)
            recs.append(rec)
        placed = st.journal.append(recs)  # write + fsync: the group commit of `batch` records
        for rec, (_, end) in zip(recs, placed):
            rec["_end"] = end
            st.end_feedback(rec["nonce"], rec)
        st.apply(recs)
        written += k
    fill_s = time.perf_counter() - t0
    out = {
        "fill_s": fill_s,
        "snapshots": snapshots,
        "snapshot_s": snap_s,
        "fsyncs": st.journal.n_fsyncs,
        "segments_deleted": st.journal.n_deleted,
        "tail": st.last_applied_seq - st.snapshot_seq,
        "used": len(st.used),
    }
    st.journal.close()  # the process dies: its descriptors close, the kernel drops the lock
    st.lock.release()
    return out


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def restart(spec_file: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path])}
    res = subprocess.run(
        [sys.executable, "-c", RESTART, str(spec_file)], capture_output=True, text=True, env=env, check=False
    )
    if res.returncode != 0:
        raise RuntimeError(f"the restart failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--rate", type=float, default=20.0, help="simulated feedbacks per second")
    ap.add_argument("--ttl", type=float, default=3600.0, help="decision_ttl_s (the shipped configs: 3600)")
    ap.add_argument("--snapshot-every", type=int, default=500, help="snapshot_every_n (the shipped configs: 500)")
    ap.add_argument("--batch", type=int, default=32, help="records per group commit (one fsync each)")
    ap.add_argument("--dir", default=None, help="where the state directories go (default: a temp dir)")
    ap.add_argument("--repeats", type=int, default=5, help="restarts per size (the median is reported)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    root = Path(args.dir or tempfile.mkdtemp(prefix="restart-bench-"))
    print(
        f"d = {DIM}, {N_ARMS} arms, max_history 10000, snapshot every {args.snapshot_every}, group commit "
        f"{args.batch}, simulated rate {args.rate:g}/s, ttl {args.ttl:g} s, state under {root}",
        flush=True,
    )
    results = {}
    for n in sizes:
        state = root / f"n{n}"
        shutil.rmtree(state, ignore_errors=True)
        spec = make_spec(state, args.snapshot_every, args.ttl)
        f = fill(spec, n, args.rate, args.batch, seed=n)
        spec_file = root / f"spec-{n}.pkl"
        spec_file.write_bytes(pickle.dumps(spec))
        runs = [restart(spec_file) for _ in range(args.repeats)]
        r = sorted(runs, key=lambda x: x["total_s"])[len(runs) // 2]
        rec = r["recovery"]
        assert r["n_updates"] == n, (r["n_updates"], n)  # every feedback is in the restarted posterior
        log_bytes = du(state / "feedback")
        snap_bytes = (state / "posterior.snapshot.npz").stat().st_size
        results[n] = r["total_s"]
        all_runs = ", ".join(f"{x['total_s']:.3f}" for x in runs)
        print(
            f"n = {n:>9,}: restart {r['total_s']:.3f} s (construct {r['construct_s']:.3f} + open {r['open_s']:.3f}; "
            f"runs {all_runs}) | replayed {rec['replayed']} after snapshot seq "
            f"{rec['snapshot_seq']}, {rec['log_segments']} segment(s), used nonces {r['used']:,} | disk: log "
            f"{log_bytes / 2**20:.1f} MiB + snapshot {snap_bytes / 2**20:.1f} MiB = {du(state) / 2**20:.1f} MiB | fill "
            f"{f['fill_s']:.0f} s ({f['snapshots']} snapshots, {f['snapshot_s']:.0f} s of them; {f['fsyncs']:,} fsyncs; "
            f"{f['segments_deleted']} segments deleted)",
            flush=True,
        )
    if len(results) > 1:
        times = list(results.values())
        lo, hi = min(results), max(results)
        print(
            f"ratio {hi:,}/{lo:,}: {results[hi] / results[lo]:.2f}; max/min over the sizes: "
            f"{max(times) / min(times):.2f} (target < 2); at {hi:,}: {results[hi]:.3f} s (target <= 5 s)"
        )
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
