"""Length-aware batching (ray_router/serve/batching.py): the planner's split is the optimum of its
cost model, and the real MiniLM encoder, run through the plan and through the Embedder deployment's
``@serve.batch`` windows on real Serve, returns each caller the vector a one-at-a-time encode gives, in order."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest

from ray_router.serve.batching import CostModel, LengthAwareEncoder, padded_tokens, plan_groups

# mixed lengths: one-word, sentence, paragraph; two equal texts; order not sorted by length
MIXED = [
    "Is 91 prime?",
    "Write a Python function that merges two sorted lists into one sorted list without using the "
    "built-in sort, and explain its time complexity in big-O notation with a short argument. " * 3,
    "Capital of France?",
    "Which of the following best explains why the sky appears blue on a clear day: (A) reflection "
    "from the oceans, (B) Rayleigh scattering of sunlight, (C) absorption by ozone, (D) emission?",
    "hi",
    "Translate 'good morning' into German.",
    "Is 91 prime?",
    "Summarise the plot of Hamlet in two sentences, naming the main characters and how it ends. " * 2,
]


def _partitions(items: list[int]):
    """Every set partition of ``items`` (Bell(n) of them)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        for i in range(len(part)):
            yield [*part[:i], [first, *part[i]], *part[i + 1 :]]
        yield [[first], *part]


def _cost(lengths, groups, cost: CostModel) -> float:
    return sum(cost(len(g), max(lengths[i] for i in g)) for g in groups)


def test_plan_is_the_optimum_over_every_partition():
    rng = np.random.default_rng(0)
    for _ in range(40):
        n = int(rng.integers(1, 8))
        lengths = [int(v) for v in rng.integers(2, 200, size=n)]
        cost = CostModel(a=float(rng.uniform(0, 0.02)), b=float(rng.uniform(0, 1e-3)), c=float(rng.uniform(0, 1e-6)))
        groups = plan_groups(lengths, cost)
        assert sorted(itertools.chain.from_iterable(groups)) == list(range(n)), "each text exactly once"
        best = min(_cost(lengths, p, cost) for p in _partitions(list(range(n))))
        assert _cost(lengths, groups, cost) == pytest.approx(best, rel=1e-12, abs=1e-15)


def test_plan_extremes():
    lengths = [40, 8, 120, 8, 64]
    # no per-call overhead: padding is pure waste, so distinct lengths go alone (equal ones may share)
    g = plan_groups(lengths, CostModel(a=0.0, b=1e-4))
    assert padded_tokens(lengths, g) == sum(lengths)
    assert [lengths[i] for grp in g for i in grp] == sorted(lengths)  # shortest first
    # overhead dwarfs the tokens: one call for the whole window
    assert plan_groups(lengths, CostModel(a=10.0, b=1e-6)) == [[1, 3, 0, 4, 2]]
    # equal lengths and any overhead: one group, whatever the per-token cost
    assert len(plan_groups([30] * 6, CostModel(a=1e-3, b=1.0, c=1.0))) == 1


@pytest.fixture(scope="module")
def minilm():
    from ray_router.embeddings import get_encoder

    enc = get_encoder("minilm", cache_dir=False, device="cpu")
    enc.encode(["warm-up"])
    return enc


def _singles(enc, texts) -> np.ndarray:
    return np.vstack([enc.encode([t], 1) for t in texts])


@pytest.mark.integration
def test_length_aware_encode_equals_one_at_a_time_in_order(minilm):
    # a cost model that splits this window into several groups, some of more than one text, so the
    # vectors must be put back from a sorted, regrouped order
    la = LengthAwareEncoder(minilm, cost=CostModel(a=0.02, b=4e-4))
    groups = la.plan(MIXED)
    assert 1 < len(groups) < len(MIXED), groups
    X = la.encode(MIXED)
    assert la.last_plan == [len(g) for g in groups]
    np.testing.assert_allclose(X, _singles(minilm, MIXED), atol=2e-5)
    # the one-window baseline (enabled=False) gives the same vectors too: only the cost differs
    np.testing.assert_allclose(LengthAwareEncoder(minilm, enabled=False).encode(MIXED), X, atol=2e-5)


@pytest.mark.integration
def test_calibrated_plan_on_this_machine_also_matches(minilm):
    la = LengthAwareEncoder(minilm)
    cost = la.calibrate(repeats=1)
    assert cost.a >= 0 and cost.b >= 0 and cost.c >= 0 and (cost.a + cost.b + cost.c) > 0
    lengths = la.token_lengths(MIXED)
    assert lengths[4] < lengths[1] and lengths[0] == lengths[6]  # the tokenizer's counts, not characters
    np.testing.assert_allclose(la.encode(MIXED), _singles(minilm, MIXED), atol=2e-5)


@pytest.mark.integration
def test_embedder_deployment_returns_each_caller_its_vector(serve_cluster, minilm):
    """The Embedder deployment on real Serve: concurrent ``embed`` calls share ``@serve.batch``
    windows, and each caller gets its own text's vector."""
    from ray import serve
    from ray.serve.handle import DeploymentHandle

    from ray_router.embeddings.spec import EncoderSpec
    from ray_router.serve.embedder import Embedder

    app = Embedder.options(ray_actor_options={"num_cpus": 0.5}).bind(  # type: ignore[attr-defined]
        EncoderSpec(name="minilm", device="cpu"), minilm.identity, 16
    )
    serve.run(app, name="embedder-batching", route_prefix=None)

    async def calls():
        # Serve's throughput-optimised handles run on the caller's event loop: a handle of this loop
        # only (not Serve's cache, which outlives it), shut down before the loop closes
        handle = DeploymentHandle("Embedder", "embedder-batching")
        try:
            for _ in range(3):  # the first window may hold one call: repeat until a window held several
                out = await asyncio.gather(*(handle.embed.remote(t) for t in MIXED))
                if max(size for _, _, size in out) > 1:
                    break
            return out, await handle.info.remote()
        finally:
            await handle.shutdown_async()

    try:
        out, info = asyncio.run(calls())
        assert max(size for _, _, size in out) > 1, "the calls were never batched"
        np.testing.assert_allclose(np.vstack([x for x, _, _ in out]), _singles(minilm, MIXED), atol=2e-5)
        assert info["length_aware"] is True and set(info["cost_model"]) == {"a", "b", "c"}
    finally:
        serve.delete("embedder-batching", _blocking=True)
