"""Stand-in encoders for tests and pure-maths experiments: no model, no torch, instant.

- :class:`HashEncoder`: a deterministic pseudo-random unit vector per text (seeded hash of the text).
- :class:`LookupEncoder`: an explicit ``{text: vector}`` table, e.g. built with
  :meth:`LookupEncoder.from_categories` so that texts of one category cluster around a direction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

from ray_router.config import parse
from ray_router.embeddings.base import Encoder, l2_normalise
from ray_router.embeddings.options import CategoryLookupOptions, HashEncoderOptions
from ray_router.errors import ConfigError, DataError


def _text_seed(text: str, seed: int) -> int:
    digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class HashEncoder:
    """Unit-norm Gaussian pseudo-embeddings seeded by sha256(seed, text).

    The same (text, dim, seed) always gives the same vector, on any machine; different texts give
    nearly orthogonal vectors when ``dim`` is large.
    """

    def __init__(self, dim: int = 32, seed: int = 0):
        options = parse(HashEncoderOptions, {"dim": dim, "seed": seed}, where="HashEncoder")
        self.dim, self.seed = options.dim, options.seed
        self.identity = f"hash:dim={self.dim}:seed={self.seed}"

    def vector(self, text: str) -> np.ndarray:
        """The (dim,) unit vector of one text."""
        rng = np.random.default_rng(_text_seed(str(text), self.seed))
        return l2_normalise(rng.standard_normal(self.dim))

    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            out[i] = self.vector(t)
        return out

    def __repr__(self) -> str:
        return f"HashEncoder(dim={self.dim}, seed={self.seed})"


class LookupEncoder:
    """Vectors from an explicit ``{text: vector}`` table (rows are L2-normalised on the way in).

    A text missing from the table goes to ``fallback`` (default: ``HashEncoder(dim, seed=0)``);
    with ``fallback=False`` it raises :class:`DataError`. ``identity`` hashes the table contents, so two
    encoders with different tables never share cache entries.
    """

    def __init__(
        self,
        table: Mapping[str, Sequence[float] | np.ndarray],
        dim: int | None = None,
        fallback: Encoder | bool | None = None,
        name: str = "lookup",
    ):
        if not table and dim is None:
            raise ConfigError("LookupEncoder: an empty table needs an explicit dim")
        vectors = {str(t): np.asarray(v, dtype=np.float32).reshape(-1) for t, v in table.items()}
        dims = {v.shape[0] for v in vectors.values()}
        if dim is None and len(dims) == 1:
            dim = next(iter(dims))
        if dim is None or dims - {dim} or dim < 1:
            raise ConfigError(f"LookupEncoder: every vector must have length dim={dim}, got lengths {sorted(dims)}")
        for t, v in vectors.items():
            if not np.isfinite(v).all() or not np.any(v):
                raise ConfigError(f"LookupEncoder: the vector of {t!r} is zero or not finite")
        self.dim = int(dim)
        self._table = {t: l2_normalise(v) for t, v in vectors.items()}
        if fallback is None or fallback is True:
            fallback = HashEncoder(self.dim, seed=0)
        self._fallback: Encoder | None = None if fallback is False else fallback
        if self._fallback is not None and self._fallback.dim != self.dim:
            raise ConfigError(f"LookupEncoder: fallback dim {self._fallback.dim} != table dim {self.dim}")

        h = hashlib.sha256()
        for t in sorted(self._table):
            h.update(t.encode("utf-8") + b"\x00" + self._table[t].tobytes())
        tail = f"+{self._fallback.identity}" if self._fallback is not None else ""
        self.identity = f"{name}:dim={self.dim}:table=sha256-{h.hexdigest()[:16]}{tail}"

    @classmethod
    def from_categories(
        cls,
        texts: Sequence[str],
        categories: Sequence[str],
        dim: int = 16,
        noise: float = 0.3,
        seed: int = 0,
    ) -> LookupEncoder:
        """Texts of one category cluster: ``vector = normalise(u_m + noise · h(text))`` with ``u_m`` a
        random unit direction per category and ``h`` a :class:`HashEncoder` vector.

        Repeated texts keep the category they first appear with."""
        if len(texts) != len(categories):
            raise ConfigError("LookupEncoder.from_categories: texts and categories differ in length")
        parse(CategoryLookupOptions, {"dim": dim, "noise": noise, "seed": seed}, where="LookupEncoder.from_categories")
        directions = HashEncoder(dim, seed=seed + 1)
        jitter = HashEncoder(dim, seed=seed)
        table: dict[str, np.ndarray] = {}
        for t, c in zip(texts, categories):
            if str(t) not in table:
                table[str(t)] = directions.vector(f"category:{c}") + noise * jitter.vector(str(t))
        return cls(table, dim=dim, fallback=jitter, name=f"lookup-categories:noise={noise}")

    def __contains__(self, text: str) -> bool:
        return text in self._table

    def __len__(self) -> int:
        return len(self._table)

    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            v = self._table.get(t)
            if v is None:
                if self._fallback is None:
                    raise DataError(f"LookupEncoder: no vector for text {t[:80]!r} and no fallback encoder")
                v = self._fallback.encode([t])[0]
            out[i] = v
        return out

    def __repr__(self) -> str:
        return f"LookupEncoder(n_texts={len(self)}, dim={self.dim})"
