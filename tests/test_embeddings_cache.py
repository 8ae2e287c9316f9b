"""The on-disk embedding cache: hits, persistence, concurrency, identity separation."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from ray_router.embeddings import (
    CachedEncoder,
    EmbeddingCache,
    Encoder,
    HashEncoder,
    SentenceTransformerEncoder,
    default_cache_dir,
    text_key,
)
from ray_router.errors import DataError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


class Counting:
    """Wraps an encoder and records every text it is asked to encode."""

    def __init__(self, inner: Encoder):
        self.inner, self.identity, self.dim = inner, inner.identity, inner.dim
        self.seen: list[str] = []

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        self.seen.extend(texts)
        return self.inner.encode(texts)


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=ENV, capture_output=True, text=True, check=True
    )


def _shards(root: Path) -> list[Path]:
    return sorted(root.rglob("shard-*.npz"))


def test_second_call_encodes_nothing_and_dedupes(tmp_path):
    inner = Counting(HashEncoder(8))
    enc = CachedEncoder(inner, tmp_path)
    assert isinstance(enc, Encoder) and enc.identity == inner.identity and enc.dim == 8
    texts = ["a", "b", "a", "c", "b"]
    X = enc.encode(texts)
    np.testing.assert_array_equal(X, HashEncoder(8).encode(texts))
    assert inner.seen == ["a", "b", "c"]
    assert (enc.n_encoded, enc.n_hits) == (3, 2)
    Y = enc.encode(["c", "a", "d"])
    np.testing.assert_array_equal(Y, HashEncoder(8).encode(["c", "a", "d"]))
    assert inner.seen == ["a", "b", "c", "d"]
    assert (enc.n_encoded, enc.n_hits) == (4, 4)
    enc.encode(texts)
    assert (enc.n_encoded, enc.n_hits) == (4, 9)
    assert enc.encode([]).shape == (0, 8)


def test_long_encodes_are_saved_in_chunks(tmp_path):
    class FailsOnThirdCall(Counting):
        def encode(self, texts, batch_size=64):
            if len(self.seen) >= 4:
                raise RuntimeError("interrupted")
            return super().encode(texts)

    with pytest.raises(RuntimeError):
        CachedEncoder(FailsOnThirdCall(HashEncoder(8)), tmp_path, chunk_size=2).encode(list("abcdef"))
    inner = Counting(HashEncoder(8))
    CachedEncoder(inner, tmp_path).encode(list("abcdef"))
    assert inner.seen == ["e", "f"]


def test_fresh_instance_reuses_the_cache(tmp_path):
    CachedEncoder(HashEncoder(8), tmp_path).encode(["x", "y"])
    inner = Counting(HashEncoder(8))
    enc = CachedEncoder(inner, tmp_path)
    np.testing.assert_array_equal(enc.encode(["y", "x"]), HashEncoder(8).encode(["y", "x"]))
    assert inner.seen == [] and enc.n_encoded == 0 and enc.n_hits == 2


def test_new_process_reuses_the_cache(tmp_path):
    code = f"""
        from ray_router.embeddings import CachedEncoder, HashEncoder
        enc = CachedEncoder(HashEncoder(8), {str(tmp_path)!r})
        enc.encode(["p", "q", "r"])
        print(enc.n_encoded)
    """
    out = _run_python(code)
    assert out.stdout.strip() == "3"
    inner = Counting(HashEncoder(8))
    CachedEncoder(inner, tmp_path).encode(["r", "q", "p"])
    assert inner.seen == []


def test_cached_real_encoder_never_loads_torch(tmp_path):
    """Texts already in the cache are served without importing torch / sentence_transformers."""
    st = SentenceTransformerEncoder()
    fake = np.eye(384, dtype=np.float32)[:2]
    EmbeddingCache(tmp_path).put(st.identity, 384, [text_key("hello"), text_key("world")], fake)
    code = f"""
        import sys
        import numpy as np
        from ray_router.embeddings import get_encoder
        enc = get_encoder("minilm", cache_dir={str(tmp_path)!r})
        X = enc.encode(["world", "hello"])
        print(int(X[0, 1]), int(X[1, 0]), enc.n_encoded, "torch" in sys.modules)
    """
    out = _run_python(code)
    assert out.stdout.split() == ["1", "1", "0", "False"]


def test_concurrent_writers_do_not_corrupt(tmp_path):
    # 4 processes start together (each reports "ready" on stdout, then blocks on stdin until all have)
    # and each encodes overlapping text sets in 30 calls; max_shards=5 forces merges while the others
    # write. The cache's warnings are errors in the workers: one that meets an unreadable shard fails.
    root = tmp_path / "cache"
    code = """
        import sys, warnings
        from ray_router.embeddings import CachedEncoder, EmbeddingCache, HashEncoder
        warnings.filterwarnings("error", message="embedding cache")
        w, root = int(sys.argv[1]), sys.argv[2]
        print("ready", flush=True)
        sys.stdin.readline()
        enc = CachedEncoder(HashEncoder(8), EmbeddingCache(root, max_shards=5))
        for i in range(30):
            enc.encode([f"t{(w * 7 + i * 3 + j) % 90}" for j in range(6)])
    """
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), str(w), str(root)],
            env=ENV,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(4)
    ]
    try:
        for p in procs:
            assert p.stdout.readline() == "ready\n", p.communicate(timeout=60)[1]  # "" if it died first
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = sorted({f"t{(w * 7 + i * 3 + j) % 90}" for w in range(4) for i in range(30) for j in range(6)})
    inner = Counting(HashEncoder(8))
    np.testing.assert_array_equal(CachedEncoder(inner, root).encode(texts), HashEncoder(8).encode(texts))
    assert inner.seen == []
    assert not list(root.rglob(".tmp-*"))
    for shard in _shards(root):
        with np.load(shard) as z:
            assert z["vectors"].shape == (len(z["keys"]), 8)


def test_compaction_merges_shards(tmp_path):
    cache = EmbeddingCache(tmp_path, max_shards=3)
    enc = CachedEncoder(HashEncoder(8), cache)
    for i in range(10):
        enc.encode([f"s{i}"])
    assert len(_shards(tmp_path)) <= 3
    (enc.cache.directory(enc.identity) / "shard-99999999999999999999-1-deadbeef.npz").write_bytes(b"junk")
    with pytest.warns(UserWarning, match="unreadable shard"):
        cache.compact(enc.identity, 8)
    assert len(_shards(tmp_path)) == 1  # everything merged, the unreadable shard dropped
    inner = Counting(HashEncoder(8))
    texts = [f"s{i}" for i in range(10)]
    np.testing.assert_array_equal(CachedEncoder(inner, tmp_path).encode(texts), HashEncoder(8).encode(texts))
    assert inner.seen == []


def test_different_identities_do_not_mix(tmp_path):
    a = CachedEncoder(HashEncoder(8, seed=0), tmp_path)
    b_inner = Counting(HashEncoder(8, seed=1))
    b = CachedEncoder(b_inner, tmp_path)
    Xa = a.encode(["same text"])
    Xb = b.encode(["same text"])
    assert b_inner.seen == ["same text"]
    assert not np.allclose(Xa, Xb)
    np.testing.assert_array_equal(Xb, HashEncoder(8, seed=1).encode(["same text"]))
    assert len([d for d in tmp_path.iterdir() if d.is_dir()]) == 2


def test_unreadable_shard_is_skipped_with_warning(tmp_path):
    enc = CachedEncoder(HashEncoder(8), tmp_path)
    enc.encode(["a"])
    (enc.cache.directory(enc.identity) / "shard-99999999999999999999-1-deadbeef.npz").write_bytes(b"not a zip")
    inner = Counting(HashEncoder(8))
    with pytest.warns(UserWarning, match="unreadable shard"):
        X = CachedEncoder(inner, tmp_path).encode(["a", "b"])
    np.testing.assert_array_equal(X, HashEncoder(8).encode(["a", "b"]))
    assert inner.seen == ["b"]


def test_wrong_encoder_output_shape_is_an_error(tmp_path):
    class Broken:
        identity, dim = "broken", 4

        def encode(self, texts, batch_size=64):
            return np.zeros((len(texts), 3), dtype=np.float32)

    with pytest.raises(DataError, match="shape"):
        CachedEncoder(Broken(), tmp_path).encode(["x"])


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_ROUTER_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c" / "embeddings"
    assert EmbeddingCache().root == tmp_path / "c" / "embeddings"
    monkeypatch.delenv("RAY_ROUTER_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "ray-router" / "embeddings"
