"""The OpenAI-compatible encoder (ray_router/embeddings/openai_encoder.py) against a real HTTP
server on loopback (tests/stub_embeddings.py) that computes REAL all-MiniLM-L6-v2 embeddings:
same vectors as the local model, the on-disk cache, retries and refusals, the spec syntax, and
the CLI (``ray-router evaluate --encoder openai:...``) and a sweep's preparation end to end."""

from __future__ import annotations

import email.utils
import json
import os
import socket
import time
import types
from pathlib import Path

import numpy as np
import pytest

from ray_router.embeddings import CachedEncoder, EmbeddingCache, get_encoder
from ray_router.embeddings import openai_encoder as oe
from ray_router.embeddings.openai_encoder import DEFAULT_API_KEY_ENV, OpenAIEncoder, RemoteEncoderError
from ray_router.embeddings.spec import EncoderSpec
from ray_router.errors import ConfigError
from tests.stub_embeddings import MODEL, EmbeddingsStub, load_minilm

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration

TEXTS = [
    "Is 91 prime?",
    "Write a Python function that returns the n-th Fibonacci number using memoization.",
    "Which of the following is a renewable energy source? (A) coal (B) natural gas (C) wind (D) oil",
    "Résumé of the Ünïcödé tokenizer: 東京 is in Japan 😀\twith tabs\nand newlines",
    "Summarise the plot of Hamlet in three sentences. " * 40,  # > 256 tokens: the server truncates
    "a",
    "Is 91 prime?",  # a repeat
]


@pytest.fixture(scope="module")
def st_model():
    return load_minilm()


@pytest.fixture(scope="module")
def local(st_model):
    return get_encoder("minilm", cache_dir=False, device="cpu")


@pytest.fixture()
def stub(st_model):
    with EmbeddingsStub(model=st_model) as s:
        yield s


@pytest.fixture()
def waits(monkeypatch) -> list[float]:
    """The encoder's backoff waits, recorded instead of slept (the module's ``time.sleep`` only)."""
    out: list[float] = []
    monkeypatch.setattr(oe, "time", types.SimpleNamespace(sleep=out.append, time=time.time))
    return out


def spec_of(stub: EmbeddingsStub, **options) -> str:
    opts = ",".join(f"{k}={v}" for k, v in options.items())
    return f"openai:{stub.model}@{stub.base_url}" + (f"#{opts}" if opts else "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- (a) same vectors
def test_same_embeddings_as_the_local_model_batched_and_in_order(stub, local):
    enc = get_encoder(spec_of(stub, max_batch_size=3), cache_dir=False)
    X = enc.encode(TEXTS)
    ref = local.encode(TEXTS)
    assert X.dtype == np.float32 and X.shape == (len(TEXTS), 384) and enc.dim == 384
    np.testing.assert_allclose(X, ref, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-6)
    bodies = [r["body"] for r in stub.requests]
    assert [len(b["input"]) for b in bodies] == [3, 3, 1], "batched at max_batch_size"
    assert all(b["model"] == MODEL and "dimensions" not in b for b in bodies)
    # encode's batch_size makes the requests smaller, never larger than max_batch_size
    stub.reset()
    enc.encode(TEXTS[:4], batch_size=2)
    enc.encode(TEXTS[:4], batch_size=100)
    assert [len(r["body"]["input"]) for r in stub.requests] == [2, 2, 3, 1]


def test_rows_are_put_back_by_index_and_normalised_like_the_local_encoder(stub, local):
    stub.reverse, stub.scale = True, 7.5  # data listed backwards, vectors not unit length
    X = get_encoder(spec_of(stub), cache_dir=False).encode(TEXTS)
    assert stub.requests[-1]["body"]["input"] == TEXTS  # one request, and the answer came reversed
    np.testing.assert_allclose(X, local.encode(TEXTS), atol=1e-6)


# --------------------------------------------------------------------------------- (b) cache
def test_second_run_encodes_nothing(stub, local, tmp_path):
    first = get_encoder(spec_of(stub, max_batch_size=4), cache_dir=tmp_path)
    assert isinstance(first, CachedEncoder)
    X1 = first.encode(TEXTS)
    n_requests = stub.n_embedding_requests
    assert n_requests >= 2 and first.n_encoded == len(set(TEXTS))
    again = get_encoder(spec_of(stub, max_batch_size=4), cache_dir=tmp_path)  # a fresh run
    X2 = again.encode(TEXTS)
    assert stub.n_embedding_requests == n_requests, "the second run sent a request"
    assert again.n_encoded == 0 and again.n_hits == len(TEXTS) and again.dim == 384
    np.testing.assert_array_equal(X1, X2)
    np.testing.assert_allclose(X2, local.encode(TEXTS), atol=1e-6)


def test_identity_is_url_and_model_and_never_the_key(stub, tmp_path, monkeypatch):
    secret = "sk-test-secret-0123456789"
    monkeypatch.setenv(DEFAULT_API_KEY_ENV, secret)
    a = get_encoder(spec_of(stub), cache_dir=tmp_path)
    assert a.identity == f"openai:{MODEL}@{stub.base_url}"
    a.encode(TEXTS[:2])
    assert stub.requests[-1]["auth"] == f"Bearer {secret}"  # sent, from the environment
    # another server address (same server, other host name), another model, or dimensions: other identities
    other_url = get_encoder(f"openai:{MODEL}@{stub.base_url.replace('127.0.0.1', 'localhost')}/", cache_dir=False)
    other_model = get_encoder(f"openai:text-embedding-3-small@{stub.base_url}", cache_dir=False)
    shortened = get_encoder(spec_of(stub, dimensions=256), cache_dir=False)
    ids = {a.identity, other_url.identity, other_model.identity, shortened.identity}
    assert len(ids) == 4 and shortened.identity.endswith(":dimensions=256")
    cache = EmbeddingCache(tmp_path)
    assert len({cache.directory(i) for i in ids}) == 4
    # the other address does not reuse the first one's vectors: it asks its server
    before = stub.n_embedding_requests
    get_encoder(other_url.identity, cache_dir=tmp_path).encode(TEXTS[:2])
    assert stub.n_embedding_requests > before
    for text in (a.identity, repr(a), repr(a.encoder), json.dumps(a.encoder.__getstate__(), default=str)):
        assert secret not in text
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or secret.encode() not in path.read_bytes()


# -------------------------------------------------------------------------- (c) retries
def test_retries_429_and_500_honouring_retry_after_then_succeeds(stub, local, waits):
    enc = get_encoder(spec_of(stub, max_retries=3, backoff_s=0.25), cache_dir=False)
    stub.fail_next(429, retry_after="2")
    stub.fail_next(500, message="upstream hiccup")
    X = enc.encode(TEXTS[:3])
    np.testing.assert_allclose(X, local.encode(TEXTS[:3]), atol=1e-6)
    assert stub.n_embedding_requests == 3 and enc.n_requests == 3
    assert waits[0] == 2.0, "Retry-After is honoured"
    assert 0.25 <= waits[1] <= 0.5, "no Retry-After: exponential backoff (second retry: 2 x 0.25 s, jittered)"


def test_retry_after_is_capped_and_read_as_a_date(stub, waits):
    enc = get_encoder(spec_of(stub, max_retries=3, max_backoff_s=1.5), cache_dir=False)
    stub.fail_next(429, retry_after="3600")
    stub.fail_next(503, retry_after=email.utils.formatdate(time.time() + 1000, usegmt=True))
    enc.encode(TEXTS[:1])
    assert waits == [1.5, 1.5]


def test_gives_up_after_the_last_attempt_with_a_clear_error(stub, waits):
    enc = get_encoder(spec_of(stub, max_retries=2, backoff_s=0.1), cache_dir=False)
    stub.fail_next(503, times=3, message="overloaded, try later")
    with pytest.raises(
        RemoteEncoderError, match=r"no embeddings after 3 attempt\(s\).*HTTP 503: overloaded, try later"
    ):
        enc.encode(TEXTS[:2])
    assert stub.n_embedding_requests == 3 and len(waits) == 2
    assert 0.05 <= waits[0] <= 0.1 <= waits[1] <= 0.2, "the backoff doubles (with jitter)"


def test_400_is_not_retried_and_carries_the_servers_message(stub, waits):
    enc = get_encoder(spec_of(stub, max_retries=4), cache_dir=False)
    stub.fail_next(400, message="This model's maximum context length is 512 tokens")
    with pytest.raises(RemoteEncoderError, match=r"HTTP 400 .*not retried.*maximum context length is 512"):
        enc.encode(TEXTS[:2])
    assert stub.n_embedding_requests == 1 and waits == []
    # a real refusal of the stub: an unknown model is a 404 with OpenAI's message
    with pytest.raises(RemoteEncoderError, match="The model `no-such-model` does not exist"):
        get_encoder(f"openai:no-such-model@{stub.base_url}", cache_dir=False).encode(["x"])
    assert stub.n_embedding_requests == 2


def test_timeouts_and_connection_errors_are_retried(stub, local, waits):
    enc = get_encoder(spec_of(stub, timeout_s=0.5, max_retries=2), cache_dir=False)
    stub.delay_next(2.0)
    np.testing.assert_allclose(enc.encode(TEXTS[:2]), local.encode(TEXTS[:2]), atol=1e-6)
    assert stub.n_embedding_requests == 2 and len(waits) == 1
    dead = get_encoder(f"openai:{MODEL}@http://127.0.0.1:{free_port()}/v1#max_retries=2", cache_dir=False)
    with pytest.raises(RemoteEncoderError, match=r"after 3 attempt\(s\).*connection error"):
        dead.encode(["x"])


def test_api_key_variable_and_a_wrong_key(st_model, monkeypatch, waits):
    with EmbeddingsStub(model=st_model, api_key="right-key") as stub:
        monkeypatch.setenv("RR_TEST_EMB_KEY", "right-key")
        enc = get_encoder(spec_of(stub, api_key_env="RR_TEST_EMB_KEY"), cache_dir=False)
        assert enc.encode(["x"]).shape == (1, 384) and stub.requests[-1]["auth"] == "Bearer right-key"
        monkeypatch.setenv(DEFAULT_API_KEY_ENV, "wrong-key")
        with pytest.raises(RemoteEncoderError, match=r"HTTP 401.*Incorrect API key") as err:
            get_encoder(spec_of(stub), cache_dir=False).encode(["x"])
        assert "wrong-key" not in str(err.value) and waits == []
    monkeypatch.delenv("RR_TEST_EMB_KEY")
    with pytest.raises(ConfigError, match=r"api_key_env names \$RR_TEST_EMB_KEY, which is not set"):
        get_encoder("openai:m@http://127.0.0.1:1/v1#api_key_env=RR_TEST_EMB_KEY", cache_dir=False)


def test_dim_option_and_a_server_that_changes_its_dimension(stub):
    assert OpenAIEncoder(MODEL, stub.base_url, dim=384).dim == 384 and stub.n_embedding_requests == 0
    wrong = OpenAIEncoder(MODEL, stub.base_url, dim=100)
    with pytest.raises(RemoteEncoderError, match="returned 384-d vectors, expected 100-d"):
        wrong.encode(["x"])
    probe = OpenAIEncoder(MODEL, stub.base_url)
    assert probe.dim == 384 and stub.n_embedding_requests == 2  # the first answer sets it
    with pytest.raises(RemoteEncoderError, match="does not support specifying dimensions"):
        OpenAIEncoder(MODEL, stub.base_url, dimensions=64).encode(["x"])  # sent, and refused by this model


# ---------------------------------------------------------------------------- spec syntax
@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"name": "openai:text-embedding-3-small"}, "expected openai:MODEL@URL"),
        ({"name": "openai:@http://h/v1"}, "expected openai:MODEL@URL"),
        ({"name": "openai:m@ftp://h/v1"}, "is not an http"),
        ({"name": "openai:m@http://user:pw@h/v1"}, "no credentials in the URL"),
        ({"name": "openai:m@http://h/v1?x=1"}, "no query string"),
        ({"name": "openai:m@http://h/v1#max_batch_size=zero"}, "max_batch_size"),
        ({"name": "openai:m@http://h/v1#colour=blue"}, "colour"),
        ({"name": "openai:m@http://h/v1", "openai": {"max_retries": -1}}, "max_retries"),
        ({"name": "openai:m@http://h/v1", "backend": "onnx"}, "options of a local model"),
        ({"name": "minilm", "openai": {"timeout_s": 5.0}}, "needs name: openai:MODEL@URL"),
    ],
)
def test_bad_specs_are_config_errors(spec, match):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=match):
        EncoderSpec(**spec)


def test_spec_options_the_block_wins_and_get_encoder_takes_them():
    s = EncoderSpec(
        name="openai:m@http://127.0.0.1:1/v1/#max_batch_size=16,timeout_s=2.5",
        openai={"timeout_s": 9.0, "api_key_env": "PATH"},
    )
    assert s.remote and s.encoder_options() == {"timeout_s": 9.0, "api_key_env": "PATH"}
    enc = get_encoder(s.name, cache_dir=False, device=s.device, **s.encoder_options())
    assert enc.options.max_batch_size == 16 and enc.options.timeout_s == 9.0 and enc.api_key_env == "PATH"
    assert enc.identity == "openai:m@http://127.0.0.1:1/v1" and enc.device == "remote"
    assert not EncoderSpec().remote


def test_ccft_cannot_fine_tune_a_remote_encoder(tmp_path):
    from ray_router.embeddings.ccft import fine_tune
    from ray_router.tune.prepare import prepare
    from ray_router.tune.spec import parse_sweep
    from tests.tune.conftest import sweep_dict, write_synthetic_table

    remote = "openai:m@http://127.0.0.1:1/v1"
    for base in (remote, get_encoder(remote, cache_dir=False), get_encoder(remote, cache_dir=tmp_path)):
        with pytest.raises(ConfigError, match="remote embeddings server, whose weights cannot be fine-tuned"):
            fine_tune(["a", "b"], ["x", "y"], None, tmp_path / "art", base_model=base)
    d = sweep_dict(write_synthetic_table(tmp_path / "synth.parquet", n=60))
    d["encoder"] = {"name": remote}
    d["space"]["embedding"] = {"encoder": {"choice": ["base", "ccft"]}}
    with pytest.raises(ConfigError, match="cannot be fine-tuned"):
        prepare(parse_sweep(d), tmp_path / "art", log=lambda m: None)


def test_a_sweep_prepares_its_base_embeddings_through_the_server_and_the_cache(stub, local, tmp_path):
    from ray_router.tune.prepare import prepare
    from ray_router.tune.spec import parse_sweep
    from tests.tune.conftest import sweep_dict, write_synthetic_table

    d = sweep_dict(write_synthetic_table(tmp_path / "synth.parquet", n=60))
    d["encoder"] = {"name": f"openai:{MODEL}@{stub.base_url}", "openai": {"max_batch_size": 32}}
    spec = parse_sweep(d)
    first = prepare(spec, tmp_path / "art", cache_dir=tmp_path / "emb", log=lambda m: None)
    n = first.tables["synth"].n_queries
    assert first.encoding_totals()["texts_encoded"] == n
    texts = [str(t) for t in first.tables["synth"].texts]
    np.testing.assert_allclose(first.arrays["synth/base"], local.encode(texts), atol=1e-6)
    sent = stub.n_embedding_requests
    again = prepare(spec, tmp_path / "art", cache_dir=tmp_path / "emb", log=lambda m: None).encoding_totals()
    assert again["texts_encoded"] == 0 and again["cache_hits"] == n and stub.n_embedding_requests == sent


# ------------------------------------------------------------------------------- (d) the CLI
from tests.test_cli import run_cli, write_toy_csv  # noqa: E402 - the CLI in a real subprocess, as test_cli runs it


@pytest.fixture(scope="module")
def toy_csv(tmp_path_factory) -> Path:

    return write_toy_csv(tmp_path_factory.mktemp("data"))


def test_cli_evaluate_with_a_remote_encoder_end_to_end(stub, toy_csv, tmp_path):
    common = ["evaluate", "--dataset", str(toy_csv), "--policies", "fgts_cdb", "--set", "fgts_cdb.n_steps=3"]
    common += ["--seeds", "1", "--rounds", "50", "--encoder", spec_of(stub, max_batch_size=40)]
    common += ["--cache-dir", str(tmp_path / "emb"), "--no-progress"]
    res = run_cli(*common, "--out", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    records = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert any(r.get("encoder") == "openai" and r.get("policy") == "fgts_cdb" for r in records), records
    sent = [t for r in stub.requests if r["path"] == "/v1/embeddings" for t in r["body"]["input"]]
    assert set(sent) >= {f"question {i} about {c}" for i, c in zip(range(90), ["a", "b", "c"] * 30)}
    assert max(len(r["body"]["input"]) for r in stub.requests) <= 40
    n = stub.n_embedding_requests
    res = run_cli(*common, "--out", str(tmp_path / "out2"))
    assert res.returncode == 0, res.stderr
    assert stub.n_embedding_requests == n and "0 texts encoded" in res.stderr


def test_cli_errors_are_messages_not_tracebacks(stub, toy_csv, tmp_path):
    res = run_cli("evaluate", "--dataset", str(toy_csv), "--encoder", "openai:nomodel", "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "expected openai:MODEL@URL" in res.stderr and "Traceback" not in res.stderr
    stub.fail_next(400, message="input is too long")
    res = run_cli(
        "evaluate", "--dataset", str(toy_csv), "--encoder", spec_of(stub), "--cache-dir", str(tmp_path / "e"),
        "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert res.returncode == 2 and "input is too long" in res.stderr and "Traceback" not in res.stderr


def test_cli_tune_and_serve_take_a_remote_encoder(stub, tmp_path):
    """``ray-router tune --encoder openai:...`` runs a (tiny) sweep on the server's embeddings;
    ``serve --check --encoder`` validates the override; a bad name is a message before Ray starts."""
    from tests.tune.conftest import Driver, sweep_dict, write_sweep, write_synthetic_table

    d = sweep_dict(write_synthetic_table(tmp_path / "synth.parquet", n=90), splits=["stratified"])
    d.update(search={"num_samples": 1, "report_every": 50, "scheduler": {"type": "fifo"}})
    d["eval"] = {"n_rounds": 60, "n_seeds": 1, "cost_weight": 0.0}
    sweep = write_sweep(tmp_path / "sweep.yaml", d)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "HF_HUB_OFFLINE": "1",
        "RAY_ROUTER_CACHE_DIR": str(tmp_path / "cache"),
    }
    args = ["tune", str(sweep), "--storage-path", str(tmp_path / "runs"), "--num-cpus", "2", "--no-report"]
    driver = Driver([*args, "--encoder", spec_of(stub, max_batch_size=50)], env, tmp_path / "tune.log")
    try:
        rc = driver.wait(timeout=600)
    finally:
        driver.kill_group()
    log = (tmp_path / "tune.log").read_text(errors="replace")
    assert rc == 0, log[-3000:]
    sent = {t for r in stub.requests if r["path"] == "/v1/embeddings" for t in r["body"]["input"]}
    assert len(sent) >= 90 and "1 trials (1 complete" in log, log[-3000:]
    res = run_cli(*args, "--encoder", "openai:no-url")
    assert res.returncode == 2 and "expected openai:MODEL@URL" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("serve", "--check", "--encoder", spec_of(stub))
    assert res.returncode == 0, res.stderr


def test_experiment_paper_runs_its_base_rows_on_a_remote_encoder(stub, tmp_path):
    """``experiment paper --encoder openai:...``: the ``base`` rows use the server's embeddings (the
    paper's baseline is a hosted embedding model); CCFT fine-tunes the local MiniLM."""
    from ray_router.config import parse
    from ray_router.embeddings.ccft import CCFTConfig
    from ray_router.evaluation import paper
    from tests.test_evaluation import small_table

    table, _ = small_table(n=30)
    ccft = parse(CCFTConfig, {"queries_per_category": 4, "epochs": 1, "max_seq_length": 32}, where="test")
    cfg = parse(paper.PaperConfig, {"base_encoder": spec_of(stub), "ccft": ccft}, where="test")
    sent = stub.n_embedding_requests
    X = paper._embed(table, np.arange(0, 30, 2), cfg, tmp_path / "art", tmp_path / "cache", "cpu")
    assert stub.n_embedding_requests > sent  # the base rows came from the server
    local = get_encoder("minilm", cache_dir=False, device="cpu").encode(list(table.texts))
    assert np.abs(X["base"] - local).max() < 1e-5  # the stub serves MiniLM: the same vectors
    assert X["ccft"].shape == local.shape and np.abs(X["ccft"] - local).max() > 1e-3  # fine-tuned locally
