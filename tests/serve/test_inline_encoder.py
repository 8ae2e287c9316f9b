"""``embedder.mode: inline``: the Ingress encodes in-process (ray_router/serve/inline.py).

Unit part (no Ray): the micro-batcher forms ``@serve.batch``'s windows (what arrives during an
encode is the next window, ``max_batch_size``, the wait), spreads an encode's failure to its window,
drops a cancelled caller; the config checks refuse what cannot work, with the field to change.

Integration part (a real local Serve over real HTTP): an inline app with the hash stand-in answers
routes with no Embedder deployment, encodes in the Ingress's own process with the CPUs the config
gives it, and still sheds a burst past ``limits.max_inflight_routes`` with 503 ``overloaded``; with
the real MiniLM the inline path routes on the vectors the Embedder deployment gives; a remote
encoder is called from the Ingress.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from ray_router.errors import ConfigError
from ray_router.serve.inline import InlineEmbedder, InlineEncoderSpec, MicroBatcher, as_inline, check_app_config
from tests.serve.conftest import REPO, RouterApp, config_args, delete_router, synthetic_arm_args
from tests.serve.helpers import QUERIES, error_code, error_message


# ------------------------------------------------------------------ the micro-batcher
class GatedEncode:
    """``encode(texts)`` that blocks until released, records each window, and returns one row per
    text (the text's length and its position in the window, so a mix-up shows)."""

    def __init__(self) -> None:
        self.windows: list[list[str]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.fail: Exception | None = None

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.windows.append(list(texts))
        self.started.set()
        self.release.wait()
        if self.fail is not None:
            raise self.fail
        return np.array([[len(t), i] for i, t in enumerate(texts)], dtype=np.float32)


async def _spin(n: int = 5) -> None:
    for _ in range(n):  # let the loop run the callers' submits
        await asyncio.sleep(0)


def test_requests_that_arrive_during_an_encode_form_the_next_window():
    async def run():
        enc = GatedEncode()
        mb = MicroBatcher(enc, max_batch_size=3)
        first = asyncio.ensure_future(mb.submit("a"))
        await asyncio.to_thread(enc.started.wait)  # the first window encodes now
        later = [asyncio.ensure_future(mb.submit(t)) for t in ("bb", "ccc", "dddd", "eeeee")]
        await _spin()
        enc.release.set()
        out = await asyncio.wait_for(asyncio.gather(first, *later), 300)
        mb.close()
        return enc.windows, out

    windows, out = asyncio.run(run())
    assert windows == [["a"], ["bb", "ccc", "dddd"], ["eeeee"]]  # at most max_batch_size, in arrival order
    assert [int(x[0]) for x, _, _ in out] == [1, 2, 3, 4, 5]  # each caller gets its own row
    assert [n for _, _, n in out] == [1, 3, 3, 3, 1]
    assert all(s >= 0 for _, s, _ in out)


def test_a_wait_holds_the_window_open_until_it_is_full():
    async def run():
        enc = GatedEncode()
        enc.release.set()
        mb = MicroBatcher(enc, max_batch_size=2, wait_s=3600.0)  # only a full window ends the wait
        first = asyncio.ensure_future(mb.submit("a"))
        await _spin()
        second = asyncio.ensure_future(mb.submit("bb"))
        out = await asyncio.wait_for(asyncio.gather(first, second), 300)
        mb.close()
        return enc.windows, out

    windows, out = asyncio.run(run())
    assert windows == [["a", "bb"]]
    assert [n for _, _, n in out] == [2, 2]


def test_an_encode_failure_goes_to_its_window_only():
    async def run():
        enc = GatedEncode()
        mb = MicroBatcher(enc, max_batch_size=8)
        enc.fail = RuntimeError("model broke")
        first = asyncio.ensure_future(mb.submit("a"))
        await asyncio.to_thread(enc.started.wait)
        enc.release.set()
        with pytest.raises(RuntimeError, match="model broke"):
            await asyncio.wait_for(first, 300)
        enc.fail = None
        ok = await asyncio.wait_for(mb.submit("bb"), 300)
        mb.close()
        return ok

    x, _, n = asyncio.run(run())
    assert int(x[0]) == 2 and n == 1


def test_a_cancelled_caller_leaves_its_window():
    async def run():
        enc = GatedEncode()
        mb = MicroBatcher(enc, max_batch_size=8)
        first = asyncio.ensure_future(mb.submit("a"))
        await asyncio.to_thread(enc.started.wait)
        gone = asyncio.ensure_future(mb.submit("gone"))
        kept = asyncio.ensure_future(mb.submit("kept"))
        await _spin()
        gone.cancel()
        enc.release.set()
        out = await asyncio.wait_for(asyncio.gather(first, kept), 300)
        mb.close()
        return enc.windows, out

    windows, out = asyncio.run(run())
    assert windows == [["a"], ["kept"]]
    assert [n for _, _, n in out] == [1, 1]


def test_a_lone_query_encodes_on_the_loop_thread_and_a_window_on_the_encoder_thread():
    """``single_on_loop``: a window of one is encoded by the event loop's own thread (no hand-over);
    the queries that arrive while a thread window encodes still form the next window, on the
    encoder thread; the counters say how many of each and how long the encoder was busy."""
    threads: list[tuple[str, int]] = []  # (thread name, window size) per window
    gate = threading.Event()

    def encode(texts: list[str]) -> np.ndarray:
        threads.append((threading.current_thread().name, len(texts)))
        if len(texts) > 1 or texts[0] == "slow":
            gate.wait()  # hold the encoder thread's window until the test has queued the next ones
        return np.array([[len(t)] for t in texts], dtype=np.float32)

    async def run():
        loop_thread = threading.current_thread().name
        mb = MicroBatcher(encode, max_batch_size=8, single_on_loop=True)
        alone = await asyncio.wait_for(mb.submit("a"), 300)  # a lone query: on the loop's thread
        # two at once form a window of two: the encoder thread; what arrives meanwhile is the next window
        pair = [asyncio.ensure_future(mb.submit(t)) for t in ("bb", "ccc")]
        while len(threads) < 2:
            await asyncio.sleep(0.01)
        later = [asyncio.ensure_future(mb.submit(t)) for t in ("dddd", "eeeee", "ffffff")]
        await _spin()
        gate.set()
        out = await asyncio.wait_for(asyncio.gather(*pair, *later), 300)
        mb.close()
        return loop_thread, mb, alone, out

    loop_thread, mb, alone, out = asyncio.run(run())
    assert threads[0] == (loop_thread, 1) and int(alone[0][0]) == 1 and alone[2] == 1
    assert [n for _, n in threads[1:]] == [2, 3]
    assert all(name.startswith("inline-encoder") for name, _ in threads[1:])
    assert [int(x[0]) for x, _, _ in out] == [2, 3, 4, 5, 6]
    assert (mb.windows, mb.on_loop, mb.queries) == (3, 1, 6) and mb.busy_s > 0


def test_single_on_loop_off_keeps_every_window_on_the_encoder_thread():
    names: list[str] = []

    def encode(texts: list[str]) -> np.ndarray:
        names.append(threading.current_thread().name)
        return np.ones((len(texts), 1), dtype=np.float32)

    async def run():
        mb = MicroBatcher(encode, single_on_loop=False)
        await asyncio.wait_for(mb.submit("a"), 300)
        mb.close()
        return mb

    mb = asyncio.run(run())
    assert names[0].startswith("inline-encoder") and mb.on_loop == 0 and mb.windows == 1


def test_the_inline_encoder_checks_the_arm_tables_identity():
    from ray_router.embeddings import get_encoder
    from ray_router.embeddings.spec import EncoderSpec

    ident = get_encoder("hash", cache_dir=False).identity
    with pytest.raises(ConfigError, match="the arm table was built with 'minilm-x'"):
        InlineEmbedder(InlineEncoderSpec(EncoderSpec(name="hash"), "minilm-x"))
    emb = InlineEmbedder(InlineEncoderSpec(EncoderSpec(name="hash"), ident))
    try:
        x, _, n = asyncio.run(emb.embed("hello"))
        np.testing.assert_allclose(x, get_encoder("hash", cache_dir=False).encode(["hello"])[0])
        assert n == 1
        info = asyncio.run(emb.info())
        assert info["mode"] == "inline" and info["identity"] == ident and info["windows"] == 1
        assert info["single_on_loop"] is True and info["windows_on_loop"] == 1  # a local encoder: on by default
        assert info["queries"] == 1 and info["busy_s"] >= 0
    finally:
        emb.close()


# ---------------------------------------------------------------------- the config
def _args(**embedder: Any) -> dict[str, Any]:
    return {**config_args(), "embedder": {**config_args()["embedder"], **embedder}}


def test_mode_is_validated():
    from ray_router.serve.config import AppArgs

    assert AppArgs.model_validate(_args()).embedder.mode == "deployment"  # the default
    assert AppArgs.model_validate(_args(mode="inline")).embedder.mode == "inline"
    with pytest.raises(ValidationError, match=r"embedder\.mode"):
        AppArgs.model_validate(_args(mode="inlined"))
    with pytest.raises(ValidationError, match=r"inline runs the encoder in the Ingress: give it CPUs"):
        AppArgs.model_validate(_args(mode="inline", num_cpus=0))
    # a remote encoder only waits on HTTP: an Ingress without reserved CPUs may call it
    remote = {**_args(mode="inline", num_cpus=0), "encoder": {"name": "openai:m@http://127.0.0.1:9/v1"}}
    assert AppArgs.model_validate(remote).embedder.num_cpus == 0


def _local() -> dict[str, Any]:
    from ray_router.serve import launch

    return launch.load_serve_config(REPO / "serve_configs" / "local.yaml")


def test_an_inline_config_must_not_list_an_embedder_or_starve_the_ingress():
    from ray_router.serve import launch

    cfg = launch.with_overrides(_local(), args={"embedder": {"mode": "inline"}})
    with pytest.raises(ConfigError, match="there is no Embedder deployment: remove its entry"):
        launch.validate_config(cfg)
    app = launch.our_apps(cfg)[0]
    app["deployments"] = [d for d in app["deployments"] if d["name"] != "Embedder"]
    with pytest.raises(ConfigError, match=r"ray_actor_options gives it 0 CPUs \(embedder.num_cpus: 1\)"):
        launch.validate_config(cfg)
    ingress = next(d for d in app["deployments"] if d["name"] == "Ingress")
    ingress["ray_actor_options"] = {"num_cpus": 1}  # an operator's own, enough
    launch.validate_config(cfg)
    gpu = launch.with_overrides(cfg, args={"embedder": {"num_gpus": 1, "gpu": "auto"}})
    with pytest.raises(ConfigError, match=r"ray_actor_options asks no GPU \(embedder.num_gpus: 1\)"):
        launch.validate_config(gpu)
    launch.validate_config(launch.with_overrides(gpu, deployments={"Ingress": {"ray_actor_options": {"num_gpus": 1}}}))
    check_app_config(launch.our_apps(_local())[0])  # deployment mode: nothing to check


@pytest.mark.parametrize("name", ["local.yaml", "gpu.yaml"])
def test_as_inline_converts_a_shipped_config(name):
    from ray_router.serve import launch

    base = launch.load_serve_config(REPO / "serve_configs" / name)
    cfg = as_inline(base)
    launch.validate_config(cfg)
    app, old = launch.our_apps(cfg)[0], launch.our_apps(base)[0]
    assert {d["name"] for d in app["deployments"]} == {"Ingress", "Posterior"}
    assert "ray_actor_options" not in next(d for d in app["deployments"] if d["name"] == "Ingress")
    live = next(d for d in old["deployments"] if d["name"] == "Embedder")["user_config"]
    emb = app["args"]["embedder"]
    assert emb["mode"] == "inline" and emb["max_batch_size"] == live["max_batch_size"]
    assert emb["num_cpus"] == old["args"]["embedder"]["num_cpus"]
    assert launch.our_apps(base)[0]["deployments"] == old["deployments"]  # the input is not changed


# ------------------------------------------------------------------- on real Serve
ADMIT = 4  # limits.max_inflight_routes of the shedding app
INGRESS_CPUS = 0.5


def deploy_inline(cluster, state_dir: Path, arm_table: dict, args: dict | None = None) -> RouterApp:
    """local.yaml as an inline app (:func:`as_inline`), with ``arm_table`` and ``args`` merged in."""
    from ray_router.serve import launch
    from ray_router.yamlio import deep_merge

    base = _local()
    for app in launch.our_apps(base):
        app["args"] = {**app["args"], **arm_table}
    merged = deep_merge({"state": {"dir": str(state_dir)}, "embedder": {"num_cpus": INGRESS_CPUS}}, args or {})
    cfg = launch.with_overrides(as_inline(base), port=cluster.http_port, args=merged)
    url = launch.deploy(cfg, timeout_s=600)
    return RouterApp(url=url, state_dir=state_dir, cluster=cluster, config=cfg)


def _batch(r: httpx.Response) -> int:
    return int(r.headers["server-timing"].split("batch of ")[1].split('"')[0])


async def _burst(url: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=n)) as c:
        return list(await asyncio.gather(*(c.post("/v1/route", json={"query": f"burst {i}"}) for i in range(n))))


@pytest.fixture(scope="module")
def hash_app(serve_cluster, tmp_path_factory):
    # windows wait 0.5 s for company, so a burst holds many routes in the ingress at once
    app = deploy_inline(
        serve_cluster,
        tmp_path_factory.mktemp("inline-state"),
        synthetic_arm_args(tmp_path_factory.mktemp("inline-arms")),
        args={"limits": {"max_inflight_routes": ADMIT}, "embedder": {"batch_wait_timeout_s": 0.5}},
    )
    yield app
    delete_router()


@pytest.mark.integration
def test_inline_routes_are_encoded_in_the_ingress_with_its_cpus(hash_app):
    from ray import serve

    with httpx.Client(base_url=hash_app.url, timeout=120) as c:
        for q in QUERIES[:3]:
            r = c.post("/v1/route", json={"query": q, "mode": "duel"})
            assert r.status_code == 200, r.text
            assert len(r.json()["arms"]) == 2 and _batch(r) == 1
        status = c.get("/v1/admin/status", headers=hash_app.admin).json()
    emb = status["embedder"]
    assert emb["mode"] == "inline" and emb["pid"] == status["ingress"]["pid"]  # the Ingress's own process
    assert emb["resources"].get("CPU") == INGRESS_CPUS  # the config's CPUs, reserved for the Ingress
    assert emb["batch_wait_timeout_s"] == 0.5 and emb["windows"] >= 3
    deployments = set(serve.status().applications["ray-router"].deployments)
    assert deployments == {"Ingress", "Posterior"}


@pytest.mark.integration
def test_inline_routes_past_the_admission_limit_are_shed_with_503(hash_app):
    from tests.serve.conftest import wait_for

    seen: list[httpx.Response] = []

    def shed() -> bool:
        seen.extend(asyncio.run(_burst(hash_app.url, 24)))
        return any(r.status_code == 503 for r in seen)

    wait_for(shed, timeout_s=120, interval_s=0.0, what="a 503 in bursts of 24 concurrent routes")
    assert {r.status_code for r in seen} <= {200, 503}
    ok = [r for r in seen if r.status_code == 200]
    assert ok and max(_batch(r) for r in ok) > 1  # the admitted routes shared windows
    for r in seen:
        if r.status_code == 503:
            body = r.json()
            assert error_code(body) == "overloaded" and "max_inflight_routes" in error_message(body), body
            assert body["error"]["type"] == "server_error" and r.headers["retry-after"] == "1"
    assert httpx.post(f"{hash_app.url}/v1/route", json={"query": "after"}, timeout=60).status_code == 200


MIXED = [
    *QUERIES,
    "Summarise the plot of Hamlet in two sentences, naming the main characters and how it ends. " * 3,
    "Is 91 prime?",
]


@pytest.mark.integration
def test_inline_minilm_routes_on_the_embedder_deployments_vectors(serve_cluster, tmp_path_factory):
    """The real MiniLM: the vectors the Embedder deployment gives are the inline encoder's (windows
    of concurrent queries, length-aware), and the deployed inline app routes each query as the
    deployment-mode app does (single mode, fresh states: the same posterior)."""
    from ray.serve.handle import DeploymentHandle

    from ray_router.embeddings.spec import EncoderSpec
    from tests.serve.conftest import deploy_router

    arms = synthetic_arm_args(tmp_path_factory.mktemp("minilm-arms"), encoder="minilm")

    def single_routes(url: str) -> list[tuple[str, int]]:
        with httpx.Client(base_url=url, timeout=120) as c:
            out = []
            for q in MIXED:
                r = c.post("/v1/route", json={"query": q, "mode": "single", "cost_weight": 0.3})
                assert r.status_code == 200, r.text
                out.append((r.json()["model"], r.json()["posterior_version"]))
            return out

    async def by_handle() -> list:
        handle = DeploymentHandle("Embedder", "ray-router")
        try:
            return await asyncio.gather(*(handle.embed.remote(q) for q in MIXED))
        finally:
            await handle.shutdown_async()

    app = deploy_router(serve_cluster, tmp_path_factory.mktemp("minilm-dep"), arms)
    try:
        deployed = np.vstack([x for x, _, _ in asyncio.run(by_handle())])
        routes_dep = single_routes(app.url)
    finally:
        delete_router()

    inline = InlineEmbedder(InlineEncoderSpec(EncoderSpec(**arms["encoder"]), _minilm_identity()))

    async def concurrently() -> list:
        return await asyncio.gather(*(inline.embed(q) for q in MIXED))

    try:
        got = asyncio.run(concurrently())
    finally:
        inline.close()
    assert max(n for _, _, n in got) > 1  # windows of several, split length-aware
    np.testing.assert_allclose(np.vstack([x for x, _, _ in got]), deployed, atol=1e-5)

    app = deploy_inline(serve_cluster, tmp_path_factory.mktemp("minilm-inline"), arms)
    try:
        routes_inline = single_routes(app.url)
        with httpx.Client(base_url=app.url, timeout=120) as c:
            emb = c.get("/v1/admin/status", headers=app.admin).json()["embedder"]
    finally:
        delete_router()
    assert emb["mode"] == "inline" and emb["identity"] == _minilm_identity() and "torch" in emb["model_libraries"]
    assert routes_inline == routes_dep


def _minilm_identity() -> str:
    from ray_router.embeddings import get_encoder

    return get_encoder("minilm", cache_dir=False).identity


@pytest.mark.integration
def test_inline_with_a_remote_encoder_calls_the_server_from_the_ingress(serve_cluster, tmp_path_factory):
    from tests.serve.test_openai_embedder_serve import arm_table
    from tests.stub_embeddings import MODEL, EmbeddingsStub

    with EmbeddingsStub() as stub:
        name = f"openai:{MODEL}@{stub.base_url}"
        table = {
            "arm_embeddings": arm_table(tmp_path_factory.mktemp("remote-arms"), name, 384),
            "encoder": {"name": name, "openai": {"max_retries": 1, "backoff_s": 0.05, "timeout_s": 20.0}},
        }
        app = deploy_inline(
            serve_cluster, tmp_path_factory.mktemp("remote-state"), table, {"embedder": {"num_cpus": 0}}
        )
        try:
            with httpx.Client(base_url=app.url, timeout=120) as c:
                before = len(stub.requests)
                r = c.post("/v1/route", json={"query": QUERIES[0], "mode": "single"})
                assert r.status_code == 200, r.text
                sent = [t for q in stub.requests[before:] if q["path"] == "/v1/embeddings" for t in q["body"]["input"]]
                assert sent == [QUERIES[0]]
                stub.fail_next(503, times=2, message="embedding backend down")  # the attempt and its retry
                r = c.post("/v1/route", json={"query": "Will this be embedded?", "mode": "single"})
                assert r.status_code == 502 and error_code(r.json()) == "embeddings_error", r.text
                assert stub.base_url not in r.text and "127.0.0.1" not in r.text
                status = c.get("/v1/admin/status", headers=app.admin).json()
        finally:
            delete_router()
    emb = status["embedder"]
    assert emb["mode"] == "inline" and emb["device"] == "remote" and emb["pid"] == status["ingress"]["pid"]
    assert "CPU" not in emb["resources"] or emb["resources"]["CPU"] == 0
    # a remote encoder's call must not block the event loop: never on the loop's thread
    assert emb["single_on_loop"] is False and emb["windows_on_loop"] == 0 and emb["windows"] >= 1


def test_the_reserved_resources_of_a_driver_are_none(serve_cluster):
    """In a process that called ``ray.init`` (a driver, e.g. this test process once any Serve test ran)
    Ray reserves nothing: the inline embedder's info says {} (Ray's own call asserts worker mode)."""
    import ray

    from ray_router.serve.inline import _assigned_resources

    assert ray.is_initialized() and _assigned_resources() == {}
