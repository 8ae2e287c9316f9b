"""Report helpers (pure): the common-rounds regret, importance, driver-run bookkeeping."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ray_router.tune.report import comparable, importance


def _frames():
    rng = np.random.default_rng(0)
    trials, progress = [], []
    for g in ("a|s|0", "b|s|0"):
        for i in range(8):
            tid = f"{g[0]}{i}"
            eta = [0.25, 1.0, 4.0][i % 3]
            fmap = ["concat", "hadamard_bias"][i % 2]
            stopped = i % 2 == 1
            reach = 400 if stopped else 1600
            level = (0.5 if g[0] == "b" else 0.2) + 0.1 * (fmap == "concat")  # feature_map matters, eta not
            trials.append(
                {
                    "trial_id": tid,
                    "group": g,
                    "dataset": g[0],
                    "status": "stopped" if stopped else "complete",
                    "fgts_cdb.eta": eta,
                    "fgts_cdb.feature_map": fmap,
                }
            )
            for r in range(100, reach + 1, 100):
                progress.append(
                    {
                        "trial_id": tid,
                        "group": g,
                        "rounds_played": r,
                        "mean_regret": level + 0.3 / np.sqrt(r) + 0.001 * rng.standard_normal(),
                    }
                )
    return pd.DataFrame(trials), pd.DataFrame(progress)


def test_comparable_uses_the_rounds_every_trial_of_the_group_played():
    trials, progress = _frames()
    t = comparable(trials, progress)
    assert (t["common_rounds"] == 400).all()
    a0 = progress[(progress.trial_id == "a0") & (progress.rounds_played == 400)]["mean_regret"].iloc[0]
    assert t.set_index("trial_id").loc["a0", "regret_at_common"] == pytest.approx(a0)


def test_importance_ranks_the_field_that_explains_the_regret_first():
    trials, progress = _frames()
    imp = importance(trials, ["fgts_cdb.eta", "fgts_cdb.feature_map"], progress)
    assert imp["param"].tolist()[0] == "fgts_cdb.feature_map"
    top = imp.set_index("param")["importance"]
    assert top["fgts_cdb.feature_map"] > 0.9 and top["fgts_cdb.eta"] < 0.3
    assert (imp["n_groups"] == 2).all()


def test_driver_runs_merges_the_events_of_each_run(tmp_path):
    from ray_router.tune.sweep import RUNS_FILE, driver_runs

    events = [
        {"run": "1", "event": "start", "resumed": False, "texts_encoded": 5},
        {"run": "2", "event": "start", "resumed": True, "texts_encoded": 0},
        {"run": "2", "event": "end", "fit_seconds": 3.0, "interrupted": False},
        {"run": "2", "event": "done", "wall_seconds": 9.0},
    ]
    (tmp_path / RUNS_FILE).write_text("".join(json.dumps(e) + "\n" for e in events))
    runs = driver_runs(tmp_path)
    assert [r["interrupted"] for r in runs] == [True, False]  # run 1 was killed before fit() returned
    assert runs[1]["fit_seconds"] == 3.0 and runs[1]["wall_seconds"] == 9.0 and runs[0]["texts_encoded"] == 5
