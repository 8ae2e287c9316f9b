"""Seeded offline/online splits: partition properties, stratification, determinism, hold-out."""

from __future__ import annotations

import numpy as np
import pytest

from ray_router.data import Split, hold_out_category, k_per_category, make_table, stratified_split
from ray_router.errors import ConfigError

# 3 categories of very different sizes plus a singleton, shuffled so rows are not grouped
_RNG = np.random.default_rng(123)
CATS = _RNG.permutation(np.array(["arc"] * 147 + ["mbpp"] * 43 + ["wino"] * 27 + ["tiny"] * 2 + ["one"], dtype=object))
N = len(CATS)


def _check_partition(split: Split, n: int = N) -> None:
    for part in (split.offline, split.online):
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)  # sorted, no repeats
    assert np.intersect1d(split.offline, split.online).size == 0
    np.testing.assert_array_equal(np.union1d(split.offline, split.online), np.arange(n))


def _offline_counts(split: Split) -> dict[str, int]:
    cats, counts = np.unique(CATS[split.offline].astype(str), return_counts=True)
    return dict(zip(cats.tolist(), counts.tolist()))


def test_stratified_split_fractions_per_category():
    split = stratified_split(CATS, offline_fraction=0.2, seed=0)
    _check_partition(split)
    # round(0.2 n) per category, at least one when the category has >= 2 rows, singleton stays online
    assert _offline_counts(split) == {"arc": 29, "mbpp": 9, "wino": 5, "tiny": 1}
    assert split.meta["offline_per_category"]["one"] == 0
    assert split.meta["seed"] == 0 and split.name.startswith("stratified")


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.5, 0.99, 1.0])
def test_stratified_split_edges(fraction):
    split = stratified_split(CATS, offline_fraction=fraction, seed=1)
    _check_partition(split)
    counts = _offline_counts(split)
    if fraction == 0.0:
        assert split.offline.size == 0
    elif fraction == 1.0:
        assert split.online.size == 0
    else:
        assert counts["tiny"] == 1  # >= 1 offline and >= 1 online for a 2-row category
        assert all(counts[c] < n for c, n in {"arc": 147, "mbpp": 43, "wino": 27}.items())


def test_splits_are_deterministic_and_seed_dependent():
    for make in (
        lambda s: stratified_split(CATS, 0.2, seed=s),
        lambda s: k_per_category(CATS, 5, seed=s),
        lambda s: hold_out_category(CATS, "mbpp", 0.2, seed=s),
    ):
        a, b, c = make(7), make(7), make(8)
        np.testing.assert_array_equal(a.offline, b.offline)
        np.testing.assert_array_equal(a.online, b.online)
        assert not np.array_equal(a.offline, c.offline)


def test_split_does_not_depend_on_input_container():
    a = stratified_split(list(CATS), 0.3, seed=2)
    b = stratified_split(np.asarray(CATS, dtype=str), 0.3, seed=2)
    np.testing.assert_array_equal(a.offline, b.offline)


def test_k_per_category():
    split = k_per_category(CATS, 5, seed=0)
    _check_partition(split)
    assert _offline_counts(split) == {"arc": 5, "mbpp": 5, "wino": 5, "tiny": 2, "one": 1}
    assert split.meta["short_categories"] == ["one", "tiny"]
    assert k_per_category(CATS, 0, seed=0).offline.size == 0
    for bad in (-1, 2.5, True):
        with pytest.raises(ConfigError):
            k_per_category(CATS, bad, seed=0)


def test_hold_out_category():
    split = hold_out_category(CATS, "mbpp", offline_fraction=0.2, seed=0)
    _check_partition(split)
    assert "mbpp" not in set(CATS[split.offline])
    assert set(CATS[split.online]) == set(CATS)  # online keeps every category
    assert np.all(np.isin(np.flatnonzero(CATS == "mbpp"), split.online))
    assert _offline_counts(split) == {"arc": 29, "wino": 5, "tiny": 1}
    assert split.meta["held_out"] == ["mbpp"]

    two = hold_out_category(CATS, ["arc", "wino"], k=3, seed=0)
    _check_partition(two)
    assert _offline_counts(two) == {"mbpp": 3, "tiny": 2, "one": 1}
    with pytest.raises(ConfigError, match="gsm8k"):
        hold_out_category(CATS, "gsm8k", seed=0)
    with pytest.raises(ConfigError):
        stratified_split(CATS, offline_fraction=1.5, seed=0)


def test_split_tables_and_validation():
    n = 10
    table = make_table("t", [f"q{i}" for i in range(n)], ["x"] * n, ["a", "b"] * 5, ["m1", "m2"], np.zeros((n, 2)))
    split = stratified_split(table.categories, 0.4, seed=0)
    off, on = split.tables(table)
    assert off.n_queries == 4 and on.n_queries == 6
    assert set(off.query_ids) | set(on.query_ids) == set(table.query_ids)
    with pytest.raises(ValueError):
        Split(offline=np.array([1, 2]), online=np.array([2, 3]), name="bad")
    with pytest.raises(ValueError):
        Split(offline=np.array([2, 1]), online=np.array([3]), name="unsorted")
