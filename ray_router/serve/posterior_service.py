"""The posterior's service, free of Ray: the body of the ``Posterior`` deployment.

It owns one :class:`~ray_router.serve.state.PosteriorState` and runs it the way the service does:

- ``feedback``: ``begin_feedback`` (single use, a self-contained record), the durable append
  through the :class:`~ray_router.serve.durable.GroupCommitter` (group commit, fsync), then the
  acknowledgement (``end_feedback``); once a batch is durable its updates are queued, in log order,
  on the one mutation thread (``apply``);
- a background refresh loop: an SGLD refresh after new updates, then the new samples are
  published (``samples`` is a long poll the ingress follows);
- a maintenance loop: expired nonces pruned, snapshots when due (each deletes the log segments
  it covers), gauges.

``segment_bytes``: when the feedback log rolls to a new segment (None: the default, see
:class:`~ray_router.serve.state.PosteriorState`); snapshots delete the segments they cover.

``metrics``: an object with ``feedback``, ``refresh``, ``log_bytes`` and ``version`` recorders
(:class:`ray_router.serve.metrics.PosteriorMetrics` under Serve); without one nothing is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ray_router.serve.durable import GroupCommitter
from ray_router.serve.specs import PosteriorSpec
from ray_router.serve.state import PosteriorState
from ray_router.serve.tokens import DecisionSigner, decision_signer

logger = logging.getLogger("ray.serve")


class _NoRecorder:
    def inc(self, *args: Any, **kwargs: Any) -> None:
        pass

    observe = set = inc


class _NoMetrics:
    feedback = refresh = log_bytes = version = _NoRecorder()


class PosteriorService:
    def __init__(
        self,
        spec: PosteriorSpec,
        refresh_min_interval_s: float = 0.02,
        metrics: Any = None,
        clock: Callable[[], float] = time.time,
        segment_bytes: int | None = None,
        signer: DecisionSigner | None = None,
    ) -> None:
        self.state = PosteriorState(spec, clock=clock, segment_bytes=segment_bytes)
        # defence in depth: every feedback's decision id is verified here again, with the service's
        # key ($hmac_key_env, else the state dir's generated key), whatever the caller checked
        self.signer = signer or decision_signer(spec.hmac_key_env, spec.state_dir, spec.arm_ids)[0]
        self._clock = clock
        self.refresh_min_interval_s = refresh_min_interval_s
        self.metrics = metrics if metrics is not None else _NoMetrics()
        self.epoch = uuid.uuid4().hex  # this posterior instance: a restart is a new epoch
        self._mut = ThreadPoolExecutor(1, thread_name_prefix="posterior-mutation")
        self._io = ThreadPoolExecutor(1, thread_name_prefix="feedback-log")
        self._failure: BaseException | None = None
        self._closed = True  # until start() has opened the state
        self._committer = GroupCommitter(self.state.journal, self._io, self._on_durable)
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> dict[str, Any]:
        """Open the state (lock, restore, replay) and start the log writer and the background loops."""
        loop = asyncio.get_running_loop()
        report = await loop.run_in_executor(self._mut, self.state.open)
        self._closed = False
        logger.info(f"posterior opened {self.state.dir}: {report}")
        self._dirty = asyncio.Event()
        self._published = asyncio.Event()  # set (and replaced) whenever new samples are out
        self._committer.start()
        self._tasks = [loop.create_task(self._refresh_loop()), loop.create_task(self._maintenance_loop())]
        self._publish_gauges()
        return report

    # ------------------------------------------------------------------ internals
    def _on_durable(self, records: list[dict]) -> None:
        """Called in log order once a batch is fsynced: queue the updates, wake the refresher."""
        fut = self._mut.submit(self.state.apply, records)
        fut.add_done_callback(self._watch)
        for rec in records:
            self.metrics.feedback.inc(1, tags={"outcome": rec["outcome"]})
        self._dirty.set()

    def _watch(self, fut: Future) -> None:
        exc = fut.exception()
        if exc is not None and self._failure is None:
            self._failure = exc
            logger.error(f"posterior mutation failed: {exc!r}")

    def _refresh_if_needed(self) -> float | None:
        if self.state.pending_updates <= 0:
            return None
        return self.state.refresh()

    async def _refresh_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                seconds = await loop.run_in_executor(self._mut, self._refresh_if_needed)
            except Exception as e:  # noqa: BLE001 - surfaces through check_health
                self._failure = e
                logger.error(f"posterior refresh failed: {e!r}")
                continue
            if seconds is not None:
                self.metrics.refresh.observe(seconds)
                self._publish()
            await asyncio.sleep(self.refresh_min_interval_s)

    def _publish(self) -> None:
        self.metrics.version.set(self.state.version)
        event, self._published = self._published, asyncio.Event()
        event.set()

    async def _maintenance_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            try:
                self.state.prune()
                if self.state.snapshot_due(time.time()):
                    await loop.run_in_executor(self._mut, self.state.take_snapshot)
                self._publish_gauges()
            except Exception as e:  # noqa: BLE001 - retried next second; logged
                logger.error(f"posterior maintenance failed: {e!r}")

    def _publish_gauges(self) -> None:
        self.metrics.log_bytes.set(self.state.journal.size_bytes)
        self.metrics.version.set(self.state.version)

    # -------------------------------------------------------------------- API
    async def samples(self, epoch: str = "", version: int = -1, wait_s: float = 0.0) -> dict:
        """The current samples; if the caller already has them (same epoch and version), wait up to
        ``wait_s`` for the next refresh first (a long poll)."""
        event = self._published  # taken before the version is read: a publish in between still wakes us
        if epoch == self.epoch and version == self.state.version and wait_s > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), wait_s)
        return {**self.state.view(), "epoch": self.epoch}

    async def feedback(self, decision_id: str, outcome: str, request_id: str) -> dict:
        """Record a decision's feedback; the acknowledgement comes once it is durable. The decision id
        is verified here (signature, expiry, a duel): the posterior trusts no caller."""
        claims = self.signer.verify_duel(decision_id, self._clock())
        nonce = claims.nonce
        res = self.state.begin_feedback(claims, outcome, request_id)
        if isinstance(res, tuple):  # this request was recorded before (a retry after a crash)
            return {**res[1], "posterior_version": self.state.version}
        try:
            fut = self._committer.submit(res)
        except BaseException:
            self.state.end_feedback(nonce, None)
            raise
        acks: dict[str, Any] = {}

        def finish(f: asyncio.Future) -> None:
            # runs exactly once, even if the caller is cancelled while the record is written
            ok = not f.cancelled() and f.exception() is None
            acks["ack"] = self.state.end_feedback(nonce, f.result() if ok else None)

        fut.add_done_callback(finish)
        await asyncio.shield(fut)
        if "ack" not in acks:  # callbacks run before awaiters resume; be safe anyway
            await asyncio.sleep(0)
        return {**acks["ack"], "posterior_version": self.state.version}

    async def stats(self) -> dict:
        return self.state.stats()

    async def status(self) -> dict:
        return {
            "pid": os.getpid(),
            "state_dir": str(self.state.dir),
            "recovery": self.state.recovery,
            "last_seq": self.state.journal.last_seq,
            "last_applied_seq": self.state.last_applied_seq,
            "n_updates": int(self.state.policy.n_updates),
            "version": self.state.version,
            "epoch": self.epoch,
            "group_commits": self._committer.n_batches,
        }

    async def version(self) -> int:
        return self.state.version

    async def snapshot_now(self) -> dict:
        path: Path = await asyncio.get_running_loop().run_in_executor(self._mut, self.state.take_snapshot)
        return {"path": str(path), "seq": self.state.snapshot_seq}

    async def refresh_now(self, steps: int | None = None, times: int = 1) -> dict:
        loop = asyncio.get_running_loop()
        for _ in range(times):
            seconds = await loop.run_in_executor(self._mut, self.state.refresh, steps)
            self.metrics.refresh.observe(seconds)
        self._publish()
        return {"version": self.state.version}

    async def check_health(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"posterior failed: {self._failure!r}")
        if not self._committer.alive:
            raise RuntimeError("the feedback log writer stopped")

    def close(self) -> None:
        """A graceful stop: a last snapshot (when there is news since the last one), then release
        the lock. The log makes the snapshot redundant, so a failure here loses nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._failure is None and self.state.last_applied_seq > self.state.snapshot_seq:
                self._mut.submit(self.state.take_snapshot).result(timeout=30)
            self.state.close()
        except Exception as e:  # noqa: BLE001 - best effort; the log makes it redundant
            logger.warning(f"posterior shutdown snapshot failed: {e!r}")
