"""`ray-router experiment paper` end to end on a MixInstruct file in the exact release format
(real encoder, a real — tiny — CCFT fine-tune, every section of the report)."""

import json

import pytest

from ray_router.embeddings.ccft import CCFTConfig
from ray_router.evaluation.paper import PaperConfig, run_paper
from tests.data_fixtures import write_mixinstruct_fixture

# What the experiment must run, written out here (not imported from the module under test): the two
# FGTS.CDB configurations, the paper's four weightings, the eight baselines of the main grid and the
# routers and references of the thin-offline section.
ROUTERS = {"fgts_cdb", "fgts_cdb_paper"}
WEIGHTINGS = {"perf", "perf_cost", "excel_perf_cost", "excel_mask"}
BASELINES = {"uniform", "best_fixed", "best_per_category", "offline_static", "maxinp", "colstim", "laplace_ts", "knn"}
THIN = {"fgts_cdb", "fgts_cdb_paper", "offline_static", "best_fixed", "best_per_category", "uniform"}

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_paper_experiment_on_a_mixinstruct_file(tmp_path):
    data = write_mixinstruct_fixture(tmp_path / "test_data_prepared.jsonl", n=48, seed=3)
    cfg = PaperConfig(
        dataset=str(data),
        n_seeds=2,
        n_rounds=30,
        lambda_grid=(0.0, 1.0),
        workers=1,
        ccft=CCFTConfig(queries_per_category=4, epochs=1, max_seq_length=32, batch_size=8),
        fgts={"n_steps": 3},
        k_per_category=2,
    )
    result = run_paper(cfg, tmp_path / "out", cache_dir=tmp_path / "cache")
    recs = json.loads(result.paths["summary"].read_text())
    main = [r for r in recs if r["section"] == "main"]
    for router in ROUTERS:  # the shipped default and the paper's configuration, side by side
        fgts = {(r["encoder"], r["weighting"]) for r in main if r["policy"] == router}
        assert fgts == {(e, w) for e in ("base", "ccft") for w in WEIGHTINGS}
    assert {r["policy"] for r in main} == {*ROUTERS, *BASELINES}
    assert len(main) == 2 * 2 * 4 + 8  # each router on each encoder x weighting, each baseline once
    lam = [r for r in recs if r["section"].startswith("lambda=")]
    assert sorted((r["section"], r["policy"]) for r in lam) == sorted(
        (f"lambda={x}", p) for x in ("0", "1") for p in (*ROUTERS, "offline_static")
    )
    for r in recs:
        assert r["encoder"] in ("base", "ccft", "constant") and r["weighting"] in WEIGHTINGS
        assert r["n_seeds"] == 2 and len(r["cum_regret_ci95"]) == 2 and "split" in r and "aiq" in r
        assert len(r["served_regret_per_seed"]) == 2 and len(r["served_regret_ci95"]) == 2
        assert r["aiq"] is None  # MixInstruct has no costs
    # every comparison is also paired against the best single arm and the static offline router
    fg_main = next(r for r in main if r["policy"] == "fgts_cdb")
    assert {"best_fixed", "offline_static"} <= set(fg_main["paired"])
    best = next(r for r in main if r["policy"] == "best_fixed")
    assert best["served_regret_per_seed"] == best["cum_regret_per_seed"]  # it serves what it duels
    thin = [r for r in recs if r["section"] == "thin"]
    assert {r["policy"] for r in thin} == THIN
    assert all(r["split"] == "k_per_category:2" for r in thin)
    ablation = [r for r in recs if r["section"] == "ablation"]
    assert ablation and all(r["context"] == "constant" for r in ablation)
    unseen = [r for r in recs if r["section"] == "unseen"]
    assert len(unseen) == 5 + 2 and all(r["split"].startswith("holdout:") for r in unseen)  # base: 5, CCFT: 2
    assert {r["encoder"] for r in unseen if r["policy"] == "fgts_cdb"} == {"base", "ccft"}
    assert any(r["real_label_share"] > 0 for r in recs)  # cmp_results judged some duels
    report = result.report
    for heading in (
        "## Verdict",
        "## Main grid",
        "CCFT vs general-purpose",
        "Category separation",
        "Unseen category",
        "Thin offline split",
        "Constant-context ablation",
        "Reachability",
        "Perf–cost view",
        "AIQ: not applicable",
    ):
        assert heading in report
    for key in ("main_plot", "served_plot", "unseen_plot", "thin_plot", "cost_plot"):
        assert result.paths[key].stat().st_size > 5000
    assert len(list((tmp_path / "out" / "artifacts").glob("ccft-*/ray_router_artifact.json"))) == 2  # main + held-out
