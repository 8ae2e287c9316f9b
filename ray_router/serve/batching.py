"""Length-aware batching: encode a window of texts in the sub-batches that cost least.

A transformer encoder pads every text of a batch to the batch's longest, so one batch of 32 mixed
queries can cost more than 32 single encodes on one CPU thread (measured: 28.4 against 39.8 q/s on
RouterBench queries). :class:`LengthAwareEncoder` counts each text's tokens (the encoder's own
tokenizer: about 1 ms for 32 queries), sorts them, and splits the sorted run into the contiguous
groups that minimise a cost model of one ``encode`` call::

    cost(n texts padded to L tokens) = a + b*n*L + c*n*L^2

``a`` is a call's fixed overhead, ``b`` the per-token work (the linear layers), ``c`` the attention's.
The three are fitted (non-negative least squares) from timed encodes on this process's torch
threads at start-up, so the plan is the one that is cheapest *here*: one batch when the texts are of
a length, one text at a time when the overhead is small against the padding, anything in between.
An exact dynamic programme over the sorted lengths finds the best split (n <= a few hundred: O(n^2)).
Results come back in the callers' order. An encoder without a tokenizer (``hash``) is called once
per window, as before.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CostModel:
    """Seconds of one encode call of ``n`` texts padded to ``length`` tokens: a + b*n*L + c*n*L^2."""

    a: float
    b: float
    c: float = 0.0

    def __call__(self, n: int, length: int) -> float:
        return self.a + n * length * (self.b + self.c * length)


def plan_groups(lengths: Sequence[int], cost: CostModel) -> list[list[int]]:
    """Indices of ``lengths`` split into the groups that minimise ``sum(cost(len(g), max length in g))``.

    The groups are contiguous runs of the texts sorted by length (an optimal split never needs
    anything else: moving a shorter text into a group of longer ones never lowers its padding).
    Shortest first; within a group, ascending length."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    ls = [int(lengths[i]) for i in order]
    n = len(ls)
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest split of the first j sorted texts
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = ls[j - 1]
        for i in range(j):  # group = sorted[i:j], padded to its last (longest) text
            c = best[i] + cost(j - i, longest)
            if c < best[j]:
                best[j], cut[j] = c, i
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def padded_tokens(lengths: Sequence[int], groups: list[list[int]]) -> int:
    """Tokens an encoder processes for ``groups`` (each padded to its longest text)."""
    return sum(len(g) * max(lengths[i] for i in g) for g in groups)


def tokenizer_of(encoder: Any) -> Any | None:
    """The encoder's tokenizer (``encoder.tokenizer`` or ``encoder.model.tokenizer``: a Hugging Face
    tokenizer, or a ``tokenizers.Tokenizer`` with ``encode_batch``), or None when it has none (the
    ``hash`` stand-in). Loads the model."""
    tok = getattr(encoder, "tokenizer", None)
    if tok is None and hasattr(encoder, "model"):
        tok = getattr(encoder.model, "tokenizer", None)
    return tok if callable(tok) or hasattr(tok, "encode_batch") else None


def _max_tokens(encoder: Any, tokenizer: Any) -> int:
    for obj in (encoder, getattr(encoder, "model", None)):
        limit = getattr(obj, "max_seq_length", None)
        if isinstance(limit, int) and limit > 0:
            return limit
    return int(getattr(tokenizer, "model_max_length", 512) or 512)


class LengthAwareEncoder:
    """Wraps an encoder (``encode(texts, batch_size) -> (n, d) float32``): :meth:`encode` runs a
    window of texts as the cost model's cheapest split (:func:`plan_groups`).

    ``cost``: a given model (tests), else :meth:`calibrate` fits one on first use. ``enabled=False``
    encodes each window in one call (the plain ``@serve.batch`` behaviour, for comparison)."""

    def __init__(self, encoder: Any, cost: CostModel | None = None, enabled: bool = True):
        self.encoder = encoder
        self.enabled = enabled
        self.tokenizer = tokenizer_of(encoder) if enabled else None
        self.max_tokens = _max_tokens(encoder, self.tokenizer) if self.tokenizer is not None else 0
        self.cost = cost
        self.last_plan: list[int] = []  # sizes of the last window's groups (for the response's timing)

    @property
    def length_aware(self) -> bool:
        return self.enabled and self.tokenizer is not None

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Each text's token count as the encoder sees it (special tokens included, truncated)."""
        tok = self.tokenizer
        if tok is None:
            raise ValueError("this encoder has no tokenizer")
        if not callable(tok):  # a `tokenizers.Tokenizer` (truncating, maybe padding): count the real tokens
            return [int(sum(e.attention_mask)) for e in tok.encode_batch(list(texts))]
        ids = tok(list(texts), add_special_tokens=True, truncation=True, max_length=self.max_tokens, padding=False)
        return [len(x) for x in ids["input_ids"]]

    def calibrate(self, repeats: int = 2) -> CostModel:
        """Fit :class:`CostModel` from timed encodes (best of ``repeats``) of 1 and 4 texts of 8, 32
        and 96 tokens on this process's threads, by relative error (a short call's fixed overhead
        matters as much as a long batch's tokens). Sets and returns ``self.cost``."""
        from scipy.optimize import nnls

        if not self.length_aware:
            self.cost = CostModel(a=1.0, b=0.0)
            return self.cost
        rows, secs = [], []
        for length in (8, 32, min(96, self.max_tokens)):
            text = self._text_of_tokens(length)
            true_len = self.token_lengths([text])[0]
            for n in (1, 4):
                batch = [text] * n
                self.encoder.encode(batch, n)  # warm this shape
                best = float("inf")
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    self.encoder.encode(batch, n)
                    best = min(best, time.perf_counter() - t0)
                rows.append(np.array([1.0, n * true_len, n * true_len * true_len]) / best)
                secs.append(1.0)
        coef, _ = nnls(np.asarray(rows), np.asarray(secs))
        a, b, c = (float(v) for v in coef)
        if a <= 0 and b <= 0 and c <= 0:  # a degenerate fit (timer noise): fall back to one call per window
            a = 1.0
        self.cost = CostModel(a=a, b=b, c=c)
        return self.cost

    def _text_of_tokens(self, n_tokens: int) -> str:
        words = ["route"] * max(1, n_tokens)
        while len(words) > 1 and self.token_lengths([" ".join(words)])[0] > n_tokens:
            words.pop()
        return " ".join(words)

    def plan(self, texts: Sequence[str]) -> list[list[int]]:
        """The groups (indices into ``texts``) :meth:`encode` will run."""
        if not self.length_aware or len(texts) <= 1:
            return [list(range(len(texts)))]
        if self.cost is None:
            self.calibrate()
        assert self.cost is not None
        return plan_groups(self.token_lengths(texts), self.cost)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts`` in their order, computed group by group (:meth:`plan`)."""
        texts = [str(t) for t in texts]
        groups = self.plan(texts)
        self.last_plan = [len(g) for g in groups]
        if len(groups) == 1:
            return np.asarray(self.encoder.encode(texts, max(1, len(texts))), dtype=np.float32)
        out: np.ndarray | None = None
        for g in groups:
            X = np.asarray(self.encoder.encode([texts[i] for i in g], len(g)), dtype=np.float32)
            if out is None:
                out = np.empty((len(texts), X.shape[1]), dtype=np.float32)
            out[g] = X
        assert out is not None
        return out
