"""Serve configs and the app's arguments: schema validation, arm tables, GPU fallback, docs in sync."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from ray_router.errors import ConfigError, DataError
from ray_router.serve import launch
from ray_router.serve.arms import resolve_arm_table, save_arm_embeddings
from ray_router.serve.config import AppArgs
from tests.data_fixtures import shared_data_dir

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "serve_configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"local.yaml", "gpu.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates_against_serves_schema_and_app_args(path):
    from ray.serve.schema import ServeDeploySchema

    cfg = launch.load_serve_config(path)
    schema = ServeDeploySchema.model_validate(cfg)  # Serve's own schema, as `serve deploy` checks it
    assert schema.applications
    launch.validate_config(cfg)  # and our AppArgs for every ray-router app
    apps = launch.our_apps(cfg)
    assert apps, f"{path.name} has no app with import_path {launch.IMPORT_PATH}"
    for app in apps:
        names = {d["name"] for d in app.get("deployments", [])}
        assert names <= {"Ingress", "Embedder", "Posterior"}
        post = next(d for d in app["deployments"] if d["name"] == "Posterior")
        assert post["num_replicas"] == 1, "the posterior must have exactly one writer"
        emb = next((d for d in app["deployments"] if d["name"] == "Embedder"), {})
        assert "ray_actor_options" not in emb, "embedder resources belong in args.embedder (GPU fallback)"
        batch = app["args"]["embedder"]["max_batch_size"]
        assert emb.get("max_ongoing_requests", 5) >= batch, "max_ongoing_requests below the batch size starves batching"
    assert launch.admission_warnings(cfg) == []  # what the ingress admits, the embedders take: no handle queue


def test_admission_past_what_the_embedders_take_is_warned_about_with_the_fix():
    cfg = launch.load_serve_config(REPO / "serve_configs" / "local.yaml")
    deps = {d["name"]: d for d in launch.our_apps(cfg)[0]["deployments"]}
    deps["Embedder"]["max_ongoing_requests"] = 48
    (line,) = launch.admission_warnings(cfg)
    assert "admits 1 x 64" in line and "takes 1 x 48" in line and "at least 64" in line, line
    # three ingress replicas (autoscaled: their most) against two embedders (their fewest)
    deps["Ingress"].pop("num_replicas")
    deps["Ingress"]["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 3}
    deps["Embedder"].pop("num_replicas")
    deps["Embedder"]["autoscaling_config"] = {"min_replicas": 2, "max_replicas": 4}
    deps["Embedder"]["max_ongoing_requests"] = 64
    (line,) = launch.admission_warnings(cfg)
    assert "admits 3 x 64" in line and "takes 2 x 64" in line and "at least 96" in line, line
    deps["Embedder"]["max_ongoing_requests"] = 96
    assert launch.admission_warnings(cfg) == []
    # inline: the ingress encodes itself, no handle to queue in
    from ray_router.serve.inline import as_inline

    deps["Embedder"]["max_ongoing_requests"] = 1
    assert launch.admission_warnings(as_inline(cfg)) == []


def test_local_config_fits_two_cpus():
    cfg = launch.load_serve_config(REPO / "serve_configs" / "local.yaml")
    app = launch.our_apps(cfg)[0]
    deps = {d["name"]: d for d in app["deployments"]}
    cpus = app["args"]["embedder"]["num_cpus"] * deps["Embedder"]["num_replicas"]
    cpus += sum(deps[n]["ray_actor_options"]["num_cpus"] * deps[n]["num_replicas"] for n in ("Ingress", "Posterior"))
    assert cpus <= 2
    assert app["args"]["embedder"]["num_gpus"] == 0
    assert cfg["http_options"]["host"] == "127.0.0.1"


def test_local_prices_are_the_routerbench_mean_costs():
    d = shared_data_dir()
    if d is None:
        pytest.skip("RouterBench data not available")
    from ray_router.data import load_dataset

    table = load_dataset("routerbench", data_dir=d)
    mean = dict(zip(table.arms, table.costs.mean(axis=0)))
    cfg = launch.load_serve_config(REPO / "serve_configs" / "local.yaml")
    arms = launch.our_apps(cfg)[0]["args"]["arms"]
    assert [a["id"] for a in arms] == list(table.arms)
    for a in arms:
        assert a["price_usd"] == pytest.approx(mean[a["id"]], rel=0.02)


def test_gpu_config_falls_back_to_cpu_without_gpus(monkeypatch):
    import ray

    from ray_router.serve.builder import embedder_resources

    cfg = launch.load_serve_config(REPO / "serve_configs" / "gpu.yaml")
    args = AppArgs.model_validate(launch.our_apps(cfg)[0]["args"])
    assert args.embedder.num_gpus >= 1 and args.embedder.gpu == "auto"
    assert "num_gpus" not in embedder_resources(args)  # no Ray cluster here -> no GPU seen
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 1.0})
    assert embedder_resources(args)["num_gpus"] == args.embedder.num_gpus
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert "num_gpus" not in embedder_resources(args)
    required = args.model_copy(update={"embedder": args.embedder.model_copy(update={"gpu": "require"})})
    assert embedder_resources(required)["num_gpus"] == args.embedder.num_gpus


def test_embedder_placement_resources_join_its_cpu_and_gpu_request(monkeypatch):
    import ray

    from ray_router.serve.builder import embedder_resources

    cfg = launch.load_serve_config(REPO / "serve_configs" / "gpu.yaml")
    raw = launch.our_apps(cfg)[0]["args"]
    args = AppArgs.model_validate({**raw, "embedder": {**raw["embedder"], "resources": {"gpu_pool": 0.01}}})
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 1.0})
    opts = embedder_resources(args)
    assert opts == {
        "num_cpus": args.embedder.num_cpus,
        "resources": {"gpu_pool": 0.01},
        "num_gpus": args.embedder.num_gpus,
    }
    with pytest.raises(ValueError):  # a resource amount is a number
        AppArgs.model_validate({**raw, "embedder": {**raw["embedder"], "resources": {"gpu_pool": "a lot"}}})


def _args(**over):
    base = {
        "arms": [{"id": "a", "price_usd": 0.01}, {"id": "b", "price_usd": 0.0}],
        "arm_embeddings": {"file": "/nonexistent.npz"},
        "encoder": {"name": "hash"},
    }
    base.update(over)
    return base


@pytest.mark.parametrize(
    "over, match",
    [
        ({"arms": [{"id": "a", "price_usd": 1}]}, "at least 2"),
        ({"arms": [{"id": "a", "price_usd": 1}, {"id": "a", "price_usd": 2}]}, "duplicate arm ids"),
        ({"arms": [{"id": "router", "price_usd": 1}, {"id": "a", "price_usd": 2}]}, "reserved"),
        ({"arms": [{"id": "a", "price_usd": -1}, {"id": "b", "price_usd": 2}]}, "greater than or equal"),
        ({"arm_embeddings": {}}, "exactly one"),
        ({"arm_embeddings": {"file": "x.txt"}}, ".npy or .npz"),
        ({"policy": {"config": {"no_such_field": 1}}}, "unknown field"),
        ({"policy": {"config": {"eta": -1}}}, r"policy\.config[\s\S]*eta"),
        ({"policy": {"config": {"eta": "1"}}}, r"policy\.config[\s\S]*eta"),  # strict: text is not a number
        ({"arms": [{"id": "a", "price_usd": "0.1"}, {"id": "b", "price_usd": 2}]}, "valid number"),
        ({"typo": 1}, "Extra inputs"),
        (
            {
                "arms": [
                    {"id": "a", "price_usd": 1, "upstream": {"base_url": "ftp://x", "model": "m"}},
                    {"id": "b", "price_usd": 2},
                ]
            },
            "http",
        ),
    ],
)
def test_bad_app_args_are_refused_by_name(over, match):
    with pytest.raises(ValidationError, match=match):
        AppArgs.model_validate(_args(**over))


def test_missing_data_dir_fails_with_a_clear_message(tmp_path):
    args = AppArgs.model_validate(
        _args(arm_embeddings={"from_dataset": {"name": "routerbench", "data_dir": str(tmp_path / "nope")}})
    )
    with pytest.raises(DataError, match=r"data directory .*nope.* does not exist.*RAY_ROUTER_DATA_DIR"):
        resolve_arm_table(args)
    empty = tmp_path / "empty"
    empty.mkdir()
    args = AppArgs.model_validate(
        _args(arm_embeddings={"from_dataset": {"name": "routerbench", "data_dir": str(empty)}})
    )
    with pytest.raises(DataError, match="routerbench: none of"):
        resolve_arm_table(args)


def test_arm_embeddings_from_a_file(tmp_path):
    from ray_router.embeddings import HashEncoder

    ident = HashEncoder().identity
    A = np.arange(64, dtype=np.float64).reshape(2, 32)
    path = save_arm_embeddings(tmp_path / "arms.npz", ["b", "a"], A, ident)  # stored in another order
    table = resolve_arm_table(AppArgs.model_validate(_args(arm_embeddings={"file": str(path)})))
    np.testing.assert_array_equal(table.embeddings, A[[1, 0]])
    assert table.ids == ("a", "b") and table.price_norm.tolist() == [1.0, 0.0]
    save_arm_embeddings(tmp_path / "other.npz", ["a", "b"], A, "another-encoder")
    with pytest.raises(ConfigError, match="computed with encoder"):
        resolve_arm_table(AppArgs.model_validate(_args(arm_embeddings={"file": str(tmp_path / "other.npz")})))
    np.save(tmp_path / "wrong.npy", np.zeros((3, 32)))
    with pytest.raises(DataError, match="arm-table order"):
        resolve_arm_table(AppArgs.model_validate(_args(arm_embeddings={"file": str(tmp_path / "wrong.npy")})))


def test_arm_embeddings_from_the_real_dataset_with_the_stand_in_encoder():
    d = shared_data_dir()
    if d is None:
        pytest.skip("RouterBench data not available")
    cfg = launch.load_serve_config(REPO / "serve_configs" / "local.yaml")
    raw = dict(launch.our_apps(cfg)[0]["args"])
    raw["encoder"] = {"name": "hash"}
    raw["arm_embeddings"] = {"from_dataset": {**raw["arm_embeddings"]["from_dataset"], "data_dir": str(d)}}
    table = resolve_arm_table(AppArgs.model_validate(raw))
    assert table.embeddings.shape == (11, 32) and np.isfinite(table.embeddings).all()
    assert "routerbench" in table.source
    bad = {**raw, "arms": [{"id": "no-such-model", "price_usd": 1}, *raw["arms"][1:]]}
    with pytest.raises(ConfigError, match="no arm"):
        resolve_arm_table(AppArgs.model_validate(bad))


def test_overrides_merge_into_app_args_and_deployments():
    cfg = launch.load_serve_config(REPO / "serve_configs" / "local.yaml")
    out = launch.with_overrides(
        cfg, port=9999, args={"state": {"dir": "/x"}}, deployments={"Posterior": {"health_check_period_s": 1}}
    )
    app = launch.our_apps(out)[0]
    assert out["http_options"]["port"] == 9999 and app["args"]["state"]["dir"] == "/x"
    assert app["args"]["state"]["snapshot_every_n"] == 500  # siblings kept
    assert next(d for d in app["deployments"] if d["name"] == "Posterior")["health_check_period_s"] == 1
    assert launch.our_apps(cfg)[0]["args"]["state"]["dir"] is None  # the input is not modified
    assert launch.app_url(out) == "http://127.0.0.1:9999"


def test_readme_lists_every_exported_metric_name():
    from ray_router.serve.metrics import METRICS, exported_names

    text = (REPO / "serve_configs" / "README.md").read_text()
    for name, exported in exported_names().items():
        assert exported in text, f"serve_configs/README.md does not list {exported}"
        for tag in METRICS[name][1]:
            assert re.search(rf"\b{tag}\b", text)


def test_the_pure_serve_modules_import_neither_ray_nor_torch():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import ray_router.serve, ray_router.serve.config, ray_router.serve.tokens, ray_router.serve.durable, "
        "ray_router.serve.state, ray_router.serve.ranking, ray_router.serve.arms, ray_router.serve.schemas, "
        "ray_router.serve.launch, ray_router.serve.errors, ray_router.serve.decision, ray_router.serve.specs, "
        "ray_router.serve.posterior_service, ray_router.serve.request_body, ray_router.serve.upstream\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.') or m in ('torch', 'sentence_transformers'))\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_deploy_failures_are_reported_by_their_last_error_line():
    msg = (
        "Deploying app 'ray-router' failed with exception:\nTraceback (most recent call last):\n"
        '  File "x.py", line 1, in build\nray_router.errors.DataError: arm_embeddings.from_dataset: data directory '
        "'/nope' does not exist\n"
    )
    assert launch._last_error(msg).startswith("ray_router.errors.DataError: arm_embeddings.from_dataset")


def test_kuberay_pods_run_serve_with_the_local_serve_settings():
    """The RayService's pods get every Serve setting `ray-router serve` applies locally
    (launch.SERVE_ENV_DEFAULTS: throughput-optimised mode, HAProxy on the config's port), with the
    same values, so the cluster's URL is the same fast path as the local one."""
    import yaml

    docs = [d for d in yaml.safe_load_all((REPO / "k8s" / "base" / "rayservice.yaml").read_text()) if d]
    service = next(d for d in docs if d.get("kind") == "RayService")
    spec = service["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    assert len(pods) >= 2
    for pod in pods:
        for container in pod["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            for key, value in launch.SERVE_ENV_DEFAULTS.items():
                assert env.get(key) == value, f"{container['name']}: {key}={env.get(key)!r}, launch uses {value!r}"


def test_a_local_start_gives_haproxy_free_side_ports_of_its_own(monkeypatch):
    """Two local Serve instances must not share HAProxy's machine-wide default stats/metrics ports:
    ports set for an earlier start (here, or in a parent process whose environment a child such as
    `ray-router serve` inherits) are replaced; an operator's choice is kept."""
    for key in (*launch.HAPROXY_PORT_KEYS, launch.HAPROXY_AUTO_MARK):
        monkeypatch.delenv(key, raising=False)
    first = launch.haproxy_instance_env()
    assert set(first) == set(launch.HAPROXY_PORT_KEYS)
    assert all(int(v) not in (8404, 9101) and launch.os.environ[k] == v for k, v in first.items())
    # a child process inherits the environment (ports and mark) and picks its own ports
    child = subprocess.run(
        [sys.executable, "-c", "from ray_router.serve import launch; print(launch.haproxy_instance_env())"],
        capture_output=True,
        text=True,
        env={**launch.os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
        check=True,
    )
    got = ast.literal_eval(child.stdout.strip().splitlines()[-1])
    assert set(got) == set(first), (got, first)  # without the mark they would look like an operator's
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")  # the operator's
    second = launch.haproxy_instance_env()
    assert set(second) == {"RAY_SERVE_HAPROXY_METRICS_PORT"}
    assert launch.os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"


@pytest.mark.parametrize("override", [{"num_replicas": 2}, {"num_replicas": "auto"}, {"autoscaling_config": {}}])
def test_a_config_with_more_than_one_posterior_replica_is_refused(override):
    cfg = launch.load_serve_config(REPO / "serve_configs" / "local.yaml")
    app = launch.our_apps(cfg)[0]
    app["deployments"] = [*(app.get("deployments") or []), {"name": "Posterior", **override}]
    with pytest.raises(ConfigError, match="exactly one replica"):
        launch.validate_config(cfg)
