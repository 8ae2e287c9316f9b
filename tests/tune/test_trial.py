"""The trial loop (pure): reports every N rounds, agrees with the evaluator, resumes from a checkpoint;
and the data preparation encodes each text once."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from ray_router.data import load_dataset
from ray_router.embeddings import get_encoder
from ray_router.evaluation.experiment import EvalConfig, evaluate, run_seed
from ray_router.tune.spec import parse_sweep
from ray_router.tune.trial import run_trial, trial_eval_config
from tests.tune.conftest import sweep_dict


@pytest.fixture
def table_X(synth_table):
    table = load_dataset(str(synth_table))
    X = get_encoder("hash", dim=16).encode(list(table.texts))
    return table, X


def _cfg(**kw) -> EvalConfig:
    base = dict(
        policies=("fgts_cdb",),
        n_seeds=2,
        n_rounds=120,
        split_seed=0,
        cost_weight=0.1,
        policy_configs={"fgts_cdb": {"n_steps": 5, "distinct_arms": True}},
    )
    base.update(kw)
    return EvalConfig(**base)


def test_run_replay_callback_sees_the_regret_so_far(table_X):
    table, X = table_X
    calls = []
    res = run_seed(
        table,
        X,
        _cfg(),
        0,
        on_progress=lambda p, t, r: calls.append((p, t, r.copy(), r.flags.writeable)),
        progress_every=50,
    )
    final = res["fgts_cdb"].regret
    assert [c[1] for c in calls] == [50, 100, 120]
    assert all(c[0] == "fgts_cdb" and not c[3] for c in calls)  # read-only views
    for _, t, r, _ in calls:
        np.testing.assert_array_equal(r, final[:t])
    plain = run_seed(table, X, _cfg(), 0)["fgts_cdb"].regret  # the hook changes nothing
    np.testing.assert_array_equal(plain, final)


def test_run_trial_reports_every_n_rounds_and_matches_the_evaluator(table_X):
    table, X = table_X
    cfg = _cfg()
    reports = []
    last = run_trial(table, X, cfg, lambda m, ck: reports.append((m, ck)), report_every=40)
    played = [m["rounds_played"] for m, _ in reports]
    assert played == [40, 80, 120, 160, 200, 240]
    assert [m["round"] for m, _ in reports] == [40, 80, 120] * 2
    checkpoints = [ck for _, ck in reports if ck is not None]
    assert len(checkpoints) == 2 and json.loads(json.dumps(checkpoints[-1]))["rounds_played"] == 240
    assert not any(m["complete"] for m, _ in reports[:-1]) and last["complete"]
    ref = evaluate(table, X, cfg).records[0]
    assert last["cum_regret_mean"] == pytest.approx(ref["cum_regret_mean"])
    assert [last["cum_regret_ci_low"], last["cum_regret_ci_high"]] == pytest.approx(ref["cum_regret_ci95"])
    assert last["mean_regret"] == pytest.approx(ref["cum_regret_mean"] / cfg.n_rounds)
    # cum_regret is the current seed's cumulative regret; mean_regret the per-round mean over all rounds played
    m80 = reports[1][0]
    assert m80["mean_regret"] == pytest.approx(m80["cum_regret"] / 80)


def test_run_trial_resumes_after_the_last_finished_seed(table_X):
    table, X = table_X
    cfg = _cfg(n_seeds=3)
    full = run_trial(table, X, cfg, lambda m, ck: None, report_every=60)
    first: list = []
    with pytest.raises(KeyboardInterrupt):  # interrupted during seed 2

        def report(m, ck):
            first.append((m, ck))
            if m["seed_index"] == 1 and m["round"] == 60:
                raise KeyboardInterrupt

        run_trial(table, X, cfg, report, report_every=60)
    state = [ck for _, ck in first if ck is not None][-1]
    assert len(state["finals"]) == 1
    again: list = []
    resumed = run_trial(table, X, cfg, lambda m, ck: again.append(m), report_every=60, state=state)
    assert again[0]["seed_index"] == 1 and again[0]["rounds_played"] == 180
    assert resumed["cum_regret_mean"] == pytest.approx(full["cum_regret_mean"])
    # a trial restored after its last seed reports its result once more and replays nothing
    done = [m for m in again if m["complete"]]
    final_state = {"finals": [0.0] * 3, "regret_sum": 3.0, "rounds_played": 360}
    out: list = []
    res = run_trial(table, X, cfg, lambda m, ck: out.append(m), state=final_state)
    assert len(out) == 1 and res["complete"] and res["rounds_played"] == 360 and done


def test_trial_eval_config_maps_the_sections_onto_eval_config(tmp_path):
    d = sweep_dict(tmp_path / "x.parquet")
    d["space"]["weighting"]["top_tau"] = {"randint": [1, 4]}
    d["space"]["weighting"]["cost_weight"] = {"choice": [0.0, 0.5]}
    spec = parse_sweep(d)
    config = {
        "dataset": "synth",
        "split": "holdout",
        "split_seed": 3,
        "weighting": {"name": "excel_mask", "beta": 2.5, "top_tau": 2, "cost_weight": 0.5},
        "fgts_cdb": {"eta": 4, "step_size": 0.1, "n_steps": 5},
    }
    split = {"split": "holdout", "offline_fraction": 0.2, "k_per_category": 5, "held_out": "beta", "split_seed": 3}
    cfg = trial_eval_config(spec, config, split)
    assert (cfg.weighting, cfg.weighting_beta, cfg.weighting_tau, cfg.weighting_cost_weight) == (
        "excel_mask",
        2.5,
        2,
        0.5,
    )
    assert (cfg.split, cfg.held_out, cfg.split_seed, cfg.n_rounds, cfg.n_seeds) == ("holdout", "beta", 3, 150, 2)
    fg = cfg.policy_config("fgts_cdb")
    assert fg.eta == 4.0 and fg.distinct_arms is True and fg.n_steps == 5
    fresh = trial_eval_config(spec, config, split, base_seed=1000, n_seeds=5)
    assert fresh.seeds == [1000, 1001, 1002, 1003, 1004]
    uni = trial_eval_config(spec, {}, split, policies=("uniform",))
    assert uni.policies == ("uniform",) and not uni.policy_configs


def test_prepare_embeds_each_text_once_and_the_second_time_from_the_cache(tmp_path, synth_table):
    from ray_router.tune.prepare import prepare

    d = sweep_dict(synth_table)
    d["encoder"] = {"name": "hash"}
    spec = parse_sweep(d)
    cache = tmp_path / "emb"
    first = prepare(spec, tmp_path / "art", cache_dir=cache, log=lambda m: None)
    tot = first.encoding_totals()
    n = first.tables["synth"].n_queries
    assert tot == {"texts_requested": n, "unique_texts": n, "texts_encoded": n, "cache_hits": 0}
    assert set(first.groups) == {"synth|stratified|0", "synth|holdout|0"}
    hold = first.groups["synth|holdout|0"]
    assert hold.split_kwargs["held_out"] in ("alpha", "beta", "gamma") and hold.arrays == {"base": "synth/base"}
    again = prepare(spec, tmp_path / "art", cache_dir=cache, log=lambda m: None).encoding_totals()
    assert again["texts_encoded"] == 0 and again["cache_hits"] == n
    np.testing.assert_array_equal(
        first.arrays["synth/base"],
        prepare(spec, tmp_path / "art", cache_dir=cache, log=lambda m: None).arrays["synth/base"],
    )


def test_prepare_refuses_ccft_on_the_stand_in_encoder(tmp_path, synth_table):
    from ray_router.errors import ConfigError
    from ray_router.tune.prepare import prepare

    d = sweep_dict(synth_table)
    d["space"]["embedding"] = {"encoder": {"choice": ["base", "ccft"]}}
    with pytest.raises(ConfigError, match="stand-in"):
        prepare(parse_sweep(d), tmp_path / "art", log=lambda m: None)


def test_subsample_is_stratified(synth_table):
    from ray_router.tune.prepare import resolve_held_out, subsample

    table = load_dataset(str(synth_table))
    sub = subsample(table, 60, seed=0)
    assert sub.n_queries == 60 and set(sub.category_names) == set(table.category_names)
    assert subsample(table, 0, 0) is table
    counts = {c: int((table.categories == c).sum()) for c in table.category_names}
    assert resolve_held_out(table, "smallest") == min(counts, key=lambda c: (counts[c], c))
    with pytest.raises(Exception, match="not in"):
        resolve_held_out(table, "delta")


def test_prepare_resolves_every_split_kind(tmp_path, synth_table):
    from ray_router.tune.prepare import prepare

    d = sweep_dict(
        synth_table,
        splits=[
            {"split": "k_per_category", "k_per_category": 4},
            {"split": "holdout", "held_out": {"synth": "beta"}, "label": "no-beta"},
        ],
        split_seeds=[0, 1],
    )
    spec = parse_sweep(d)
    prep = prepare(spec, tmp_path / "art", log=lambda m: None)
    assert set(prep.groups) == {f"synth|{s}|{k}" for s in ("k_per_category", "no-beta") for k in (0, 1)}
    k4 = prep.groups["synth|k_per_category|0"]
    assert k4.n_offline == 3 * 4 and k4.split_kwargs["k_per_category"] == 4
    assert prep.groups["synth|no-beta|1"].split_kwargs == {
        "split": "holdout",
        "offline_fraction": 0.2,
        "k_per_category": 5,
        "held_out": "beta",
        "split_seed": 1,
    }
    from ray_router.errors import ConfigError

    d["splits"][1]["held_out"] = {"other": "beta"}
    with pytest.raises(ConfigError, match=re.escape("splits.1.held_out.other")):
        parse_sweep(d)


def test_an_optional_dataset_without_files_is_skipped(tmp_path, synth_table):
    from ray_router.errors import ConfigError
    from ray_router.tune.prepare import prepare

    d = sweep_dict(synth_table)
    d["datasets"].append({"name": "mixinstruct", "optional": True})
    prep = prepare(parse_sweep(d), tmp_path / "art", data_dir=tmp_path, log=lambda m: None)
    assert set(prep.tables) == {"synth"} and "mixinstruct" in prep.skipped
    d["datasets"] = [{"name": "mixinstruct", "optional": True}]
    with pytest.raises(ConfigError, match="no dataset"):
        prepare(parse_sweep(d), tmp_path / "art", data_dir=tmp_path, log=lambda m: None)
    d["datasets"] = [{"name": "mixinstruct"}]
    with pytest.raises(Exception, match=r"mixinstruct|MixInstruct"):
        prepare(parse_sweep(d), tmp_path / "art", data_dir=tmp_path, log=lambda m: None)
