"""Sweep files: every space key is a real config field; bad files fail with a ConfigError naming the key."""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import yaml

from ray_router.errors import ConfigError
from ray_router.tune.spec import EmbeddingChoice, default_config, load_sweep, parse_sweep
from tests.tune.conftest import REPO, sweep_dict

SWEEPS = sorted((REPO / "tune_jobs").glob("*.yaml"))


def _classes():
    from ray_router.embeddings.model_embeddings import WeightingConfig
    from ray_router.policies.fgts_cdb import FGTSConfig

    return {"fgts_cdb": FGTSConfig, "weighting": WeightingConfig, "embedding": EmbeddingChoice}


def test_there_is_a_paper_sweep():
    assert REPO / "tune_jobs" / "paper_sweep.yaml" in SWEEPS


@pytest.mark.parametrize("smoke", [False, True], ids=["full", "smoke"])
@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_space_key_is_a_field_of_its_config_class(path, smoke):
    """Checked directly against dataclasses.fields, independently of the loader's own check."""
    raw = yaml.safe_load(path.read_text())
    spec = load_sweep(path, smoke_test=smoke)  # and the loader accepts the file
    classes = _classes()
    keys = 0
    for part in ("space", "fixed"):
        for section, fields in (raw.get(part) or {}).items():
            assert section in classes, f"{path.name}: {part}.{section} is not a config section"
            names = {f.name for f in dataclasses.fields(classes[section])}
            for key in fields:
                assert key in names, (
                    f"{path.name}: {part}.{section}.{key} is not a field of {classes[section].__name__}"
                )
                keys += 1
    assert keys >= 5
    assert spec.swept_keys()


def test_paper_sweep_covers_the_issue_axes():
    spec = load_sweep(REPO / "tune_jobs" / "paper_sweep.yaml")
    swept = set(spec.swept_keys())
    for key in [
        ("weighting", "name"),
        ("weighting", "beta"),
        ("fgts_cdb", "eta"),
        ("fgts_cdb", "mu"),
        ("fgts_cdb", "step_size"),
        ("fgts_cdb", "feature_map"),
        ("fgts_cdb", "correction_scale"),
        ("fgts_cdb", "arm_bias"),
        ("fgts_cdb", "query_rank"),
        ("fgts_cdb", "feel_good_schedule"),
        ("fgts_cdb", "distinct_arms"),
        ("embedding", "encoder"),
    ]:
        assert key in swept, key
    # issue 10: no swept map lacks a per-arm term (the offline blocks or hadamard_bias carry one)
    assert spec.fixed["fgts_cdb"]["offline_prior"] == "category"
    assert {s.split for s in spec.splits} == {"stratified", "holdout", "k_per_category"}
    assert {d.key for d in spec.datasets} == {"routerbench", "routerdc"}
    assert len(spec.groups) == len(spec.datasets) * len(spec.splits) * len(spec.split_seeds) >= 4
    smoke = load_sweep(REPO / "tune_jobs" / "paper_sweep.yaml", smoke_test=True)
    assert smoke.name == "paper_sweep-smoke" and smoke.max_rounds < spec.max_rounds


def _mutate(d: dict, dotted: str, value) -> dict:
    d = copy.deepcopy(d)
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
    cur[keys[-1]] = value
    return d


# (path in the sweep mapping, value, text the ConfigError must contain)
BAD = [
    ("space.fgts_cdb.etaa", {"choice": [1.0]}, "space.fgts_cdb.etaa"),
    ("space.weighting.lambda", {"choice": [0.1]}, "space.weighting.lambda"),
    ("space.embedding.model", {"choice": ["base"]}, "space.embedding.model"),
    ("space.sampler", {"eta": {"choice": [1.0]}}, "space.sampler"),
    ("space.eval", {"kappa": {"choice": [1.0]}}, "space.eval"),
    ("fixed.fgts_cdb.etta", 1.0, "fixed.fgts_cdb.etta"),
    ("space.fgts_cdb.feature_map", {"choice": ["hadamard", "nope"]}, "space.fgts_cdb.feature_map"),
    ("space.weighting.name", {"choice": ["perf", "best"]}, "space.weighting.name"),
    ("space.embedding.encoder", {"choice": ["base", "openai"]}, "space.embedding.encoder"),
    ("space.fgts_cdb.n_steps", {"loguniform": [1, 20]}, "space.fgts_cdb.n_steps"),
    ("space.fgts_cdb.eta", {"choice": [1.0], "grid": [2.0]}, "space.fgts_cdb.eta"),
    ("space.fgts_cdb.step_size", {"loguniform": [0.0, 0.5]}, "space.fgts_cdb.step_size"),
    ("space.fgts_cdb.step_size", {"uniform": [0.5, 0.1]}, "space.fgts_cdb.step_size"),
    ("space.fgts_cdb.eta", {"choice": [-1.0]}, "space.fgts_cdb.eta"),
    ("space.fgts_cdb.feature_map", {"uniform": [0, 1]}, "space.fgts_cdb.feature_map"),
    ("fixed.fgts_cdb.distinct_arms", {"choice": [True, False]}, "fixed.fgts_cdb.distinct_arms"),
    ("fixed.fgts_cdb.eta", 1.0, "fixed.fgts_cdb.eta"),  # also in space
    ("eval.split", "holdout", "eval.split"),
    ("eval.weighting_beta", 3.0, "eval.weighting_beta"),
    ("eval.n_round", 100, "eval.n_round"),
    ("eval.n_seeds", 0, "eval"),
    ("ccft.epoch", 2, "ccft"),
    ("report.base_seed", 1, "report.base_seed"),
    ("report.defaults", {"fgts_cdb": {"etaa": 1.0}}, "report.defaults.fgts_cdb.etaa"),
    ("search.report_every", 10_000, "search.report_every"),
    ("search.scheduler", {"type": "asha", "grace_period": 300}, "grace_period"),
    ("search.scheduler", {"type": "hyperband"}, "search.scheduler.type"),
    ("search.num_samples", 0, "search.num_samples"),
    ("splits", ["stratified", "stratified"], "duplicate split"),
    ("splits", [{"split": "random"}], "splits.0.split"),
    ("datasets", [], "datasets"),
    ("name", "has space", "name"),
    ("unknown_top_level", 1, "unknown_top_level"),
]


@pytest.mark.parametrize("dotted,value,expected", BAD, ids=[b[0] + ":" + str(b[1])[:20] for b in BAD])
def test_invalid_sweeps_raise_config_errors_naming_the_key(tmp_path, dotted, value, expected):
    d = _mutate(sweep_dict(tmp_path / "x.parquet"), dotted, value)
    with pytest.raises(ConfigError) as e:
        parse_sweep(d)
    assert expected in str(e.value)


def test_load_sweep_names_the_file_and_rejects_non_mappings(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match=re.escape("bad.yaml")):
        load_sweep(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "missing.yaml")
    p.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_sweep(p)


def test_values_take_the_config_class_types_and_defaults_are_its_defaults(tmp_path):
    from ray_router.config import parse
    from ray_router.policies.fgts_cdb import FGTSConfig
    from ray_router.tune.spec import section_values

    d = sweep_dict(tmp_path / "x.parquet")
    d["space"]["fgts_cdb"]["feel_good_clip"] = {"choice": [1, float("inf")]}  # YAML `.inf`
    spec = parse_sweep(d)
    vals = section_values(spec, {"fgts_cdb": {"feel_good_clip": float("inf"), "eta": 4}}, "fgts_cdb")
    assert vals["feel_good_clip"] == float("inf") and vals["eta"] == 4.0
    assert type(vals["eta"]) is type(parse(FGTSConfig, {"eta": 4}).eta)  # the class's own type
    assert vals["distinct_arms"] is True  # fixed values apply to every trial
    defaults = default_config(spec)
    assert defaults["fgts_cdb"]["eta"] == 1.0 and defaults["weighting"]["name"] == "perf"
    assert spec.encoders_needed() == {"base"}
    d["space"]["fgts_cdb"]["feel_good_clip"] = {"choice": [1, "inf"]}  # YAML `inf` is a string: refused
    with pytest.raises(ConfigError, match=re.escape("space.fgts_cdb.feel_good_clip = 'inf'")):
        parse_sweep(d)


def test_smoke_test_overrides_are_merged_and_validated(tmp_path):
    d = sweep_dict(tmp_path / "x.parquet", smoke_test={"eval": {"n_rounds": 60}, "search": {"num_samples": 1}})
    spec = parse_sweep(d, smoke_test=True)
    assert spec.name == "tiny-smoke" and spec.eval["n_rounds"] == 60 and spec.eval["n_seeds"] == 2
    assert spec.search.num_samples == 1 and spec.search.report_every == 50
    bad = sweep_dict(tmp_path / "x.parquet", smoke_test={"space": {"fgts_cdb": {"etaa": {"choice": [1.0]}}}})
    parse_sweep(bad)  # the override is only applied with --smoke-test
    with pytest.raises(ConfigError, match=re.escape("space.fgts_cdb.etaa")):
        parse_sweep(bad, smoke_test=True)


def test_param_space_has_grid_axes_and_sampled_sections(tmp_path):
    from ray_router.tune.sweep import param_space

    spec = parse_sweep(sweep_dict(tmp_path / "x.parquet"))
    space = param_space(spec)
    assert space["dataset"] == {"grid_search": ["synth"]}
    assert space["split"] == {"grid_search": ["stratified", "holdout"]}
    assert set(space["fgts_cdb"]) == {"eta", "step_size", "n_steps"}
    assert set(space["weighting"]) == {"name", "beta"}


def test_cli_tune_reports_a_bad_sweep_in_one_line_before_starting_ray(tmp_path, capsys):
    import sys

    from ray_router.cli import main

    bad = _mutate(sweep_dict(tmp_path / "x.parquet"), "space.fgts_cdb.etaa", {"choice": [1.0]})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    was_imported = "ray" in sys.modules
    assert main(["tune", str(path), "--storage-path", str(tmp_path / "st")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {path}: space.fgts_cdb.etaa: not a field of FGTSConfig; fields: "
        f"{[f.name for f in dataclasses.fields(_classes()['fgts_cdb'])]}"
    ]
    assert main(["tune", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "st").exists()
    if not was_imported:
        assert "ray" not in sys.modules, "a bad file must fail before Ray is imported"
