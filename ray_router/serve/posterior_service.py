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

Standby: when another process holds the state's lock (a KubeRay ``NewCluster`` upgrade starts the
new cluster beside the old one, on the same volume), ``start`` does not wait for it: the service
starts as a *standby* (:meth:`PosteriorState.open_standby`): it restores the snapshot and the log
read-only and then follows the holder's appends every ``standby_poll_s``, applying and publishing
them like the writer does, so routes are served on the same learned state. It refuses writes
(feedback, admin snapshot/refresh) with :class:`~ray_router.serve.errors.Standby` (503, retry) and
passes its health check (the new cluster's app must turn healthy for KubeRay to switch traffic and
delete the old cluster, which is what frees the lock). The same poll tries the lock; once it is
free, :meth:`PosteriorState.promote` takes it and applies the tail not yet seen, and only then does
the writer start (the log writer, snapshots): a feedback is either refused before that or
accepted after, never both. Lock attempts, follows and the promotion all run on the one mutation
thread, so they never interleave with an apply or a refresh.

``metrics``: an object with ``feedback``, ``refresh``, ``apply_lag``, ``log_bytes``, ``version`` and
``role`` recorders (:class:`ray_router.serve.metrics.PosteriorMetrics` under Serve); without one
nothing is recorded. ``judge_metrics``: an object with an ``agreement`` counter (tag ``result``:
agree/disagree; :class:`ray_router.serve.judge.AgreementMetrics` under Serve), counted when a
decision gets both a human and a judge verdict. ``apply_lag``: per feedback, the seconds from its durable acknowledgement (the
log's fsync) to the publication of the first samples whose refresh included its update.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ray_router.serve.durable import GroupCommitter
from ray_router.serve.errors import Standby
from ray_router.serve.specs import PosteriorSpec
from ray_router.serve.state import PosteriorState, used_key
from ray_router.serve.tokens import DecisionSigner, decision_signer

logger = logging.getLogger("ray.serve")


class _NoRecorder:
    def inc(self, *args: Any, **kwargs: Any) -> None:
        pass

    observe = set = inc


class _NoMetrics:
    feedback = refresh = apply_lag = log_bytes = version = role = agreement = _NoRecorder()


ROLES = ("writer", "standby")
STANDBY_POLL_S = 0.5  # how often a standby reads the holder's new records and tries the lock


class PosteriorService:
    def __init__(
        self,
        spec: PosteriorSpec,
        refresh_min_interval_s: float = 0.02,
        metrics: Any = None,
        clock: Callable[[], float] = time.time,
        segment_bytes: int | None = None,
        signer: DecisionSigner | None = None,
        standby_poll_s: float = STANDBY_POLL_S,
        judge_metrics: Any = None,
    ) -> None:
        self.state = PosteriorState(spec, clock=clock, segment_bytes=segment_bytes)
        # defence in depth: every feedback's decision id is verified here again, with the service's
        # key ($hmac_key_env, else the state dir's generated key), whatever the caller checked
        # (for the state's arm table: the config's, with the arms the admin API added since)
        self.signer = (signer or decision_signer(spec.hmac_key_env, spec.state_dir, spec.arm_ids)[0]).for_arms(
            self.state.arm_ids
        )
        self._clock = clock
        self.refresh_min_interval_s = refresh_min_interval_s
        self.metrics = metrics if metrics is not None else _NoMetrics()
        self.judge_metrics = judge_metrics if judge_metrics is not None else _NoMetrics()
        self.instance = uuid.uuid4().hex  # this posterior instance: a restart is a new epoch
        self.standby_poll_s = standby_poll_s
        self.standby_since: float | None = None
        # (seq, monotonic time of its durable acknowledgement) of feedback not yet in published samples
        self._acked: deque[tuple[int, float]] = deque()
        self._mut = ThreadPoolExecutor(1, thread_name_prefix="posterior-mutation")
        self._io = ThreadPoolExecutor(1, thread_name_prefix="feedback-log")
        self._failure: BaseException | None = None
        self._closed = True  # until start() has opened the state
        self._committer = GroupCommitter(self.state.journal, self._io, self._on_durable)
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> dict[str, Any]:
        """Open the state and start the loops: the writer's (log writer, maintenance) when the lock
        is free, else a standby's (follow the holder's log, try the lock); the refresher in both."""
        loop = asyncio.get_running_loop()
        report = await loop.run_in_executor(self._mut, self.state.start)
        self._closed = False
        logger.info(f"posterior opened {self.state.dir} as {self.state.role}: {report}")
        self._dirty = asyncio.Event()
        self._published = asyncio.Event()  # set (and replaced) whenever new samples are out
        self._tasks = [loop.create_task(self._refresh_loop())]
        if self.state.standby:
            self.standby_since = time.time()
            logger.warning(
                f"posterior: {self.state.lock.path} is held by another process: standby (routes served, "
                f"feedback refused with 503 until the lock frees; tried every {self.standby_poll_s}s)"
            )
            self._tasks.append(loop.create_task(self._standby_loop()))
        else:
            self._start_writer()
        self._publish_gauges()
        return report

    @property
    def epoch(self) -> str:
        """Changes with each restart, and each time a standby re-reads a snapshot (its versions restart)."""
        return f"{self.instance}.{self.state.reloads}"

    @property
    def role(self) -> str:
        """Set on the event loop (``standby_since``): "writer" only once the log writer is started."""
        return "standby" if self.standby_since is not None else "writer"

    def _start_writer(self) -> None:
        self._committer.start()
        self._tasks.append(asyncio.get_running_loop().create_task(self._maintenance_loop()))

    async def _standby_loop(self) -> None:
        """Follow the holder's log and try the lock every ``standby_poll_s``, until promoted."""
        loop = asyncio.get_running_loop()
        failures = 0
        promoted: dict[str, Any] | None = None
        while not self._closed:
            try:
                promoted = await loop.run_in_executor(self._mut, self.state.promote)
                if promoted is not None:
                    break
                while await loop.run_in_executor(self._mut, self.state.follow) > 0:
                    self._dirty.set()
                failures = 0
            except Exception as e:  # noqa: BLE001 - retried; a lasting failure surfaces in check_health
                failures += 1
                logger.error(f"posterior standby: following the log failed ({failures} in a row): {e!r}")
                if failures >= 20:
                    self._failure = e
                    return
            self._publish_gauges()
            await asyncio.sleep(self.standby_poll_s)
        if self._closed:  # promoted while closing: let go of the lock again
            await loop.run_in_executor(self._mut, self.state.close)
            return
        # promoted: the log is open for appending and every record in it is applied
        waited = time.time() - (self.standby_since or time.time())
        logger.warning(f"posterior: took the lock after {waited:.1f}s as a standby; now the writer: {promoted}")
        self.standby_since = None
        self._start_writer()
        self._dirty.set()
        self._publish_gauges()

    # ------------------------------------------------------------------ internals
    def _on_durable(self, records: list[dict]) -> None:
        """Called in log order once a batch is fsynced: queue the updates, wake the refresher."""
        fut = self._mut.submit(self.state.apply, records)
        fut.add_done_callback(self._watch)
        now = time.monotonic()
        for rec in records:
            self.metrics.feedback.inc(1, tags={"outcome": rec["outcome"]})
            self._acked.append((int(rec["seq"]), now))
        self._dirty.set()

    def _watch(self, fut: Future) -> None:
        exc = fut.exception()
        if exc is not None and self._failure is None:
            self._failure = exc
            logger.error(f"posterior mutation failed: {exc!r}")

    def _refresh_if_needed(self) -> tuple[float, int] | None:
        if self.state.pending_updates <= 0:
            return None
        return self._refresh()

    def _refresh(self, steps: int | None = None) -> tuple[float, int]:
        """Mutation thread: a refresh, and the last seq it includes (applies run on this thread too)."""
        covered = self.state.last_applied_seq
        return self.state.refresh(steps), covered

    async def _refresh_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                done = await loop.run_in_executor(self._mut, self._refresh_if_needed)
            except Exception as e:  # noqa: BLE001 - surfaces through check_health
                self._failure = e
                logger.error(f"posterior refresh failed: {e!r}")
                continue
            if done is not None:
                self.metrics.refresh.observe(done[0])
                self._publish(done[1])
            await asyncio.sleep(self.refresh_min_interval_s)

    def _publish(self, covered: int) -> None:
        """New samples are out; they include every record up to seq ``covered``."""
        self.metrics.version.set(self.state.version)
        event, self._published = self._published, asyncio.Event()
        event.set()
        now = time.monotonic()
        while self._acked and self._acked[0][0] <= covered:
            self.metrics.apply_lag.observe(now - self._acked.popleft()[1])

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
        for role in ROLES:
            self.metrics.role.set(1 if role == self.role else 0, tags={"role": role})

    # -------------------------------------------------------------------- API
    async def samples(self, epoch: str = "", version: int = -1, wait_s: float = 0.0) -> dict:
        """The current samples; if the caller already has them (same epoch and version), wait up to
        ``wait_s`` for the next refresh first (a long poll)."""
        event = self._published  # taken before the version is read: a publish in between still wakes us
        if epoch == self.epoch and version == self.state.version and wait_s > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), wait_s)
        return {**self.state.view(), "epoch": self.epoch}

    async def feedback(self, decision_id: str, outcome: str, request_id: str, source: str = "human") -> dict:
        """Record a decision's feedback; the acknowledgement comes once it is durable. The decision id
        is verified here (signature, expiry, a duel): the posterior trusts no caller. ``source``:
        ``human`` (``POST /v1/feedback``) or ``judge`` (the ingress's shadow duels; weighs
        ``spec.judge_weight``): a decision takes one verdict of each."""
        claims = self.signer.verify_duel(decision_id, self._clock())
        self._refuse_on_standby("feedback")
        key = used_key(claims.nonce, source)
        res = self.state.begin_feedback(claims, outcome, request_id, source)
        if isinstance(res, tuple):  # this request was recorded before (a retry after a crash)
            return {**res[1], "posterior_version": self.state.version}
        try:
            fut = self._committer.submit(res)
        except BaseException:
            self.state.end_feedback(key, None)
            raise
        acks: dict[str, Any] = {}

        def finish(f: asyncio.Future) -> None:
            # runs exactly once, even if the caller is cancelled while the record is written
            ok = not f.cancelled() and f.exception() is None
            acks["ack"] = ack = self.state.end_feedback(key, f.result() if ok else None)
            if ack is not None and "agreement" in ack:
                self.judge_metrics.agreement.inc(1, tags={"result": ack["agreement"]})

        fut.add_done_callback(finish)
        await asyncio.shield(fut)
        if "ack" not in acks:  # callbacks run before awaiters resume; be safe anyway
            await asyncio.sleep(0)
        return {**acks["ack"], "posterior_version": self.state.version}

    def _refuse_on_standby(self, what: str) -> None:
        if self.role == "standby":
            raise Standby(
                f"{what} refused: this posterior is a standby (another process holds the state's lock and "
                "writes; it takes over once that one stops); nothing was recorded, retry"
            )

    async def health(self) -> dict:
        """What ``/healthz`` reports: the role and the published version (a standby: since when, and
        who holds the lock)."""
        out: dict[str, Any] = {"role": self.role, "version": self.state.version}
        if self.role == "standby":
            out.update(standby_since=self.standby_since, lock_holder=self.state.lock.owner())
        return out

    async def stats(self) -> dict:
        return {**self.state.stats(), "role": self.role}

    async def status(self) -> dict:
        return {
            "role": self.role,
            "standby_since": self.standby_since,
            "lock_holder": self.state.lock.owner(),
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

    # ---------------------------------------------------------------- arm table
    async def arm_table(self) -> dict:
        """The arm table an Ingress mirrors (:meth:`PosteriorState.arm_table`)."""
        return self.state.arm_table()

    async def add_arm(self, arm: dict) -> dict:
        """Append an arm (an :class:`~ray_router.serve.arm_changes.AddArmRequest` as a dict): durable
        first, then the posterior rebuilt under the grown table on the mutation thread (feedback is
        accepted meanwhile and applied after it), then the new samples published. The decision
        signer takes the grown table (ids issued before still verify: the table only grew)."""
        from ray_router.serve.arm_changes import AddArmRequest, AddedArm

        self._refuse_on_standby("arm changes")
        added = AddedArm.from_request(AddArmRequest.model_validate(arm), self._clock())
        loop = asyncio.get_running_loop()
        report = await loop.run_in_executor(self._mut, self.state.add_arm, added)
        self.signer = self.signer.for_arms(self.state.arm_ids)
        self._publish(self.state.last_applied_seq)
        self._publish_gauges()
        logger.warning(f"posterior: arm {added.id!r} added at index {report['index']}: {report}")
        return {**report, "fingerprint": self.state.arms_fingerprint}

    async def retire_arm(self, arm_id: str, retired: bool = True) -> dict:
        """Retire (or restore) an arm: recorded durably, published at once."""
        self._refuse_on_standby("arm changes")
        loop = asyncio.get_running_loop()
        report = await loop.run_in_executor(self._mut, self.state.retire_arm, arm_id, retired)
        self._publish(self.state.last_applied_seq)
        logger.warning(f"posterior: arm {arm_id!r} {'retired' if retired else 'restored'}")
        return {**report, "fingerprint": self.state.arms_fingerprint}

    async def snapshot_now(self) -> dict:
        self._refuse_on_standby("snapshot")
        path: Path = await asyncio.get_running_loop().run_in_executor(self._mut, self.state.take_snapshot)
        return {"path": str(path), "seq": self.state.snapshot_seq}

    async def refresh_now(self, steps: int | None = None, times: int = 1) -> dict:
        self._refuse_on_standby("refresh")
        loop = asyncio.get_running_loop()
        covered = self.state.last_applied_seq
        for _ in range(times):
            seconds, covered = await loop.run_in_executor(self._mut, self._refresh, steps)
            self.metrics.refresh.observe(seconds)
        self._publish(covered)
        return {"version": self.state.version}

    async def check_health(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"posterior failed: {self._failure!r}")
        if self.role == "writer" and not self._committer.alive:
            raise RuntimeError("the feedback log writer stopped")

    def close(self) -> None:
        """A graceful stop: a last snapshot (when there is news since the last one), then release
        the lock. The log makes the snapshot redundant, so a failure here loses nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.state.standby:  # holds no lock and writes nothing (on the mutation thread: no promotion runs)
                self._mut.submit(self.state.close).result(timeout=30)
                return
            if self._failure is None and self.state.last_applied_seq > self.state.snapshot_seq:
                self._mut.submit(self.state.take_snapshot).result(timeout=30)
            self.state.close()
        except Exception as e:  # noqa: BLE001 - best effort; the log makes it redundant
            logger.warning(f"posterior shutdown snapshot failed: {e!r}")
