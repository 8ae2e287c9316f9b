"""Encoders: the stand-ins, the packaged sentence-transformers model, get_encoder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ray_router.embeddings import (
    CachedEncoder,
    Encoder,
    HashEncoder,
    LookupEncoder,
    SentenceTransformerEncoder,
    get_encoder,
    packaged_model_path,
    resolve_device,
)
from ray_router.errors import ConfigError, DataError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _unit_rows(X: np.ndarray) -> bool:
    return np.allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)


# --------------------------------------------------------------- import cost
def test_import_is_lazy_and_ray_free():
    code = (
        "import sys; import ray_router.embeddings as E; E.SentenceTransformerEncoder(); "
        "E.get_encoder('minilm', cache_dir=False).identity; "
        "print([m for m in ('torch', 'sentence_transformers', 'ray') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- stand-ins
def test_hash_encoder_is_deterministic_unit_and_seeded():
    texts = ["a", "b", "a longer text", ""]
    X = HashEncoder(dim=16, seed=0).encode(texts)
    assert X.shape == (4, 16) and X.dtype == np.float32 and _unit_rows(X)
    np.testing.assert_array_equal(X, HashEncoder(dim=16, seed=0).encode(texts))
    assert not np.allclose(X, HashEncoder(dim=16, seed=1).encode(texts))
    assert not np.allclose(X[0], X[1])
    assert HashEncoder(16, 0).identity != HashEncoder(16, 1).identity != HashEncoder(8, 1).identity
    assert isinstance(HashEncoder(), Encoder)
    assert HashEncoder(4).encode([]).shape == (0, 4)


@pytest.mark.parametrize("dim", [0, -3, 2.5, True, "8"])
def test_hash_encoder_rejects_bad_dim(dim):
    with pytest.raises(ConfigError, match=r"^HashEncoder: dim: "):
        HashEncoder(dim=dim)


def test_hash_encoder_takes_numpy_integers():
    assert HashEncoder(np.int64(8), seed=np.int32(2)).identity == HashEncoder(8, seed=2).identity == "hash:dim=8:seed=2"
    with pytest.raises(ConfigError, match=r"^HashEncoder: seed: "):
        HashEncoder(8, seed=1.5)


def test_lookup_encoder_table_and_fallback():
    enc = LookupEncoder({"x": [3.0, 4.0], "y": [0.0, 2.0]})
    assert enc.dim == 2 and isinstance(enc, Encoder)
    np.testing.assert_allclose(enc.encode(["x", "y"]), [[0.6, 0.8], [0.0, 1.0]], atol=1e-7)
    z = enc.encode(["unseen"])
    np.testing.assert_array_equal(z, HashEncoder(2, seed=0).encode(["unseen"]))
    strict = LookupEncoder({"x": [1.0, 0.0]}, fallback=False)
    with pytest.raises(DataError):
        strict.encode(["unseen"])
    assert LookupEncoder({"x": [1.0, 0.0]}).identity != LookupEncoder({"x": [0.0, 1.0]}).identity


@pytest.mark.parametrize(
    "table, dim",
    [({"a": [1.0, 0.0], "b": [1.0, 0.0, 0.0]}, None), ({"a": [0.0, 0.0]}, None), ({}, None), ({"a": [1.0]}, 2)],
)
def test_lookup_encoder_rejects_bad_tables(table, dim):
    with pytest.raises(ConfigError):
        LookupEncoder(table, dim=dim)


def test_lookup_from_categories_clusters():
    texts = [f"q{i}" for i in range(40)]
    cats = ["math" if i % 2 else "code" for i in range(40)]
    enc = LookupEncoder.from_categories(texts, cats, dim=16, noise=0.3, seed=0)
    X = enc.encode(texts)
    assert _unit_rows(X)
    same = np.array([[a == b for b in cats] for a in cats])
    G = X @ X.T
    off = ~np.eye(40, dtype=bool)
    assert G[same & off].min() > G[~same].max()
    np.testing.assert_array_equal(X, LookupEncoder.from_categories(texts, cats, dim=16).encode(texts))
    for bad in ({"noise": -0.1}, {"noise": float("nan")}, {"dim": 0}):
        with pytest.raises(ConfigError, match=rf"^LookupEncoder.from_categories: {next(iter(bad))}: "):
            LookupEncoder.from_categories(texts, cats, **bad)


# ------------------------------------------------- sentence-transformers identity
def _fake_model_dir(path: Path, weights: bytes, pooling: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps(pooling or {"word_embedding_dimension": 8, "pooling_mode_mean_tokens": True})
    )
    (path / "model.safetensors").write_bytes(weights)
    return path


def test_identity_of_packaged_model():
    enc = SentenceTransformerEncoder()
    assert enc.dim == 384
    assert enc.identity.startswith("sentence-transformers:all-MiniLM-L6-v2:sha256-")
    assert SentenceTransformerEncoder(packaged_model_path()).identity == enc.identity
    assert SentenceTransformerEncoder(max_seq_length=128).identity == enc.identity + ":max_seq_length=128"
    assert not enc.loaded  # identity and dim came from the files, not from loading the model


def test_identity_tracks_weight_bytes_and_artifact_fingerprint(tmp_path):
    a = SentenceTransformerEncoder(_fake_model_dir(tmp_path / "a", b"\x00" * 64))
    b = SentenceTransformerEncoder(  # same size, one byte differs; sentence-transformers>=6 pooling config
        _fake_model_dir(
            tmp_path / "b", b"\x01" + b"\x00" * 63, {"embedding_dimension": 8, "pooling_mode": ["mean", "max"]}
        )
    )
    a2 = SentenceTransformerEncoder(tmp_path / "a")
    assert a.dim == 8 and b.dim == 16
    assert a.identity == a2.identity
    assert a.identity.split(":")[2] != b.identity.split(":")[2]
    (tmp_path / "b" / "ray_router_artifact.json").write_text(json.dumps({"fingerprint": "ccft-abc123", "name": "ccft"}))
    c = SentenceTransformerEncoder(tmp_path / "b")
    assert c.identity == "sentence-transformers:ccft:ccft-abc123"


@pytest.mark.parametrize("bad", ["/nonexistent/model/dir", "FILE", "EMPTYDIR"])
def test_bad_model_paths_raise_config_error(tmp_path, bad):
    if bad == "FILE":
        bad = tmp_path / "weights.bin"
        bad.write_bytes(b"x")
    elif bad == "EMPTYDIR":
        bad = tmp_path / "empty"
        bad.mkdir()
    with pytest.raises(ConfigError, match=r"does not exist|not a sentence-transformers directory"):
        SentenceTransformerEncoder(bad)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_seq_length": 0}, {"batch_size": 0}, {"batch_size": 2.0}, {"max_seq_length": "128"}, {"batch_size": True}],
)
def test_bad_encoder_options(kwargs):
    (field,) = kwargs
    with pytest.raises(ConfigError, match=rf"^SentenceTransformerEncoder: {field}: "):
        SentenceTransformerEncoder(**kwargs)


def test_resolve_device(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="no CUDA"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1"


# ----------------------------------------------------------- get_encoder
def test_get_encoder_names(tmp_path):
    assert isinstance(get_encoder("hash"), HashEncoder)
    assert get_encoder("lookup", dim=8, seed=3).identity == HashEncoder(8, 3).identity
    cached = get_encoder("hash", cache_dir=tmp_path)
    assert isinstance(cached, CachedEncoder) and cached.identity == HashEncoder().identity
    st = get_encoder("minilm", cache_dir=tmp_path)
    assert isinstance(st, CachedEncoder) and isinstance(st.encoder, SentenceTransformerEncoder)
    assert isinstance(get_encoder("minilm", cache_dir=False), SentenceTransformerEncoder)
    assert isinstance(get_encoder(str(packaged_model_path()), cache_dir=False), SentenceTransformerEncoder)
    with pytest.raises(ConfigError, match="unknown encoder"):
        get_encoder("gpt-embedder")
    with pytest.raises(ConfigError, match="does not exist"):
        get_encoder("./no/such/dir")


# ------------------------------------------------------ the real encoder
@pytest.fixture(scope="module")
def minilm() -> SentenceTransformerEncoder:
    return SentenceTransformerEncoder(device="auto")


@pytest.mark.integration
def test_minilm_shape_norm_dtype_and_cpu_fallback(minilm):
    import torch

    X = minilm.encode(["How do I sort a list in Python?", "What is 2 + 2?", ""])
    assert X.shape == (3, 384) and X.dtype == np.float32 and _unit_rows(X)
    assert minilm.device == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert minilm.encode([]).shape == (0, 384)


@pytest.mark.integration
def test_minilm_semantics(minilm):
    X = minilm.encode(
        [
            "How do I reverse a list in Python?",
            "What is the Python code to reverse an array?",
            "The recipe needs two cups of flour and an egg.",
        ]
    )
    close, far = float(X[0] @ X[1]), float(X[0] @ X[2])
    assert close > far + 0.3, (close, far)


@pytest.mark.integration
def test_minilm_deterministic_across_batches_and_instances(minilm):
    texts = [f"question number {i} about topic {i % 3}" for i in range(10)]
    X = minilm.encode(texts, batch_size=4)
    np.testing.assert_array_equal(X, minilm.encode(texts, batch_size=4))
    np.testing.assert_allclose(X, minilm.encode(texts, batch_size=64), atol=1e-5)
    np.testing.assert_allclose(X, SentenceTransformerEncoder(device="cpu").encode(texts), atol=1e-5)


@pytest.mark.integration
def test_minilm_saved_copy_loads_as_directory(minilm, tmp_path):
    minilm.model.save(str(tmp_path / "copy"))
    copy = SentenceTransformerEncoder(tmp_path / "copy", device="cpu")
    assert copy.identity != minilm.identity and copy.dim == 384
    assert not copy.loaded  # dim read from the (current-format) pooling config
    texts = ["a question about chemistry", "another about law"]
    np.testing.assert_allclose(copy.encode(texts), minilm.encode(texts), atol=1e-5)
