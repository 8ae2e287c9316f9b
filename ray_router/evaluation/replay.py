"""One replay run: a policy against a logged stream, round by round."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from ray_router.evaluation.env import ReplayEnvironment
from ray_router.policies.base import Duel, Policy


@dataclass(frozen=True)
class ReplayStream:
    """The online part of one seed, prepared once and shared by every policy of that seed.

    Row ``i`` of each array is online query ``i``; ``order`` lists the row played at each round.
    """

    contexts: np.ndarray  # (n, d) query embeddings
    utilities: np.ndarray  # (n, K) r(q, k) = score − λ·cost_norm
    scores: np.ndarray  # (n, K) raw quality, for the served-quality view
    costs: np.ndarray  # (n, K) USD (zeros when the data has none)
    order: np.ndarray  # (T,) row played at each round
    pairwise: dict | None = None  # {(row, a, b): y} real labels
    categories: np.ndarray | None = None  # (n,) category of each online row (for hindsight references)

    @property
    def hindsight_utility(self) -> np.ndarray:
        """Mean utility of each arm over the rounds actually played (the best-fixed-arm oracle)."""
        return self.utilities[self.order].mean(axis=0)


@dataclass(frozen=True)
class ReplayResult:
    rows: np.ndarray
    first: np.ndarray
    second: np.ndarray
    outcome: np.ndarray
    regret: np.ndarray
    served_score: np.ndarray  # quality of the arm a router serves in mode single (policy.best)
    served_cost: np.ndarray
    n_real_labels: int
    seconds: float
    sgld_seconds: float = 0.0  # time the policy spent in its posterior sampler (FGTS.CDB: SGLD)
    served: np.ndarray | None = None  # (T,) the arm mode single would serve: policy.best(x) before the update
    served_regret: np.ndarray | None = None  # (T,) r(q, k*) − r(q, served)

    @property
    def cum_regret(self) -> np.ndarray:
        return np.cumsum(self.regret)

    @property
    def cum_served_regret(self) -> np.ndarray:
        if self.served_regret is None:
            raise ValueError("this replay result has no served regret")
        return np.cumsum(self.served_regret)

    @property
    def self_duel_share(self) -> float:
        """Share of rounds whose two arms were the same (a duel that teaches nothing)."""
        return float(np.mean(self.first == self.second)) if len(self.first) else 0.0


def _served_regret(utilities: np.ndarray, rows: np.ndarray, served: np.ndarray) -> np.ndarray:
    U = utilities[rows]
    return U.max(axis=1) - U[np.arange(len(rows)), served]


def reference_result(arms: np.ndarray, stream: ReplayStream) -> ReplayResult:
    """The result of always playing (and serving) ``arms[t]`` in round t: a hindsight reference."""
    rows = stream.order.astype(np.int64)
    arms = np.asarray(arms, dtype=np.int64)
    regret = _served_regret(stream.utilities, rows, arms)
    return ReplayResult(
        rows=rows,
        first=arms,
        second=arms,
        outcome=np.full(len(rows), 0.5),
        regret=regret,
        served_score=stream.scores[rows, arms],
        served_cost=stream.costs[rows, arms],
        n_real_labels=0,
        seconds=0.0,
        served=arms,
        served_regret=regret.copy(),
    )


def run_replay(
    policy: Policy,
    stream: ReplayStream,
    kappa: float,
    rng: np.random.Generator,
    progress: bool | None = False,
    desc: str = "",
    on_progress: Callable[[int, np.ndarray], None] | None = None,
    progress_every: int = 0,
) -> ReplayResult:
    """Play ``len(stream.order)`` rounds: select, judge, update, record the regret.

    ``on_progress(t, regret)``, when given, is called after every ``progress_every`` rounds and after
    the last one, with ``t`` the number of rounds played and ``regret`` the (t,) per-round regrets so
    far (a read-only view). Sweeps use it to report cumulative regret while the replay runs, so an
    early-stopping scheduler can stop a bad configuration; an exception it raises ends the replay.
    """
    import time

    from tqdm.auto import tqdm

    env = ReplayEnvironment(stream.utilities, kappa=kappa, pairwise=stream.pairwise)
    T = len(stream.order)
    first = np.empty(T, dtype=np.int64)
    second = np.empty(T, dtype=np.int64)
    outcome = np.empty(T)
    regret = np.empty(T)
    served = np.empty(T, dtype=np.int64)
    t0 = time.perf_counter()
    for t in tqdm(range(T), desc=desc, disable=not progress, leave=False, mininterval=1.0):
        row = int(stream.order[t])
        x = stream.contexts[row]
        duel = policy.select(x)
        served[t] = policy.best(x)
        y = env.feedback(row, duel, rng)
        policy.update(x, duel, y)
        first[t], second[t], outcome[t] = duel.first, duel.second, y
        regret[t] = env.regret(row, duel)
        if on_progress is not None and ((progress_every and (t + 1) % progress_every == 0) or t + 1 == T):
            view = regret[: t + 1]
            view.flags.writeable = False
            on_progress(t + 1, view)
    rows = stream.order.astype(np.int64)
    return ReplayResult(
        rows=rows,
        first=first,
        second=second,
        outcome=outcome,
        regret=regret,
        served_score=stream.scores[rows, served],
        served_cost=stream.costs[rows, served],
        n_real_labels=env.n_real_labels,
        seconds=time.perf_counter() - t0,
        sgld_seconds=float(getattr(policy, "sgld_seconds", 0.0)),
        served=served,
        served_regret=_served_regret(stream.utilities, rows, served),
    )


def run_replay_lanes(
    lanes: Any,
    streams: Sequence[ReplayStream],
    kappa: float | Sequence[float],
    rngs: Sequence[np.random.Generator],
    progress: bool | None = False,
    desc: str = "",
) -> list[ReplayResult]:
    """:func:`run_replay` for L independent runs at once: lane l plays ``streams[l]`` with judge
    ``rngs[l]`` and returns what ``run_replay`` returns for that lane's policy alone.

    ``lanes`` runs the L policies in lockstep (``select(X (L, d)) -> (first, second)``,
    ``update(X, first, second, y)``; e.g. :class:`~ray_router.policies.fgts_cdb.FGTSCDBLanes`).
    Each lane's ``seconds`` and ``sgld_seconds`` are the lanes' totals divided by L.
    """
    import time

    from tqdm.auto import tqdm

    L = len(streams)
    T = len(streams[0].order)
    if any(len(s.order) != T for s in streams) or len(rngs) != L:
        raise ValueError("lanes need streams of equal length and one judge RNG per stream")
    # np.isscalar narrows to numpy's scalar union, not to our float | Sequence[float]
    kappas = [cast(float, kappa)] * L if np.isscalar(kappa) else list(cast(Sequence[float], kappa))
    envs = [ReplayEnvironment(s.utilities, kappa=k, pairwise=s.pairwise) for s, k in zip(streams, kappas)]
    order = np.stack([s.order for s in streams]).astype(np.int64)  # (L, T)
    first = np.empty((L, T), dtype=np.int64)
    second = np.empty((L, T), dtype=np.int64)
    outcome = np.empty((L, T))
    regret = np.empty((L, T))
    served = np.empty((L, T), dtype=np.int64)
    y = np.empty(L)
    t0 = time.perf_counter()
    for t in tqdm(range(T), desc=desc, disable=not progress, leave=False, mininterval=1.0):
        X = np.stack([s.contexts[order[lane, t]] for lane, s in enumerate(streams)])
        f, s2 = lanes.select(X)
        served[:, t] = lanes.best(X) if hasattr(lanes, "best") else f
        for lane in range(L):
            duel = Duel(int(f[lane]), int(s2[lane]))
            row = int(order[lane, t])
            y[lane] = envs[lane].feedback(row, duel, rngs[lane])
            regret[lane, t] = envs[lane].regret(row, duel)
        lanes.update(X, f, s2, y)
        first[:, t], second[:, t], outcome[:, t] = f, s2, y
    seconds = (time.perf_counter() - t0) / L
    sgld = float(getattr(lanes, "sgld_seconds", 0.0)) / L
    return [
        ReplayResult(
            rows=order[lane],
            first=first[lane],
            second=second[lane],
            outcome=outcome[lane],
            regret=regret[lane],
            served_score=s.scores[order[lane], served[lane]],
            served_cost=s.costs[order[lane], served[lane]],
            n_real_labels=envs[lane].n_real_labels,
            seconds=seconds,
            sgld_seconds=sgld,
            served=served[lane],
            served_regret=_served_regret(s.utilities, order[lane], served[lane]),
        )
        for lane, s in enumerate(streams)
    ]
