"""``ray-router calibrate`` without Ray: scoring rules, the judge's grades, the prompt file, the
written table / arm embeddings / Serve config, CLI errors, and the cold-start arm table.

Upstreams are :mod:`tests.openai_stub` servers on loopback; the pointwise judge is a subclass of
its :class:`StubServer` (the shared stub's judge is pairwise): it grades an answer 9/10 unless
the answer is the stub's wrong one."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ray_router.calibrate import (
    JUDGE_TEMPLATE,
    Prompt,
    load_prompts,
    parse_grade,
    score_reference,
    starter_path,
)
from ray_router.cli import main
from ray_router.data import load_generic
from ray_router.errors import ConfigError, DataError
from tests.openai_stub import WRONG, StubModel, StubServer

REPO = Path(__file__).resolve().parents[1]
ARM_MODELS = ("alpha", "beta", "gamma")  # stub model names (no digits: the numeric rule reads the last number)
# each stub arm is best at two categories (and poor elsewhere)
QUALITY = {
    "alpha": {"arithmetic": 0.95, "unit_conversion": 0.95, "default": 0.15},
    "beta": {"factual": 0.95, "code_output": 0.95, "default": 0.15},
    "gamma": {"logic": 0.95, "writing": 0.95, "default": 0.15},
}
BEST = {"arithmetic": "arm-alpha", "unit_conversion": "arm-alpha", "factual": "arm-beta"}
BEST |= {"code_output": "arm-beta", "logic": "arm-gamma", "writing": "arm-gamma"}
PRICE = {"prompt_usd_per_1m": 3.0, "completion_usd_per_1m": 15.0}


class GradingStub(StubServer):
    """The shared stub plus a pointwise grader model ``grader`` (replies in varied formats)."""

    def answer(self, model, prompt):
        if model.name == "grader":
            answer = prompt.split("[Answer]")[-1]
            return ("Grade: 1/10" if WRONG in answer else "**9**"), True
        return super().answer(model, prompt)


def stub_pool(extra_prompts: dict[str, str] | None = None, seed: int = 0) -> GradingStub:
    """Three arms of known per-category quality and a grader; the stub knows every starter
    prompt's category and reference (a correct stub answer is the reference)."""
    prompts = load_prompts("starter", None)
    categories = {p.text: p.category for p in prompts} | dict(extra_prompts or {})
    references = {p.text: p.references[0] for p in prompts if p.references}
    models = {n: StubModel(n, QUALITY[n]) for n in ARM_MODELS} | {"grader": StubModel("grader", 1.0)}
    return GradingStub(models, categories=categories, references=references, seed=seed)


def write_config(
    path: Path,
    base_url: str,
    *,
    encoder: dict | None = None,
    price: bool = True,
    price_usd: float | None = None,
    **args,
) -> Path:
    """``serve_configs/local.yaml`` with the stub arms (no arm_embeddings yet, no ``price_usd``:
    calibrate makes them) and ``args`` over the rest."""
    cfg = yaml.safe_load((REPO / "serve_configs" / "local.yaml").read_text())
    app = cfg["applications"][0]["args"]
    app["arms"] = [
        {"id": f"arm-{m}", "upstream": {"base_url": base_url, "model": m, **({"price": PRICE} if price else {})}}
        for m in ARM_MODELS
    ]
    if price_usd is not None:
        app["arms"] = [{**a, "price_usd": price_usd} for a in app["arms"]]
    app.pop("arm_embeddings")
    if encoder is not None:
        app["encoder"] = encoder
    app.update(args)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["calibrate", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


# --------------------------------------------------------------------------- scoring rules
@pytest.mark.parametrize(
    "answer, refs, match, expected",
    [
        ("391", ["391"], None, 1.0),
        ("17 * 23 = 391.", ["391"], None, 1.0),
        ("The answer is **86,400** seconds.", ["86400"], None, 1.0),  # thousands separator, markdown
        ("391 is 17 times 23", ["391"], None, 0.0),  # numeric: the LAST number counts
        ("I do not know.", ["391"], None, 0.0),
        ("It is 212.0 degrees Fahrenheit", ["212"], None, 1.0),
        ("The capital is Canberra.", ["Canberra"], None, 1.0),
        ("the capital is canberra", ["Canberra"], None, 1.0),  # case-folded
        ("Canberras", ["Canberra"], None, 0.0),  # whole words only
        ("I do not know.", ["no"], None, 0.0),  # "no" is not inside "not"
        ("No, it is not.", ["no"], None, 1.0),
        ("They absorb CO2.", ["carbon dioxide", "CO2"], None, 1.0),  # any accepted reference
        ("It prints a-b-c", ["a-b-c"], None, 1.0),
        ("Canberra.", ["Canberra"], "exact", 1.0),
        ("It is Canberra.", ["Canberra"], "exact", 0.0),
        ("391", ["391"], "contains", 1.0),
        ("3910", ["391"], "contains", 0.0),
    ],
)
def test_reference_scoring_rules(answer, refs, match, expected):
    assert score_reference(answer, Prompt("p", "c", "q", tuple(refs), match)) == expected


def test_a_prompt_without_reference_cannot_be_scored_by_reference():
    with pytest.raises(ConfigError, match="judge"):
        score_reference("anything", Prompt("p", "writing", "Write a haiku."))


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("7", 0.7),
        ("7/10", 0.7),
        ("Grade: **8**", 0.8),
        ("Score: 10", 1.0),
        ("I would give it 8.5 out of 10.", 0.85),
        ("0", 0.0),
        ("Rating = 3. The answer misses the point.", 0.3),
        ("15", None),  # not on the scale
        ("excellent", None),
        ("", None),
    ],
)
def test_judge_grades_are_parsed_leniently(reply, expected):
    got = parse_grade(reply)
    assert got == expected if expected is None else math.isclose(got, expected)


def test_the_judge_prompt_carries_the_question_and_the_answer():
    msg = JUDGE_TEMPLATE.format(question="Write a haiku.", answer="Leaves fall")
    assert "Write a haiku." in msg and "Leaves fall" in msg and "0" in msg and "10" in msg


# --------------------------------------------------------------------------- prompt files
def test_the_starter_set_ships_with_categories_and_references():
    assert starter_path().is_file() and (starter_path().parent / "README.md").is_file()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"ray_router.data" = ["prompts/*.jsonl"' in pyproject  # in the wheel
    prompts = load_prompts("starter", None)
    cats = pd.Series([p.category for p in prompts]).value_counts()
    assert len(cats) >= 6 and (cats >= 8).all()
    with_ref = [p for p in prompts if p.references]
    assert len(with_ref) >= 0.75 * len(prompts)
    assert {p.category for p in prompts if not p.references} == {"writing"}  # the judge's category
    assert len({p.id for p in prompts}) == len(prompts)
    five = load_prompts("starter", 5)
    assert len(five) == 5 * len(cats)


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "not JSON"),
        ('{"category": "a"}', "non-empty strings"),
        ('{"category": "a", "prompt": "q", "reference": 3}', "reference"),
        ('{"category": "a", "prompt": "q", "reference": "1", "match": "fuzzy"}', "match"),
        ('{"category": "a", "prompt": "q", "answer": "1"}', "unknown field"),
    ],
)
def test_bad_prompt_files_name_the_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"category": "a", "prompt": "fine", "reference": "1"}\n' + line + "\n")
    with pytest.raises(DataError, match=f"p.jsonl:2: .*{message}"):
        load_prompts(str(path))


# --------------------------------------------------------------------------- the whole command
@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """One calibration of the stub pool through the CLI (hash encoder: this module tests the
    command, tests/serve/test_calibrate_serve.py the real encoder and routing)."""
    tmp = tmp_path_factory.mktemp("calibrate")
    with stub_pool() as up:
        cfg = write_config(tmp / "serve.yaml", up.base_url, encoder={"name": "hash", "device": "auto"})
        rc = main(
            [
                "calibrate",
                "--config",
                str(cfg),
                "--out",
                str(tmp / "out"),
                "--per-category",
                "8",
                "--judge-base-url",
                up.base_url,
                "--judge-model",
                "grader",
            ]
        )
        requests = list(up.requests)
    return rc, tmp / "out", requests


def test_calibrate_asks_every_arm_every_prompt_and_the_judge_for_the_rest(calibrated):
    rc, out, requests = calibrated
    assert rc == 0
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 3 * 48
    asked = [r["model"] for r in requests if r["path"] == "/v1/chat/completions"]
    assert sorted(set(asked)) == ["alpha", "beta", "gamma", "grader"]
    assert asked.count("grader") == 3 * 8  # only the writing answers go to the judge
    writing = [a for a in answers if a["category"] == "writing"]
    assert {a["scored_by"] for a in writing} == {"judge"}
    assert {a["score"] for a in writing} <= {0.1, 0.9}
    assert {a["scored_by"] for a in answers if a["category"] != "writing"} == {
        "reference (numeric)",
        "reference (contains)",
    }


def test_the_table_is_generic_and_shows_who_is_best_where(calibrated):
    _, out, _ = calibrated
    table = load_generic(out / "table.parquet")  # the generic loader reads it as it is
    assert table.arms == ("arm-alpha", "arm-beta", "arm-gamma") and table.n_queries == 48
    assert table.costs is not None
    for cat, best in BEST.items():
        rows = table.categories == cat
        means = table.scores[rows].mean(axis=0)
        assert table.arms[int(means.argmax())] == best, (cat, means)


def test_cost_per_query_is_usage_times_price(calibrated):
    _, out, _ = calibrated
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    df = pd.read_parquet(out / "table.parquet")
    for a in answers[::7]:
        u = a["usage"]
        want = (
            u["prompt_tokens"] * PRICE["prompt_usd_per_1m"] + u["completion_tokens"] * PRICE["completion_usd_per_1m"]
        ) / 1e6
        assert a["cost_usd"] == pytest.approx(want) and want > 0
        assert df.loc[df.sample_id == a["prompt_id"], f"{a['arm']}|total_cost"].item() == pytest.approx(want)
    cfg = yaml.safe_load((out / "serve_config.yaml").read_text())
    arms = cfg["applications"][0]["args"]["arms"]
    for arm in arms:  # price_usd: the measured mean cost per query
        mine = [a["cost_usd"] for a in answers if a["arm"] == arm["id"]]
        assert arm["price_usd"] == pytest.approx(np.mean(mine), rel=1e-5)


def test_the_arm_embeddings_are_what_from_dataset_computes_and_carry_the_profile(calibrated, tmp_path):
    from ray_router.serve.arms import resolve_arm_table
    from ray_router.serve.config import AppArgs

    _, out, _ = calibrated
    cfg = yaml.safe_load((out / "serve_config.yaml").read_text())
    args = cfg["applications"][0]["args"]
    assert args["arm_embeddings"] == {"file": str((out / "arm_embeddings.npz").resolve())}
    assert args["policy"]["config"]["offline_prior"] == "category"
    assert args["policy"]["config"]["arm_selection"] == "exploit_first"
    calibrated_table = resolve_arm_table(AppArgs.model_validate(args))
    # the same table through arm_embeddings.from_dataset, every row offline (8 per category)
    from_dataset = {
        "name": str(out / "table.parquet"),
        "split": "k_per_category",
        "k_per_category": 8,
        "cache_dir": str(tmp_path / "cache"),
    }
    reference = resolve_arm_table(AppArgs.model_validate({**args, "arm_embeddings": {"from_dataset": from_dataset}}))
    np.testing.assert_allclose(calibrated_table.embeddings, reference.embeddings, atol=1e-9)
    prior = calibrated_table.offline_prior
    assert prior is not None and list(prior["category_names"]) == list(BEST)
    U = np.asarray(prior["utility"])  # (categories, arms): the per-category scores the prior starts from
    for m, cat in enumerate(BEST):
        assert calibrated_table.ids[int(U[m].argmax())] == BEST[cat]
    np.testing.assert_allclose(prior["counts"], [8] * 6)


def test_an_arm_without_a_price_costs_nothing(tmp_path, capsys):
    with stub_pool() as up:
        cfg = write_config(tmp_path / "s.yaml", up.base_url, encoder={"name": "hash"}, price=False)
        rc, out, _ = run_cli(capsys, "--config", str(cfg), "--out", str(tmp_path / "o"), "--no-judge")
    assert rc == 0
    section = yaml.safe_load(out.split("\n", 2)[2])
    assert [a["price_usd"] for a in section["arms"]] == [0.0, 0.0, 0.0]
    table = load_generic(tmp_path / "o" / "table.parquet")
    assert "writing" not in set(table.categories)  # --no-judge leaves out the unreferenced prompts
    assert (table.costs == 0).all()


# --------------------------------------------------------------------------- failures
class MumblingJudge(GradingStub):
    """A grader whose reply for one arm's answers holds no grade."""

    def answer(self, model, prompt):
        if model.name == "grader" and "[stub:gamma]" in prompt:
            return "What a lovely answer!", True
        return super().answer(model, prompt)


def test_answers_the_judge_does_not_grade_are_left_out_and_counted(tmp_path, capsys):
    pool = stub_pool()
    with MumblingJudge(pool.models, categories=pool.categories, references=pool.references) as up:
        cfg = write_config(tmp_path / "s.yaml", up.base_url, encoder={"name": "hash"})
        rc, _, err = run_cli(
            capsys,
            "--config",
            str(cfg),
            "--out",
            str(tmp_path / "o"),
            "--judge-base-url",
            up.base_url,
            "--judge-model",
            "grader",
        )
    assert rc == 0, err
    assert "5 answer(s) got no grade from the judge" in err
    df = pd.read_parquet(tmp_path / "o" / "table.parquet")
    assert df.loc[df.category == "writing", "arm-gamma"].isna().all()  # the table keeps the gap
    with np.load(tmp_path / "o" / "arm_embeddings.npz") as z:  # the profile rests on graded rows only
        assert "writing" not in [str(c) for c in z["prior_categories"]]
        assert len(z["prior_categories"]) == 5


def test_one_failing_prompt_is_recorded_not_fatal(tmp_path, capsys):
    with stub_pool() as up:
        up.models["beta"].fail_next(1, status=500, message="upstream exploded")
        cfg = write_config(tmp_path / "s.yaml", up.base_url, encoder={"name": "hash"})
        rc, _, err = run_cli(
            capsys,
            "--config",
            str(cfg),
            "--out",
            str(tmp_path / "o"),
            "--no-judge",
            "--retries",
            "0",
            "--concurrency",
            "1",
        )
    assert rc == 0, err
    answers = [json.loads(line) for line in (tmp_path / "o" / "answers.jsonl").read_text().splitlines()]
    failed = [a for a in answers if a["error"]]
    assert len(failed) == 1 and failed[0]["arm"] == "arm-beta" and failed[0]["score"] == 0.0
    assert "upstream exploded" in failed[0]["error"] and "1 call(s) failed" in err


def test_an_unreachable_upstream_is_a_message_not_a_traceback(tmp_path, capsys):
    with stub_pool() as up:
        cfg = write_config(tmp_path / "s.yaml", up.base_url, encoder={"name": "hash"})
    # the stub has stopped: its port refuses connections
    rc, out, err = run_cli(capsys, "--config", str(cfg), "--out", str(tmp_path / "o"), "--no-judge", "--retries", "0")
    assert rc == 2 and "Traceback" not in err and out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: arm 'arm-alpha' answered none of") and "ConnectError" in last


def test_a_slow_upstream_times_out_with_a_message(tmp_path, capsys):
    with stub_pool() as up:
        up.models["gamma"].latency_s = 3.0
        cfg = write_config(tmp_path / "s.yaml", up.base_url, encoder={"name": "hash"})
        rc, _, err = run_cli(
            capsys,
            "--config",
            str(cfg),
            "--out",
            str(tmp_path / "o"),
            "--no-judge",
            "--retries",
            "0",
            "--per-category",
            "1",
            "--timeout",
            "0.3",
        )
    last = err.strip().splitlines()[-1]
    assert rc == 2 and "Traceback" not in err
    assert last.startswith("error: arm 'arm-gamma' answered none of 5 prompts") and "timed out after 0.3s" in last


def test_a_judge_that_grades_nothing_is_an_error(tmp_path, capsys):
    with stub_pool() as up:
        cfg = write_config(tmp_path / "s.yaml", up.base_url, encoder={"name": "hash"})
        rc, _, err = run_cli(
            capsys,
            "--config",
            str(cfg),
            "--out",
            str(tmp_path / "o"),
            "--judge-base-url",
            up.base_url,
            "--judge-model",
            "no-such-judge",
            "--retries",
            "0",
        )
    assert rc == 2 and "Traceback" not in err and "the judge" in err and "graded none" in err


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a["arms"][0].pop("upstream"), "have no upstream"),
        (lambda a: a["arms"][0].update(colour="blue"), "colour"),
        (lambda a: a["arms"][0]["upstream"].update(api_key_env="RR_CALIBRATE_UNSET_KEY"), "is not set"),
        (lambda a: a.update(arm_embeddings={"cold_start": True, "file": "x.npz"}), "exactly one of"),
    ],
)
def test_bad_configs_are_clear_errors(tmp_path, capsys, monkeypatch, mutate, message):
    monkeypatch.delenv("RR_CALIBRATE_UNSET_KEY", raising=False)
    path = write_config(tmp_path / "s.yaml", "http://127.0.0.1:9/v1")
    cfg = yaml.safe_load(path.read_text())
    mutate(cfg["applications"][0]["args"])
    path.write_text(yaml.safe_dump(cfg))
    rc, _, err = run_cli(capsys, "--config", str(path), "--out", str(tmp_path / "o"), "--no-judge")
    assert rc == 2 and "Traceback" not in err and message in err, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "/nonexistent/serve.yaml"], "does not exist"),
        (["--prompts", "/nonexistent/p.jsonl"], "does not exist"),
        (["--judge-model", "m"], "--judge-base-url"),
        (["--concurrency", "0"], "--concurrency"),
        ([], "no reference answer"),  # the starter's writing prompts need a judge
    ],
)
def test_bad_arguments_are_clear_errors(tmp_path, capsys, argv, message):
    cfg = write_config(tmp_path / "s.yaml", "http://127.0.0.1:9/v1")
    base = {"--config": str(cfg), "--out": str(tmp_path / "o")}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    rc, _, err = run_cli(capsys, *[x for kv in base.items() for x in kv])
    assert rc == 2 and "Traceback" not in err and message in err, err


# --------------------------------------------------------------------------- cold start
def test_cold_start_arms_are_equal_but_distinct_and_the_state_says_so(tmp_path, caplog):
    from ray_router.serve.arms import resolve_arm_table
    from ray_router.serve.builder import posterior_spec
    from ray_router.serve.config import AppArgs
    from ray_router.serve.state import PosteriorState, make_scorer

    arms = [{"id": f"arm-{m}", "price_usd": 0.001} for m in ARM_MODELS]
    args = AppArgs.model_validate({"arms": arms, "arm_embeddings": {"cold_start": True}, "encoder": {"name": "hash"}})
    serve_log = logging.getLogger("ray.serve")  # Ray's loggers may not propagate to the root's capture
    serve_log.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING", logger="ray.serve"):
            table = resolve_arm_table(args)
    finally:
        serve_log.removeHandler(caplog.handler)
    assert "cold start: no offline data" in caplog.text  # the start-up log line
    A = table.embeddings
    assert table.cold_start and A.shape == (3, table.embeddings.shape[1])
    np.testing.assert_allclose(np.linalg.norm(A, axis=1), 1.0)  # no arm favoured by its norm
    assert np.abs(A @ A.T - np.eye(3)).max() < 0.5  # distinct directions (nearly orthogonal)
    # the same arm keeps its vector wherever it stands in the table
    reordered = resolve_arm_table(AppArgs.model_validate({**args.model_dump(), "arms": arms[::-1]}))
    np.testing.assert_array_equal(reordered.embeddings[::-1], A)
    # no preference at the prior mean: every arm scores the same on any query
    scorer = make_scorer(A, dict(args.policy.config), 0, table.offline_prior)
    x = np.random.default_rng(0).normal(size=A.shape[1])
    x /= np.linalg.norm(x)
    s = scorer.arm_scores(x, scorer.theta_mean)  # before any duel: the prior mean
    assert np.ptp(s) < 1e-12
    st = PosteriorState(posterior_spec(args, table, str(tmp_path / "state")))
    st.open()
    try:
        post = st.stats()["posterior"]
        assert post["cold_start"] is True and post["offline_prior"].startswith("cold start")
        assert post["unreachable_arms"] == []  # the neutral profile gives every arm its per-arm term
    finally:
        st.close()
