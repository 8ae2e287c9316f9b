"""FGTS.CDB replay speed at the RouterBench shape (d = 384, K = 11), next to this machine's GEMM speed.

Prints rounds per second (exact-gradient regime, history <= batch_size, and minibatch regime), the
share of the time spent in SGLD, the FLOP rate SGLD achieves, and the FLOP rate of a large matrix
multiply in SGLD's dtype measured in the same process (the ceiling). With ``--lanes L`` it also
replays L seeds as lanes of one array program (what the evaluator does) and prints the speed-up per
seed-round over the lone policy measured in the same run; ``--group-size W`` makes groups of W lanes
that share a seed's stream (the paper grid's weightings). Ratios, not absolute targets.

    .venv/bin/python bench/replay_speed.py [--rounds 1500] [--feature-map hadamard_bias] [--lanes 20 --group-size 4]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ray_router.evaluation.replay import ReplayStream, run_replay, run_replay_lanes
from ray_router.policies import FEATURE_MAPS, FGTSCDB, FGTSConfig
from ray_router.policies.fgts_cdb import FGTSCDBLanes


def gemm_flops(n: int = 1024, repeat: int = 5, dtype: str = "float64") -> float:
    a, b = np.random.default_rng(0).random((2, n, n)).astype(dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2 * n**3 * repeat / (time.perf_counter() - t0)


def sgld_step_flops(batch: int, d: int, n_arms: int, chains: int = 2) -> float:
    # scores (B, d) @ (d, C·K) and the weighted gradient (C·K, B) @ (B, d): two GEMMs per step
    return 2 * (2 * batch * d * chains * n_arms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1500)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--arms", type=int, default=11)
    ap.add_argument("--feature-map", default=FGTSConfig().feature_map, choices=FEATURE_MAPS)
    ap.add_argument("--lanes", type=int, default=0, help="also replay this many runs as lanes (0: skip)")
    ap.add_argument("--group-size", type=int, default=1, help="lanes per group sharing a seed's stream")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    d, K, T = args.dim, args.arms, args.rounds
    A = rng.normal(size=(K, d))
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    X = rng.normal(size=(2000, d))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    U = rng.random((2000, K))
    stream = ReplayStream(X, U, U, np.zeros_like(U), rng.integers(0, 2000, T))
    cfg = FGTSConfig(feature_map=args.feature_map)
    policy = FGTSCDB(cfg, A, seed=0)

    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")  # as the evaluator runs it (see evaluate(blas_threads=...))
    peak = gemm_flops(dtype=cfg.compute_dtype)
    t0 = time.perf_counter()
    run_replay(policy, stream, kappa=10.0, rng=np.random.default_rng(1))
    total = time.perf_counter() - t0
    exact = min(cfg.batch_size, T)
    # the exact-gradient regime alone, on a fresh policy over the same first rounds
    fresh = FGTSCDB(cfg, A, seed=0)
    t1 = time.perf_counter()
    run_replay(fresh, ReplayStream(X, U, U, np.zeros_like(U), stream.order[:exact]), 10.0, np.random.default_rng(1))
    t_exact = time.perf_counter() - t1
    t_mini = total - t_exact
    steps = T * cfg.n_steps
    sgld_rate = steps * sgld_step_flops(cfg.batch_size, d, K) / policy.sgld_seconds

    print(
        f"FGTS.CDB replay, d={d}, K={K}, feature_map={cfg.feature_map}, n_steps={cfg.n_steps}, "
        f"batch_size={cfg.batch_size}, {T} rounds"
    )
    print(f"  overall            {T / total:8.1f} rounds/s  ({1000 * total / T:.2f} ms/round)")
    print(f"  first {exact:>4} rounds  {exact / t_exact:8.1f} rounds/s  (exact gradient, growing history)")
    if exact < T:
        print(f"  rounds {exact + 1}-{T:<5} {(T - exact) / t_mini:8.1f} rounds/s  (minibatch of {cfg.batch_size})")
    print(f"  time in SGLD       {100 * policy.sgld_seconds / total:8.1f} %")
    print(f"  SGLD FLOP rate     {sgld_rate / 1e9:8.2f} GFLOP/s (upper-bound count, minibatch regime)")
    print(f"  {cfg.compute_dtype} GEMM 1024  {peak / 1e9:8.2f} GFLOP/s on this machine (1 BLAS thread)")
    print(f"  ratio SGLD / GEMM  {sgld_rate / peak:8.2f}")

    if args.lanes > 1:
        L, W = args.lanes, args.group_size
        orders = [stream.order] + [rng.integers(0, 2000, T) for _ in range(L // W - 1)]
        streams = [ReplayStream(X, U, U, np.zeros_like(U), o) for o in orders for _ in range(W)]
        arm_emb = np.stack([A + 0.01 * w * rng.normal(size=A.shape) for _ in range(L // W) for w in range(W)])
        lanes = FGTSCDBLanes(cfg, arm_emb, seeds=[lane // W for lane in range(L)], group_size=W)
        t2 = time.perf_counter()
        run_replay_lanes(lanes, streams, 10.0, [np.random.default_rng(1 + lane) for lane in range(L)])
        t_lanes = time.perf_counter() - t2
        lane_rate = L * steps * sgld_step_flops(cfg.batch_size, d, K) / lanes.sgld_seconds
        print(f"{L} runs as lanes of one array program ({L // W} groups of {W} sharing a stream), same shapes:")
        print(f"  per run            {L * T / t_lanes:8.1f} rounds/s  ({1000 * t_lanes / (L * T):.2f} ms/round)")
        print(f"  SGLD FLOP rate     {lane_rate / 1e9:8.2f} GFLOP/s (ratio to GEMM {lane_rate / peak:.2f})")
        print(f"  speed-up per run-round over the lone policy: {total * L / t_lanes:.2f}x")


if __name__ == "__main__":
    main()
