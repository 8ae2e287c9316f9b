"""End to end on the real RouterBench subset with the real packaged encoder (slow, integration).

The claims under test (issue 10), through the real CLI, real Parquet file and real encoder, 5 seeds:
at λ = 0.2 with a 20% offline split the default FGTS.CDB serves answers whose regret is below the
best single arm's in hindsight (paired per-seed difference, 95% CI entirely below 0), and its dueling
regret is below uniform's with non-overlapping 95% intervals.
"""

import json

import pytest

from ray_router.cli import main
from tests.data_fixtures import shared_data_dir

DATA = shared_data_dir()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(DATA is None, reason="the real RouterBench subset (shared/data) is not on this machine"),
]


def test_fgts_cdb_beats_the_best_single_arm_and_uniform_on_real_routerbench(tmp_path, capsys):
    out = tmp_path / "rb"
    rc = main(
        [
            "evaluate",
            "--dataset",
            "routerbench",
            "--data-dir",
            str(DATA),
            "--policies",
            "fgts_cdb,uniform,best_fixed",
            "--cost-weight",
            "0.2",
            "--seeds",
            "5",
            "--rounds",
            "2000",
            "--workers",
            "2",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    recs = {r["policy"]: r for r in json.loads((out / "summary.json").read_text())}
    fgts, uni = recs["fgts_cdb"], recs["uniform"]
    print(json.dumps({k: (v["cum_regret_mean"], v["cum_regret_ci95"]) for k, v in recs.items()}))
    assert fgts["n_seeds"] == uni["n_seeds"] == 5 and fgts["encoder"] == "base"
    assert fgts["cum_regret_mean"] < uni["cum_regret_mean"]
    assert fgts["cum_regret_ci95"][1] < uni["cum_regret_ci95"][0], recs
    served = fgts["paired"]["best_fixed"]["served"]
    assert served["verdict"] == "below" and served["ci95"][1] < 0, served
