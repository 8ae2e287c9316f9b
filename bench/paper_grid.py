"""Time the paper's full FGTS.CDB grid on the RouterBench subset and say where the time goes.

Grid: {base, CCFT} encoders × {perf, perf_cost, excel_perf_cost, excel_mask} weightings × N seeds
(default 10) × T rounds (default 2000), on one fixed split. Stages timed separately in this run:
encoding with the base encoder (cold: a fresh cache), CCFT fine-tuning, encoding with the CCFT
encoder, the replays, and inside the replays the time spent in SGLD.

    .venv/bin/python bench/paper_grid.py [--seeds 10] [--rounds 2000] [--workers 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

from ray_router.data import load_dataset, resolve_data_dir
from ray_router.embeddings import get_encoder
from ray_router.embeddings.ccft import CCFTConfig, fine_tune
from ray_router.evaluation.experiment import EvalConfig, _evaluate_grid, make_split
from ray_router.evaluation.paper import WEIGHTINGS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()

    from threadpoolctl import threadpool_limits

    table = load_dataset("routerbench", data_dir=resolve_data_dir(args.data_dir))
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        X_base = get_encoder("minilm", cache_dir=tmp / "cache").encode(list(table.texts))
        times["encode base (cold cache)"] = time.perf_counter() - t0
        cfg = EvalConfig(
            policies=("fgts_cdb",), n_seeds=args.seeds, n_rounds=args.rounds, split_seed=0, cost_weight=0.2
        )
        split = make_split(table, cfg, 0)
        t0 = time.perf_counter()
        art = fine_tune(
            list(table.texts[split.offline]), list(table.categories[split.offline]), CCFTConfig(), tmp / "ccft"
        )
        times["CCFT fine-tuning"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        X_ccft = get_encoder(str(art), cache_dir=tmp / "cache").encode(list(table.texts))
        times["encode CCFT (cold cache)"] = time.perf_counter() - t0

        replay = sgld = 0.0
        results: list[tuple] = []
        t0 = time.perf_counter()
        with threadpool_limits(1, user_api="blas"):
            for enc, X in (("base", X_base), ("ccft", X_ccft)):
                # the four weightings of one encoder share each seed's stream: one grid, lane groups
                cfgs = [dataclasses.replace(cfg, weighting=w) for w in WEIGHTINGS]
                for res in _evaluate_grid(table, X, cfgs, "x", False, args.workers, None):
                    replay += sum(r.seconds for r in res.runs.values())
                    sgld += sum(r.sgld_seconds for r in res.runs.values())
                    r = res.records[0]
                    results.append((enc, r["weighting"], r["cum_regret_mean"], r["cum_regret_ci95"]))
        times["replays (wall)"] = time.perf_counter() - t0

    total = sum(times.values())
    runs = 2 * len(WEIGHTINGS) * args.seeds
    print(
        f"paper grid on {table.name}: 2 encoders x {len(WEIGHTINGS)} weightings x {args.seeds} seeds x "
        f"{args.rounds} rounds = {runs} FGTS.CDB runs, {args.workers} worker processes"
    )
    for k, v in times.items():
        print(f"  {k:<28} {v:8.1f} s  {100 * v / total:5.1f} %")
    print(f"  {'total':<28} {total:8.1f} s  ({total / 60:.1f} min)")
    for enc, w, mean, (lo, hi) in results:
        print(f"  fgts_cdb {enc:<4} {w:<16} cum. regret at T = {mean:7.1f} [{lo:.1f}, {hi:.1f}]")
    print(
        f"  inside the replays (CPU time summed over workers): {replay:.1f} s, of which SGLD {sgld:.1f} s "
        f"({100 * sgld / max(replay, 1e-9):.1f} %); {1000 * replay / (runs * args.rounds):.2f} ms per round"
    )


if __name__ == "__main__":
    main()
