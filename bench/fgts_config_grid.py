"""Compare FGTS.CDB configurations on one dataset and offline regime, paired per seed.

Each configuration is a set of `FGTSConfig` overrides over the defaults; every configuration and the
reference policies run on the same seeds, splits and streams (common random numbers), so the
printed differences are paired per-seed differences of cumulative *served* regret, per round, with
their 95% t-intervals: against the best single arm, the static offline router and the first
configuration. This is the grid behind the defaults in docs/ALGORITHM_NOTES.md, e.g.

    .venv/bin/python bench/fgts_config_grid.py --split k_per_category --configs \\
        '{"default": {}, "cs3": {"correction_scale": 3.0}, "dist": {"distinct_arms": true}}'
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    from ray_router.config import parse
    from ray_router.data import load_dataset
    from ray_router.embeddings import get_encoder
    from ray_router.evaluation.experiment import EvalConfig, evaluate_grid
    from ray_router.evaluation.stats import mean_ci95

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="routerbench")
    ap.add_argument("--lam", type=float, default=0.2, help="cost weight λ")
    ap.add_argument("--split", default="stratified", help="stratified (20%% offline) or k_per_category (5)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--base-seed", type=int, default=0, help="first seed (a replication: fresh splits and streams)")
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--refs", default="offline_static,best_fixed", help="reference policies")
    ap.add_argument("--configs", required=True, help='JSON: {"name": {FGTSConfig overrides}, ...}')
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--per-seed", action="store_true", help="also print each seed's served regret per round")
    a = ap.parse_args()
    confs = json.loads(a.configs)
    common = dict(
        cost_weight=a.lam, n_seeds=a.seeds, base_seed=a.base_seed, n_rounds=a.rounds, split=a.split, k_per_category=5
    )
    # through parse, before any slow work: a bad override is one ConfigError naming the configuration and field
    cfgs = [
        parse(EvalConfig, {"policies": ("fgts_cdb",), "policy_configs": {"fgts_cdb": ov}, **common}, where=name)
        for name, ov in confs.items()
    ]
    cfgs.append(parse(EvalConfig, {"policies": tuple(a.refs.split(",")), **common}, where="--refs"))
    table = load_dataset(a.dataset)
    X = get_encoder("minilm").encode(list(table.texts))
    t0 = time.perf_counter()
    res = evaluate_grid(table, X, cfgs, workers=a.workers)
    names = [*list(confs), "refs"]
    refs = {r["policy"]: r for r in res[-1].records}
    first = res[0].records[0]["served_regret_per_seed"]

    def pair(x, y) -> str:
        m, lo, hi = mean_ci95(np.asarray(x) - np.asarray(y))
        return f"{m / a.rounds:+.4f} [{lo / a.rounds:+.4f}, {hi / a.rounds:+.4f}]"

    print(f"{table.name}, split {a.split}, λ = {a.lam}, {a.seeds} seeds x {a.rounds} rounds; regret per round")
    for n, rr in zip(names, res):
        for r in rr.records:
            half = (r["served_regret_ci95"][1] - r["served_regret_mean"]) / a.rounds
            line = (
                f"{n:<14} {r['policy']:<17} dueling {r['cum_regret_mean'] / a.rounds:.4f}  served "
                f"{r['served_regret_mean'] / a.rounds:.4f} ± {half:.4f}  self-duels {r['self_duel_share']:.2f}"
            )
            if n != "refs":
                line += "".join(
                    f" | vs {ref} " + pair(r["served_regret_per_seed"], refs[ref]["served_regret_per_seed"])
                    for ref in ("best_fixed", "offline_static")
                    if ref in refs
                )
                if n != names[0]:
                    line += f" | vs {names[0]} " + pair(r["served_regret_per_seed"], first)
            print(line, flush=True)
            if a.per_seed:
                print(" " * 15 + "per seed: " + " ".join(f"{v / a.rounds:.4f}" for v in r["served_regret_per_seed"]))
    print(f"{time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
