"""A Serve deployment whose encoder is an OpenAI-compatible embeddings server (real HTTP on loopback:
tests/stub_embeddings.py, computing real all-MiniLM-L6-v2 vectors): the Embedder replica loads no
model, routes embed each query through the server (a batch window in one request), the vectors it
routes on are the local model's, and a failing server is a 502 that names no internals."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from tests.serve.conftest import config_args, delete_router, deploy_router
from tests.serve.helpers import QUERIES as HELPER_QUERIES
from tests.stub_embeddings import MODEL, EmbeddingsStub

pytestmark = pytest.mark.integration

QUERIES = [*HELPER_QUERIES, "Summarise the plot of Hamlet in two sentences.", "Is 91 prime?"]


@pytest.fixture(scope="module")
def stub():
    with EmbeddingsStub() as s:
        yield s


def arm_table(directory, identity: str, dim: int, seed: int = 0) -> dict:
    """The shipped configs' arms with seeded unit embeddings in the remote encoder's space."""
    from ray_router.serve.arms import save_arm_embeddings

    ids = [a["id"] for a in config_args()["arms"]]
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(len(ids), dim))
    path = save_arm_embeddings(directory / "arms.npz", ids, A / np.linalg.norm(A, axis=1, keepdims=True), identity)
    return {"file": str(path)}


@pytest.fixture(scope="module")
def app(serve_cluster, stub, tmp_path_factory):
    name = f"openai:{MODEL}@{stub.base_url}"
    encoder = {"name": name, "openai": {"max_retries": 2, "backoff_s": 0.05, "timeout_s": 20.0}}
    app = deploy_router(
        serve_cluster,
        tmp_path_factory.mktemp("openai-emb-state"),
        {"arm_embeddings": arm_table(tmp_path_factory.mktemp("openai-emb-arms"), name, 384), "encoder": encoder},
        args={"embedder": {"num_cpus": 0.25}},  # a remote encoder computes nothing in the replica
    )
    yield app
    delete_router()


@pytest.fixture(scope="module")
def client(app):
    with httpx.Client(base_url=app.url, timeout=120) as c:
        yield c


def test_the_embedder_replica_uses_the_server_and_loads_no_model(client, app, stub):
    status = client.get("/v1/admin/status", headers=app.admin)
    assert status.status_code == 200, status.text
    info = status.json()["embedder"]
    assert info["identity"] == f"openai:{MODEL}@{stub.base_url}" and info["device"] == "remote"
    assert info["model_libraries"] == [], "no torch, sentence-transformers or onnxruntime in the replica"
    assert info["length_aware"] is False  # no tokenizer: one request per batch window


def test_routes_embed_each_query_through_the_server(client, stub):
    before = len(stub.requests)
    for q in QUERIES[:3]:
        r = client.post("/v1/route", json={"query": q, "mode": "single"})
        assert r.status_code == 200, r.text
        assert r.json()["model"] in {a["id"] for a in config_args()["arms"]}
    sent = [t for r in stub.requests[before:] if r["path"] == "/v1/embeddings" for t in r["body"]["input"]]
    assert sent == QUERIES[:3]


def test_the_replicas_vectors_are_the_local_models(app, stub):
    """What the Embedder deployment hands the ingress for a query is MiniLM's own vector."""
    from ray.serve.handle import DeploymentHandle

    from ray_router.embeddings import get_encoder

    async def embed() -> list:
        handle = DeploymentHandle("Embedder", "ray-router")
        try:
            return await asyncio.gather(*(handle.embed.remote(q) for q in QUERIES[:4]))
        finally:
            await handle.shutdown_async()

    got = np.vstack([x for x, _, _ in asyncio.run(embed())])
    local = get_encoder("minilm", cache_dir=False, device="cpu").encode(QUERIES[:4])
    np.testing.assert_allclose(got, local, atol=1e-6)


def test_concurrent_routes_share_a_batch_window_in_one_request(app, stub):
    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=app.url, timeout=120) as c:
            rs = await asyncio.gather(*(c.post("/v1/route", json={"query": q, "mode": "single"}) for q in QUERIES))
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
        return [int(r.headers["server-timing"].split("batch of ")[1].split('"')[0]) for r in rs]

    for _ in range(3):  # a window may hold one call: repeat until one held several
        before = len(stub.requests)
        sizes = asyncio.run(burst())
        if max(sizes) > 1:
            break
    inputs = [r["body"]["input"] for r in stub.requests[before:] if r["path"] == "/v1/embeddings"]
    assert max(sizes) > 1 and max(len(i) for i in inputs) == max(sizes), (sizes, [len(i) for i in inputs])
    assert sorted(t for i in inputs for t in i) == sorted(QUERIES)  # each query embedded once


def test_a_failing_server_is_a_502_without_internals_then_recovers(client, stub):
    stub.fail_next(503, times=3, message="embedding backend down")  # the first attempt and both retries
    r = client.post("/v1/route", json={"query": "Will this be embedded?", "mode": "single"})
    assert r.status_code == 502, r.text
    err = r.json()["error"]
    code = err["code"] if isinstance(err, dict) else err
    message = err["message"] if isinstance(err, dict) else r.json()["message"]
    assert code == "embeddings_error" and "could not be embedded" in message
    assert stub.base_url not in r.text and "127.0.0.1" not in r.text
    ok = client.post("/v1/route", json={"query": "Will this be embedded?", "mode": "single"})
    assert ok.status_code == 200, ok.text


def test_arm_embeddings_of_another_dimension_are_a_clear_error(stub, tmp_path):
    from ray_router.errors import ConfigError
    from ray_router.serve.arms import resolve_arm_table
    from ray_router.serve.config import AppArgs

    name = f"openai:{MODEL}@{stub.base_url}"
    args = {**config_args(), "arm_embeddings": arm_table(tmp_path, name, 16), "encoder": {"name": name}}
    with pytest.raises(ConfigError, match=r"arm embeddings have dim 16, the encoder 'openai:.*' gives 384"):
        resolve_arm_table(AppArgs.model_validate(args))
