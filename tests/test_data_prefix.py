"""RouterBench 5-shot prompts share their few-shot block; the query text must be the question."""

import pytest

from ray_router.data.routerbench import strip_shared_prefixes
from tests.data_fixtures import shared_data_dir

SHOTS = "Q: 1+1?\nA: 2\n\n" * 30  # a 390-character shared few-shot block


def test_shared_few_shot_block_is_removed_per_category():
    texts = [SHOTS + "Q: capital of France?", SHOTS + "Q: 2+3?", "short one", "short two"]
    out, removed = strip_shared_prefixes(texts, ["a", "a", "b", "b"])
    assert out[:2] == ["Q: capital of France?", "Q: 2+3?"]
    assert out[2:] == ["short one", "short two"]  # no long shared prefix: untouched
    assert removed == {"a": len(SHOTS)}


def test_prefix_is_cut_at_a_block_boundary_and_never_empties_a_row():
    texts = [SHOTS + "Q: same", SHOTS + "Q: same", SHOTS]
    out, _ = strip_shared_prefixes(texts, ["a"] * 3)
    assert out[0] == "Q: same" and out[2] == SHOTS  # the bare block keeps its text


@pytest.mark.skipif(shared_data_dir() is None, reason="the real RouterBench subset (shared/data) is not here")
def test_real_routerbench_queries_are_distinct_questions():
    from ray_router.data import load_dataset

    table = load_dataset("routerbench", data_dir=shared_data_dir())
    assert set(table.meta["stripped_prefix_chars"]) == {"arc-challenge", "winogrande"}
    arc = [t for t, c in zip(table.texts, table.categories) if c == "arc-challenge"]
    assert all(len(t) < 1200 for t in arc) and len(set(arc)) > 1400
    raw = load_dataset("routerbench", data_dir=shared_data_dir(), strip_shared_prefix=False)
    assert all(r.endswith(t) for r, t in zip(raw.texts, table.texts))
