"""The posterior's state machine, free of Ray: FGTS.CDB plus its durable log, snapshots and replay.

One :class:`PosteriorState` owns one state directory (see :mod:`ray_router.serve.durable`).

Route
    Routes never reach this object: the ingress chooses arms from a :class:`SampleView` of the
    current samples (``view()``, published after every refresh) and signs the decision, context
    included, into the decision id (:mod:`ray_router.serve.tokens`). No SGLD on the request path.

Feedback (``begin_feedback`` -> durable append -> ``end_feedback`` -> ``apply``)
    ``begin_feedback`` takes the verified claims of a decision id and checks single use; it builds
    a self-contained log record: everything an update needs (embedding, both arms, offered arms,
    outcome) plus the nonce and the caller's request id. The record is appended to the feedback
    log and fsynced; only then is it acknowledged (``end_feedback`` marks the nonce used) and
    queued for ``apply``, which runs ``policy.update`` in log order. A background loop calls
    ``refresh`` (SGLD) after updates and publishes the new samples.

Snapshots, compaction and recovery
    ``take_snapshot`` writes the policy snapshot plus ``last_seq`` (the last applied record), the
    log position after it and the used nonces, atomically (temp file, fsync, rename, directory
    fsync), and only then deletes the log segments it covers (:meth:`FeedbackJournal.compact`).
    ``open`` takes the directory lock, checks ``meta.json`` (arm ids, encoder, dim: a mismatch
    refuses to start), migrates an old JSON-lines log, restores the snapshot, replays the log
    records after ``last_seq`` (read from the snapshot's position: the restart reads the snapshot
    and the tail, never the whole history) through ``policy.update`` and refreshes once. A crash
    therefore loses no acknowledged feedback: each one is in the log or in a durable snapshot, and
    the tail beyond the snapshot is replayed. When the policy config, the arm embeddings or the
    offline prior changed since the snapshot, the posterior is rebuilt under the new config from
    the duels the snapshot's policy holds (its history, bounded by ``max_history``) and then the log
    tail (``recovery["rebuilt_from_log"]`` says why; ``rebuilt_from_history`` how many duels).

Sources and weights (the router's judge, :mod:`ray_router.serve.judge`)
    A record says who gave its verdict: ``human`` (``POST /v1/feedback``) or ``judge`` (a shadow
    duel); a judge's verdict weighs ``spec.judge_weight`` times a human one in the likelihood (the
    weight is written into the record, so a replay learns exactly what the live service learned).
    Single use is per (decision, source): a decision takes one human and one judge verdict, and the
    human's rules (one feedback, a retry of the same request replays its acknowledgement) are those
    of a router without a judge. When both exist for one decision, the second to arrive is compared
    with the first (``counts["judge_agreement"]``: agree when the outcomes are equal).

Standby (``start`` when another process holds the lock)
    ``open_standby`` restores the snapshot and applies the log without the lock, writing nothing;
    ``follow`` applies what the holder appends since (``FeedbackJournal.tail``: read-only, stops at
    a frame being written) and, when a compaction deleted the records it needs, re-reads the newest
    snapshot (``_reload``: a fresh policy; the samples of the last refresh are served meanwhile).
    ``promote`` takes the lock once it is free, opens the log for appending, checks that the last
    record it applied is still the log's (same seq and nonce, else ``_reload``) and applies the rest:
    the same replay a restart does, from where the follower got to. Writes (``take_snapshot``) are
    refused while standby.

:class:`~ray_router.serve.posterior_service.PosteriorService` (the ``Posterior`` deployment's body)
drives these steps. Threads: ``begin_feedback``/``end_feedback``/``view`` run on the event loop; ``apply``, ``refresh``
and ``take_snapshot`` on one mutation thread. A refresh replaces ``policy.theta`` and
``policy.theta_mean`` by assignment, never in place, so ``view`` always reads a consistent sample.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ray_router.errors import ConfigError, DataError, UnknownArmError
from ray_router.policies import Duel, PolicyEnv, make_policy
from ray_router.policies.snapshot import load_snapshot, save_snapshot
from ray_router.serve import durable
from ray_router.serve.arm_changes import ARMS_FILE, AddedArm, ArmChanges, apply_changes, extend, fingerprint
from ray_router.serve.durable import (
    LEGACY_LOG,
    LOG_DIR,
    OUTCOMES,
    SEGMENT_BYTES,
    SOURCES,
    FeedbackJournal,
    Position,
    StateLock,
    decode_vector,
    read_meta,
    write_meta,
)
from ray_router.serve.errors import (
    DuplicateFeedback,
    ExpiredDecision,
    MalformedRequest,
    NotADuel,
    StaleDecision,
    Standby,
)
from ray_router.serve.specs import COLD_START_NOTE, PosteriorSpec
from ray_router.serve.tokens import DecisionClaims

logger = logging.getLogger("ray.serve")

SNAPSHOT_FILE = "posterior.snapshot.npz"
JUDGE_KEY = "judge:"  # prefix of a judge verdict's entry in the used-decision table


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def used_key(nonce: str, source: str = "human") -> str:
    """The entry of a decision's verdict from ``source`` in the single-use table: the nonce for a
    human's (as before judges), ``judge:<nonce>`` for the judge's."""
    return nonce if source == "human" else f"{JUDGE_KEY}{nonce}"


def _used_entry(rec: dict) -> tuple[str, dict]:
    key = used_key(rec["nonce"], rec.get("source", "human"))
    return key, {"r": rec["request_id"], "s": int(rec["seq"]), "y": rec["outcome"], "e": rec["expires_at"]}


PRUNE_EVERY_S = 10.0  # a standby drops the expired nonces it followed this often


def serving_policy_config(config: dict | None) -> dict:
    """The FGTS.CDB config of the service: the user's fields over ``distinct_arms: True`` (a duel
    of an arm with itself teaches nothing)."""
    return {"distinct_arms": True, **dict(config or {})}


def make_scorer(arm_embeddings: np.ndarray, config: dict | None, seed: int = 0, offline_prior: dict | None = None):
    """A policy with the service's config, used for its scoring function (``arm_scores``).

    ``offline_prior``: the arm table's :class:`~ray_router.policies.offline_prior.OfflinePrior` as a
    dict (fitted on a dataset's offline split, or an operator's per-category profile), or None."""
    A = np.asarray(arm_embeddings, dtype=np.float64)
    offline = None if offline_prior is None else {"prior": offline_prior}
    return make_policy("fgts_cdb", PolicyEnv(A.shape[0], A, offline=offline), seed, serving_policy_config(config))


def arms_added(old: list[str], new: list[str], where: str) -> list[str]:
    """The arms ``new`` appends to ``old`` (empty: the same table). An arm table may only grow at
    its end: the posterior's terms and the logged duels name arms by index. Anything else (an arm
    removed, renamed or moved) is a ConfigError that says what to do instead."""
    if old == new or not old:
        return []
    if new[: len(old)] == old:
        return new[len(old) :]
    gone = [a for a in old if a not in new]
    hint = (
        f"arms {gone} are missing: keep them in the config with retired: true (out of service, their terms "
        "and duels kept)"
        if gone
        else "arms can only be appended at the end of the list"
    )
    raise ConfigError(
        f"{where} holds the posterior of another configuration (arms {old}; the config has {new}): {hint}"
    )


class PosteriorState:
    """``segment_bytes``/``segment_records``: when the feedback log rolls to a new segment (None:
    the spec's ``segment_bytes`` if it has one, else :data:`~ray_router.serve.durable.SEGMENT_BYTES`)."""

    def __init__(
        self,
        spec: PosteriorSpec,
        clock: Callable[[], float] = time.time,
        segment_bytes: int | None = None,
        segment_records: int = 0,
        encoder_factory: Callable[[], Any] | None = None,
    ):
        self.clock = clock
        self.dir = Path(spec.state_dir)
        # an encoder change with state.keep_queries: {"from": old identity, "dim": old dim, ...} while
        # the posterior is rebuilt from re-embedded texts (see _prepare_reembed), else None
        self._reembed: dict[str, Any] | None = None
        self._new_x: dict[str, np.ndarray] = {}
        self._encoder_factory = encoder_factory
        self._encoder_changed_at: float | None = None  # decisions issued before it are stale
        self.base_spec = spec  # the config's arm table; ``spec`` is it with the admin's changes applied
        self.arm_changes = ArmChanges.load(self.dir)
        self._arm_changes_mtime = _mtime(self.dir / ARMS_FILE)
        self._set_spec(apply_changes(spec, self.arm_changes))
        self.dim = int(np.asarray(spec.arm_embeddings).shape[1])
        self.lock = StateLock(self.dir)
        if segment_bytes is None:
            segment_bytes = int(getattr(spec, "segment_bytes", None) or SEGMENT_BYTES)
        self.journal = FeedbackJournal(self.dir / LOG_DIR, spec.fsync, segment_bytes, segment_records)
        # nonce -> {"r": request id, "s": seq, "y": outcome label, "e": expires}; the single-use set
        self.used: dict[str, dict] = {}
        self.inflight: dict[str, str] = {}  # used key -> request id, while its record is being written
        self.last_applied_seq = 0
        self.last_applied_position: Position | None = None  # where the last applied record ends in the log
        self.snapshot_seq = 0
        self.last_snapshot_at: float | None = None
        self.last_refresh_at: float | None = None
        self.last_refresh_s: float | None = None
        self.started_at = self.clock()
        self.counts: dict[str, Any] = {
            "feedback": {k: 0 for k in OUTCOMES},
            "rejected_feedback": {"duplicate": 0, "not_a_duel": 0, "expired": 0},
            "feedback_by_source": {k: 0 for k in SOURCES},
            "judge_agreement": {"agree": 0, "disagree": 0},
        }
        self.recovery: dict[str, Any] = {}
        self._opened = False
        self.standby = False  # following another process's log (see open_standby), not writing
        self.reloads = 0  # times the policy was rebuilt from a snapshot while following
        self._last_nonce: str | None = None  # nonce of the last applied record
        self._serving = self.policy  # the policy whose samples are published (the last refreshed)
        # the last sample_pool refreshes' samples, published with them: duel routes draw one each
        self._pool: collections.deque[np.ndarray] = collections.deque(maxlen=max(1, int(spec.sample_pool)))
        # (θ, diagonal variance) of the last refresh, published with θ under ``second_arm: rival``
        self._variance: tuple[np.ndarray, np.ndarray] | None = None
        self._pruned_at = self.clock()  # a standby's last pruning of expired nonces
        self._serving_arms = self.arms_fingerprint  # the arm table of the published samples

    # --------------------------------------------------------------- arm table
    def _set_spec(self, spec: PosteriorSpec) -> None:
        """Make ``spec`` (the config's, with the admin's arm changes applied) this posterior's, with
        a fresh policy (the prior): the caller restores or rebuilds what was learned."""
        from ray_router.policies.reachability import unreachable_arms

        self.spec = spec
        self.arm_ids = tuple(spec.arm_ids)
        self.n_arms = len(self.arm_ids)
        self.policy = make_scorer(spec.arm_embeddings, spec.policy_config, spec.policy_seed, spec.offline_prior)
        # arms this config can never choose (no per-arm term and inside the others' hull): said at start-up
        self.unreachable_arms = unreachable_arms(
            self.policy.config, spec.arm_embeddings, self.policy.prior, arm_ids=list(spec.arm_ids)
        )
        self._config_version = self.config_version

    @property
    def config_version(self) -> str:
        """What each log record names as the configuration it was learned under: the policy's
        config, the encoder, and the arm table (ids, prices, embeddings, the admin's retirements)."""
        import dataclasses
        import hashlib
        import json

        h = hashlib.blake2b(digest_size=6)
        h.update(json.dumps(dataclasses.asdict(self.policy.config), sort_keys=True, default=str).encode())
        h.update(self.spec.encoder_identity.encode())
        h.update(self.arms_fingerprint.encode())
        return h.hexdigest()

    @property
    def arms_fingerprint(self) -> str:
        s = self.spec
        return fingerprint(s.arm_ids, s.prices, s.arm_embeddings, self.arm_changes.retired)

    def arm_table(self) -> dict[str, Any]:
        """The arm table as an Ingress mirrors it (``fingerprint`` is that of ``view()["arms"]``
        once the samples of this table are out)."""
        return {
            "fingerprint": self.arms_fingerprint,
            "ids": list(self.spec.arm_ids),
            "prices": [float(p) for p in self.spec.prices],
            "embeddings": np.asarray(self.spec.arm_embeddings, dtype=np.float64),
            "offline_prior": self.spec.offline_prior,
            "policy_config": dict(self.spec.policy_config),
            "cold_start": bool(self.spec.cold_start),
            "added": {a.id: {"upstream": a.upstream, "added_at": a.added_at} for a in self.arm_changes.added},
            "retired": list(self.arm_changes.retired),
        }

    def add_arm(self, arm: AddedArm) -> dict[str, Any]:
        """Mutation thread, writer only: append ``arm`` (durably recorded first), rebuild the
        posterior from the duels it holds under the grown table, refresh and snapshot. The samples
        of the old table are served until the new ones are published."""
        if self.standby:
            raise Standby("arm changes refused: this posterior is a standby; retry once it is the writer")
        same = [a for a in self.arm_changes.added if a.id == arm.id]
        if same and (same[0].price_usd, same[0].upstream, same[0].profile) == (
            arm.price_usd,
            arm.upstream,
            arm.profile,
        ):
            # the same request again (a retry after a lost answer): its first answer, nothing changed
            return {"arm": arm.id, "index": self.arm_ids.index(arm.id), "arms": list(self.arm_ids), "replayed": True}
        spec = extend(self.spec, arm)  # ArmExists, profile errors: before anything is written
        changes = self.arm_changes.with_added(arm)
        history = self.policy.history.arrays()
        changes.save(self.dir)
        self.arm_changes, self._arm_changes_mtime = changes, _mtime(self.dir / ARMS_FILE)
        t0 = time.perf_counter()
        self._set_spec(spec)
        rebuilt = self._rebuild_from_history(history)
        meta_path = self.dir / "meta.json"
        write_meta(
            meta_path, {**(read_meta(meta_path) or {}), "arm_ids": list(self.arm_ids), "arms_added_at": self.clock()}
        )
        self.reloads += 1  # a new epoch: the versions of the rebuilt policy start again
        self._pool.clear()
        self.refresh()
        self.take_snapshot()
        return {
            "arm": arm.id,
            "index": self.n_arms - 1,
            "arms": list(self.arm_ids),
            "rebuilt_from_history": rebuilt,
            "seconds": round(time.perf_counter() - t0, 3),
        }

    def retire_arm(self, arm_id: str, retired: bool) -> dict[str, Any]:
        """Record (durably) that ``arm_id`` is retired (or restored); the samples stay, the
        published arm table changes at once. The Ingress checks the request (a known arm, one left
        in service) against its config before it asks."""
        if self.standby:
            raise Standby("arm changes refused: this posterior is a standby; retry once it is the writer")
        if arm_id not in self.arm_ids:
            raise UnknownArmError(f"unknown arm {arm_id[:200]!r} (GET /v1/admin/arms)")
        changes = self.arm_changes.with_retired(arm_id, retired)
        if changes != self.arm_changes:
            changes.save(self.dir)
            self.arm_changes, self._arm_changes_mtime = changes, _mtime(self.dir / ARMS_FILE)
        self._serving_arms, self._config_version = self.arms_fingerprint, self.config_version
        return {"arm": arm_id, "retired": retired, "admin_retired": list(changes.retired)}

    def _follow_arm_changes(self) -> bool:
        """A standby: when the writer changed ``arms.json``, take its table (then the caller
        re-reads the snapshot: ``_reload``). True when it changed."""
        mtime = _mtime(self.dir / ARMS_FILE)
        if mtime == self._arm_changes_mtime:
            return False
        changes = ArmChanges.load(self.dir)
        self._arm_changes_mtime = mtime
        if changes == self.arm_changes:
            return False
        self.arm_changes = changes
        self._set_spec(apply_changes(self.base_spec, changes))  # (its config version too)
        self._serving_arms = self.arms_fingerprint
        return True

    # ------------------------------------------------------------------ startup
    def open(self) -> dict[str, Any]:
        """Lock (waiting up to ``lock_timeout_s``), check meta, restore the snapshot, replay the log
        tail, refresh once."""
        t0 = time.perf_counter()
        self.lock.acquire(self.spec.lock_timeout_s)
        return self._open_locked(t0)

    def start(self) -> dict[str, Any]:
        """The service's start, never waiting for the lock: the writer (:meth:`open`) when the lock
        is free, else a standby (:meth:`open_standby`) that takes over once it frees (:meth:`promote`)."""
        t0 = time.perf_counter()
        if self.lock.try_acquire():
            return self._open_locked(t0)
        return self.open_standby()

    def _open_locked(self, t0: float) -> dict[str, Any]:
        try:
            return self._open(t0)
        except BaseException:
            self.journal.close()
            self.lock.release()
            raise

    def _restore_snapshot(self, snap_path: Path) -> tuple[bool, str | None, int]:
        """Restore ``snap_path`` (or rebuild from its history under a changed config): ``(restored,
        why rebuilt or None, duels rebuilt)``. Sets the applied seq and position, the used nonces."""
        snap = load_snapshot(snap_path)
        meta = snap["meta"]
        added = arms_added(list(meta["arm_ids"]), list(self.arm_ids), str(snap_path))
        self.last_applied_seq = self.snapshot_seq = int(meta["last_seq"])
        position = meta.get("log_position")  # absent in snapshots of the JSON-lines log
        self.last_applied_position = None if position is None else (int(position[0]), int(position[1]))
        self.used = _used_from(meta.get("used"))
        self.last_snapshot_at = float(meta["created_at"])
        rebuilt = f"arms added ({', '.join(added)})" if added else self._snapshot_mismatch(snap["policy"])
        if self._reembed is not None:
            rebuilt = f"encoder changed ({self._reembed['from']} -> {self.spec.encoder_identity})"
        if rebuilt is None:
            self.policy.restore(snap["policy"])
            return True, None, 0
        return False, rebuilt, self._rebuild_from_history(snap["policy"]["history"])

    def _open(self, t0: float) -> dict[str, Any]:
        self._check_meta()
        migrated = durable.migrate_json_log(self.dir / LEGACY_LOG, self.journal.dir, self.journal.segment_bytes)
        if self._reembed is not None:
            self._prepare_reembed()
        snap_path = self.dir / SNAPSHOT_FILE
        restored, rebuilt, from_history, has_snapshot = False, None, 0, snap_path.exists()
        if has_snapshot:
            restored, rebuilt, from_history = self._restore_snapshot(snap_path)
            self._require_log_dir(snap_path)
        self.journal.open()
        replayed = self._replay_tail(snap_path)
        if has_snapshot:
            self.journal.compact(self.snapshot_seq)  # finishes a compaction that a crash interrupted
        now = self.clock()
        self._prune_used(now)
        self.refresh()
        self._opened = True
        self.standby = False
        reembedded = self._finish_reembed()
        self.recovery = {
            "reembedded": reembedded,
            "restored_snapshot": restored,
            "rebuilt_from_log": rebuilt,
            "rebuilt_from_history": from_history,
            "snapshot_seq": self.snapshot_seq,
            "replayed": replayed,
            "migrated_json_log": migrated,
            "log_segments": len(self.journal.segments),
            "seconds": round(time.perf_counter() - t0, 3),
            "at": now,
        }
        return self.recovery

    def _require_log_dir(self, snap_path: Path) -> None:
        if not self.journal.dir.is_dir():
            raise ConfigError(
                f"{snap_path} covers feedback up to seq {self.snapshot_seq} but {self.journal.dir} does not "
                "exist: restore the log directory from a backup, or move the snapshot away to start afresh"
            )

    # ------------------------------------------------------------------ standby
    def open_standby(self) -> dict[str, Any]:
        """Start as a standby while another process holds the lock (an upgrade's old cluster): read
        ``meta.json`` (checked when present), the snapshot and the log, never writing, cutting or
        compacting anything and never taking the lock; :meth:`follow` then keeps up with the
        holder's appends and :meth:`promote` takes over once the lock frees."""
        t0 = time.perf_counter()
        self.standby = True
        self._check_meta(write=False)
        restored, rebuilt, from_history = self._reload()
        followed = 0
        while (n := self.follow()) > 0:
            followed += n
        self._prune_used(self.clock())
        self.refresh()
        self._opened = True
        self.recovery = {
            "role": "standby",
            "restored_snapshot": restored,
            "rebuilt_from_log": rebuilt,
            "rebuilt_from_history": from_history,
            "snapshot_seq": self.snapshot_seq,
            "replayed": followed,
            "migrated_json_log": None,
            "log_segments": len(self.journal.segments),
            "seconds": round(time.perf_counter() - t0, 3),
            "at": self.clock(),
        }
        return self.recovery

    def _reload(self) -> tuple[bool, str | None, int]:
        """A fresh policy from the newest snapshot (none: the prior), nothing of the log applied yet.
        The samples served meanwhile stay those of the last refresh (``view`` reads ``_serving``)."""
        self.policy = make_scorer(
            self.spec.arm_embeddings, self.spec.policy_config, self.spec.policy_seed, self.spec.offline_prior
        )
        self.used, self.last_applied_seq, self.last_applied_position, self.snapshot_seq = {}, 0, None, 0
        self._last_nonce = None
        self.reloads += 1
        snap_path = self.dir / SNAPSHOT_FILE
        if not snap_path.exists():
            return False, None, 0
        out = self._restore_snapshot(snap_path)
        self._require_log_dir(snap_path)
        return out

    def follow(self, limit: int = 4096) -> int:
        """Standby only (mutation thread): apply the records the holder appended since the last
        call, at most ``limit``; when the ones due next were compacted away, re-read the newest
        snapshot first. Returns how many were applied."""
        if not self.standby:
            raise RuntimeError("follow() is for a standby; the writer applies its own appends")
        if self._follow_arm_changes():  # the writer added or retired arms: its table, then its snapshot
            self._reload()
        for _ in range(3):  # a compaction between reading the snapshot and the log: read both again
            try:
                records = self.journal.tail(self.last_applied_seq, self.last_applied_position, limit)
                break
            except durable.LogCompacted:
                self._reload()
        else:
            return 0
        for end, rec in records:
            rec["_end"] = end
            key, entry = _used_entry(rec)
            self.used[key] = entry
        now = self.clock()
        if now - self._pruned_at >= PRUNE_EVERY_S:  # here, on the mutation thread that fills ``used``
            self._prune_used(now)
            self._pruned_at = now
        return self.apply([rec for _, rec in records])

    def promote(self) -> dict[str, Any] | None:
        """Standby -> writer when the lock is free (tried without waiting; None while it is held):
        take it, open the log for appending (cutting a torn tail the old writer left), check that
        the last record applied while following is still the log's (else re-read the snapshot),
        apply the tail not yet seen, refresh. Nothing is applied twice (seqs) or lost (the log)."""
        if not self.standby:
            raise RuntimeError("promote() is for a standby")
        t0 = time.perf_counter()
        if not self.lock.try_acquire():
            return None
        try:
            arms_changed = self._follow_arm_changes()  # the old writer's last arm change, if not yet followed
            self._check_meta()
            migrated = durable.migrate_json_log(self.dir / LEGACY_LOG, self.journal.dir, self.journal.segment_bytes)
            snap_path = self.dir / SNAPSHOT_FILE
            if not self.journal.dir.is_dir() and snap_path.exists():
                self._require_log_dir(snap_path)
            self.journal.open()
            # compacted past what was followed (the old writer's last snapshot), or diverged: re-read
            reloaded = (
                arms_changed or self.journal.first_seq > self.last_applied_seq + 1 or not self._followed_matches_log()
            )
            if reloaded:
                self._reload()
            replayed = self._replay_tail(snap_path)
            if snap_path.exists():
                self.journal.compact(self.snapshot_seq)
        except BaseException:
            self.journal.close()
            self.lock.release()
            raise
        self.standby = False
        self._prune_used(self.clock())
        self.refresh()
        self.recovery = {
            **self.recovery,
            "role": "writer",
            "promoted_at": self.clock(),
            "promotion_replayed": replayed,
            "promotion_reloaded_snapshot": reloaded,
            "migrated_json_log": migrated,
            "promotion_seconds": round(time.perf_counter() - t0, 3),
        }
        return self.recovery

    def _followed_matches_log(self) -> bool:
        """Whether what the standby applied is the log the writer now opened: the record of
        ``last_applied_seq`` is still there with the nonce that was applied (a writer cuts back a
        write whose fsync failed; a follower may have read it before)."""
        seq = self.last_applied_seq
        if seq == self.snapshot_seq:  # nothing applied from the log beyond a durable snapshot
            return True
        if self.journal.last_seq < seq or self.journal.first_seq > seq:
            return False
        for _, rec in self.journal.scan(self.journal.start_for(seq - 1)):
            if int(rec["seq"]) == seq:
                return rec["nonce"] == self._last_nonce
            if int(rec["seq"]) > seq:
                break
        return False

    def _replay_tail(self, snap_path: Path) -> int:
        """``apply`` every log record after the snapshot, from the snapshot's log position."""
        after = self.last_applied_seq
        last, first = self.journal.last_seq, self.journal.first_seq
        if last < after:
            raise ConfigError(
                f"{snap_path} covers feedback up to seq {after}, but {self.journal.dir} ends at seq {last}: "
                "the log was truncated or replaced"
            )
        if first > after + 1:
            raise ConfigError(
                f"{self.journal.dir} starts at seq {first}, and the snapshot covers feedback up to seq {after}: "
                f"records {after + 1}..{first - 1} are missing"
            )
        replayed = 0
        batch: list[dict] = []
        for end, rec in self.journal.scan(self.journal.start_for(after, self.last_applied_position)):
            seq = int(rec["seq"])
            if seq <= after:
                continue
            if seq != after + 1 + replayed + len(batch):
                raise DataError(f"{self.journal.dir}: record seq {seq} where seq {after + 1} was due")
            rec["_end"] = end
            batch.append(rec)
            key, entry = _used_entry(rec)
            self.used[key] = entry
            if len(batch) >= 1024:
                replayed += self.apply(batch)
                batch = []
        replayed += self.apply(batch)
        return replayed

    def _rebuild_from_history(self, history: dict[str, np.ndarray]) -> int:
        """``policy.update`` for every duel a snapshot's policy holds (its raw query embeddings are
        the first ``dim`` columns of its contexts), under the current config; after an encoder
        change, on the new embeddings of their kept texts (a duel without one is skipped)."""
        dim = self.dim if self._reembed is None else int(self._reembed["dim"])
        X = np.asarray(history["X"])[:, :dim]
        first, second, y, mask = (np.asarray(history[k]) for k in ("first", "second", "y", "mask"))
        w = np.asarray(history["w"]) if "w" in history else np.ones(len(y))  # absent: before weights
        grown = mask.shape[1] < self.policy.n_arms  # arms were added since: they were not offered then
        n = 0
        for i in range(len(y)):
            x = X[i] if self._reembed is None else self._translate(X[i])
            if x is None:
                continue
            offered = None if mask[i].all() and not grown else np.flatnonzero(mask[i]).tolist()
            self.policy.update(x, Duel(int(first[i]), int(second[i])), float(y[i]), offered, float(w[i]))
            n += 1
        return n

    # ----------------------------------------------------------- encoder change
    def _prepare_reembed(self) -> None:
        """The encoder changed and the query texts were kept: encode, with the new encoder (through
        the embedding cache), the text of every duel the snapshot's history and the log hold."""
        from ray_router.policies.snapshot import load_snapshot
        from ray_router.serve.query_store import load_queries, query_key
        from ray_router.serve.tokens import quantise

        assert self._reembed is not None
        t0 = time.perf_counter()
        old_dim = int(self._reembed["dim"])
        keys: set[str] = set()
        snap_path = self.dir / SNAPSHOT_FILE
        if snap_path.exists():
            X = np.asarray(load_snapshot(snap_path)["policy"]["history"]["X"])[:, :old_dim]
            keys.update(query_key(x) for x in X)
        for _, rec in self.journal.scan():
            x = rec["x"]
            keys.add(query_key(decode_vector(x) if isinstance(x, str) else x))
        texts = load_queries(self.dir, keys)
        order = sorted(texts)
        if order:
            encoder = self._encoder_factory() if self._encoder_factory is not None else self._spec_encoder()
            if encoder.identity != self.spec.encoder_identity:
                raise ConfigError(
                    f"re-embedding: the encoder is {encoder.identity!r}, the config's {self.spec.encoder_identity!r}"
                )
            E = np.asarray(encoder.encode([texts[k] for k in order]))
            if E.shape[1] != self.dim:
                raise ConfigError(f"re-embedding: the encoder gives dimension {E.shape[1]}, the arm table {self.dim}")
            self._new_x = {k: quantise(e) for k, e in zip(order, E)}
        self._reembed.update(duels=len(keys), texts=len(order), encode_seconds=round(time.perf_counter() - t0, 3))
        self._reembed["missing"] = 0

    def _spec_encoder(self) -> Any:
        from ray_router.embeddings import get_encoder

        enc = self.spec.encoder
        if enc is None:
            raise ConfigError("re-embedding needs the encoder's spec (PosteriorSpec.encoder)")
        return get_encoder(enc.name, cache_dir=None, device=enc.device, **enc.encoder_options())

    def _translate(self, x: np.ndarray) -> np.ndarray | None:
        """The new embedding of an old-encoder query embedding (None: its text was not kept)."""
        from ray_router.serve.query_store import query_key

        assert self._reembed is not None
        new = self._new_x.get(query_key(np.asarray(x)[: int(self._reembed["dim"])]))
        if new is None:
            self._reembed["missing"] += 1
        return new

    def _finish_reembed(self) -> dict[str, Any] | None:
        """After the rebuild: a snapshot of the new-encoder posterior (the old-encoder log records
        are compacted away), then ``meta.json`` names the new encoder; until then a restart redoes it."""
        if self._reembed is None:
            return None
        done, self._reembed, self._new_x = self._reembed, None, {}
        self.take_snapshot()
        meta_path = self.dir / "meta.json"
        found = read_meta(meta_path) or {}
        write_meta(
            meta_path,
            {
                **found,
                "arm_ids": list(self.arm_ids),
                "encoder_identity": self.spec.encoder_identity,
                "dim": self.dim,
                "encoder_changed_at": self._encoder_changed_at,
                "encoder_changed_from": done["from"],
            },
        )
        logger.warning(f"posterior: rebuilt for a new encoder from the kept query texts: {done}")
        return done

    def _check_meta(self, write: bool = True) -> None:
        meta_path = self.dir / "meta.json"
        want = {"arm_ids": list(self.arm_ids), "encoder_identity": self.spec.encoder_identity, "dim": self.dim}
        found = read_meta(meta_path)
        if found is None:
            if not write:  # a standby: the lock holder writes it
                return
            write_meta(meta_path, {**want, "created_at": self.clock()})
            return
        if found.get("encoder_changed_at") is not None:
            self._encoder_changed_at = float(found["encoder_changed_at"])
        if found.get("encoder_identity") != want["encoder_identity"]:
            hint = (
                "the posterior's query embeddings are of that encoder and no query text was kept "
                "(state.keep_queries: true keeps them, so that an encoder change re-embeds them)"
            )
            if self.spec.keep_queries and not write:
                hint = (
                    "a standby cannot re-embed; restart the service in place (one process at a time) to change encoder"
                )
            if not (self.spec.keep_queries and write):
                raise ConfigError(
                    f"{self.dir} holds the posterior of another configuration (encoder_identity: "
                    f"{found.get('encoder_identity')!r}, config: {want['encoder_identity']!r}): {hint}; or point "
                    "state.dir at a new directory"
                )
            self._reembed = {"from": found.get("encoder_identity"), "dim": int(found.get("dim") or 0)}
            self._encoder_changed_at = self.clock()
            found = {**found, "encoder_identity": want["encoder_identity"], "dim": want["dim"]}
        added = arms_added(list(found.get("arm_ids") or []), list(self.arm_ids), str(meta_path))
        if added and write:  # the arm table grew (appended arms): the state is this table's from now on
            write_meta(meta_path, {**found, "arm_ids": want["arm_ids"], "arms_added_at": self.clock()})
            found = {**found, "arm_ids": want["arm_ids"]}
        for key in ("arm_ids", "encoder_identity", "dim"):
            if key == "arm_ids" and added:  # a standby reads the grown table before the writer records it
                continue
            if found.get(key) != want[key]:
                raise ConfigError(
                    f"{self.dir} holds the posterior of another configuration ({key}: {found.get(key)!r}, config: "
                    f"{want[key]!r}); point state.dir at a new directory or restore the old config"
                )

    def _snapshot_mismatch(self, snap_policy: dict) -> str | None:
        """Why the snapshot cannot be restored under the current config (then the posterior is
        rebuilt from the whole log, which holds every duel with its context), or None."""
        import dataclasses

        want = dataclasses.asdict(self.policy.config)
        have = dict(snap_policy.get("config", {}))
        changed = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if changed:
            return f"policy config changed ({', '.join(changed)})"
        old = np.asarray(snap_policy["arm_embeddings"], dtype=np.float64)
        new = np.asarray(self.spec.arm_embeddings, dtype=np.float64)
        if old.shape != new.shape or not np.allclose(old, new, rtol=1e-6, atol=1e-9):
            return "arm embeddings changed"
        from ray_router.policies.offline_prior import OfflinePrior

        old_prior, new_prior = snap_policy.get("offline_prior"), getattr(self.policy, "prior", None)
        if (old_prior is None) != (new_prior is None) or (
            new_prior is not None and old_prior is not None and not new_prior.same_as(OfflinePrior.from_dict(old_prior))
        ):
            return "offline prior changed"
        return None

    def close(self) -> None:
        self.journal.close()
        self.lock.release()  # a standby does not hold it: then a no-op

    @property
    def role(self) -> str:
        return "standby" if self.standby else "writer"

    # ------------------------------------------------------------------ samples
    @property
    def version(self) -> int:
        return int(self._serving.n_refreshes)

    def view(self) -> dict[str, Any]:
        """The current samples for a :class:`~ray_router.serve.ranking.SampleView`: those of the last
        refresh (``_serving``; a standby's re-read of a snapshot replaces ``policy`` before that).
        Under ``second_arm: rival`` also ``variance`` (p,), the diagonal Laplace variance the rival
        rule needs, as it was at that refresh (one more row beside the pool's 2·M; absent otherwise,
        and an ingress that gets none duels θ²'s arm)."""
        p = self._serving
        theta, theta_mean, version = p.theta, p.theta_mean, int(p.n_refreshes)
        pool = [s for s in self._pool if s.shape == theta.shape]  # after a rebuild, only the new samples
        if not pool or pool[-1] is not theta:
            pool.append(theta)
        out = {
            "version": version,
            "theta": theta,
            "theta_mean": theta_mean,
            "pool": np.stack(pool),
            "arms": self._serving_arms,
        }
        if p.config.second_arm == "rival":
            v = self._variance
            # before the first refresh (or a standby's re-read): the served policy's own, computed now
            out["variance"] = v[1] if v is not None and v[0] is theta else p.posterior_variance()
        return out

    # ----------------------------------------------------------------- feedback
    def begin_feedback(
        self, claims: DecisionClaims, outcome: str, request_id: str, source: str = "human"
    ) -> dict | tuple[str, dict]:
        """A log record to append, or ``("replay", ack)`` when this very request (same request id)
        was already recorded. ``claims`` come from a verified decision id; ``source``: ``human``
        or ``judge`` (then the record weighs ``spec.judge_weight``). Raises the 4xx errors of the
        contract otherwise."""
        if outcome not in OUTCOMES:
            raise ConfigError(f"outcome must be one of {list(OUTCOMES)}")
        if source not in SOURCES:
            raise ConfigError(f"source must be one of {list(SOURCES)}")
        nonce = claims.nonce
        key = used_key(nonce, source)
        used = self.used.get(key)
        if used is not None:
            if used["r"] == request_id:
                return "replay", self._ack(nonce, used["s"], used["y"], replayed=True)
            self.counts["rejected_feedback"]["duplicate"] += 1
            raise DuplicateFeedback(
                f"feedback for this decision was already recorded (outcome {used['y']!r}); a decision takes one feedback"
            )
        if key in self.inflight:
            self.counts["rejected_feedback"]["duplicate"] += 1
            raise DuplicateFeedback("feedback for this decision is being recorded by another request")
        now = self.clock()
        if claims.expires_at <= now:
            self.counts["rejected_feedback"]["expired"] += 1
            raise ExpiredDecision("decision_id has expired")
        changed = self._encoder_changed_at
        if changed is not None and claims.expires_at - self.spec.decision_ttl_s < changed:
            raise StaleDecision(
                "decision_id was issued before the encoder changed: its query embedding is of the old encoder"
            )
        if claims.mode != "duel" or claims.second is None or claims.x is None:
            self.counts["rejected_feedback"]["not_a_duel"] += 1
            raise NotADuel("a single-mode decision served one arm; pairwise feedback needs a duel")
        x = np.asarray(claims.x, dtype=np.float32)
        arms = [claims.first, claims.second, *(claims.offered or ())]
        if x.shape != (self.dim,) or not np.isfinite(x).all() or min(arms) < 0 or max(arms) >= self.n_arms:
            raise MalformedRequest("decision_id does not fit this posterior (dimension or arm index)")
        self.inflight[key] = request_id
        return {
            "nonce": nonce,
            "request_id": request_id,
            "outcome": outcome,
            "y": OUTCOMES[outcome],
            "first": int(claims.first),
            "second": int(claims.second),
            "first_id": self.arm_ids[claims.first],
            "second_id": self.arm_ids[claims.second],
            "offered": None if claims.offered is None else [int(i) for i in claims.offered],
            "x": x,
            "expires_at": int(claims.expires_at),
            "ts": now,
            "source": source,
            "weight": 1.0 if source == "human" else float(getattr(self.spec, "judge_weight", 1.0)),
            "propensity": claims.propensity,  # of the served pair (None: unknown)
            "config_version": self._config_version,
        }

    def end_feedback(self, key: str, record: dict | None) -> dict | None:
        """After the durable append (``record`` with its ``seq``), or after a failed one (None).
        ``key``: the decision's :func:`used_key` for the record's source."""
        self.inflight.pop(key, None)
        if record is None:
            return None
        key, entry = _used_entry(record)
        self.used[key] = entry
        self.counts["feedback"][record["outcome"]] += 1
        source = record.get("source", "human")
        self.counts["feedback_by_source"][source] += 1
        ack = self._ack(record["nonce"], record["seq"], record["outcome"], replayed=False)
        if source != "human":  # a human's acknowledgement keeps the shape of a router without a judge
            ack["source"] = source
        other = self.used.get(used_key(record["nonce"], "judge" if source == "human" else "human"))
        if other is not None:  # a human and a judge verdict on one decision: do they agree?
            agreement = "agree" if other["y"] == record["outcome"] else "disagree"
            self.counts["judge_agreement"][agreement] += 1
            ack["agreement"] = agreement
        return ack

    def _ack(self, nonce: str, seq: int, outcome: str, replayed: bool) -> dict:
        return {"accepted": True, "seq": int(seq), "outcome": outcome, "replayed": replayed}

    # ---------------------------------------------------- mutation thread only
    def apply(self, records: list[dict]) -> int:
        """``policy.update`` for durable records, in seq order (the log's order)."""
        n = 0
        for rec in records:
            seq = int(rec["seq"])
            if seq <= self.last_applied_seq:
                continue
            if seq != self.last_applied_seq + 1 and self._opened:
                raise RuntimeError(f"feedback applied out of order: seq {seq} after {self.last_applied_seq}")
            x = rec["x"]
            if isinstance(x, str):  # a record in the JSON-lines form (base64)
                x = decode_vector(x)
            if self._reembed is not None:  # logged under the old encoder: its text's new embedding
                x = self._translate(x)
                if x is None:  # no text kept: the duel cannot be learned under the new encoder
                    self.last_applied_seq, self.last_applied_position = seq, rec["_end"]
                    self._last_nonce = rec.get("nonce")
                    continue
            if x.shape[0] != self.dim:
                raise ConfigError(f"log record {seq} has a {x.shape[0]}-d embedding, the posterior {self.dim}")
            duel = Duel(int(rec["first"]), int(rec["second"]))
            self.policy.update(x, duel, float(rec["y"]), rec["offered"], float(rec.get("weight", 1.0)))
            self.last_applied_seq = seq
            self.last_applied_position = rec["_end"]
            self._last_nonce = rec.get("nonce")
            n += 1
        return n

    @property
    def pending_updates(self) -> int:
        """Applied updates that no refresh has seen yet."""
        return int(self.policy.n_updates - self.policy.refreshed_at)

    def refresh(self, n_steps: int | None = None) -> float:
        t0 = time.perf_counter()
        self.policy.refresh(n_steps)
        self._serving, self._serving_arms = self.policy, self.arms_fingerprint
        self._pool.append(self.policy.theta)  # refresh assigns a new array: the old one stays as it was
        if self.policy.config.second_arm == "rival":  # here, not in view(): updates change it in place
            self._variance = (self.policy.theta, self.policy.posterior_variance())
        self.last_refresh_s = time.perf_counter() - t0
        self.last_refresh_at = self.clock()
        return self.last_refresh_s

    def snapshot_due(self, now: float) -> bool:
        new = self.last_applied_seq - self.snapshot_seq
        if new <= 0:
            return False
        if new >= self.spec.snapshot_every_n:
            return True
        since = now - (self.last_snapshot_at if self.last_snapshot_at is not None else self.started_at)
        return since >= self.spec.snapshot_every_s

    def take_snapshot(self) -> Path:
        if self.standby:
            raise Standby("this posterior is a standby: the lock holder writes the snapshots")
        now = self.clock()
        seq = self.last_applied_seq
        used = {k: v for k, v in self.used.copy().items() if int(v["s"]) <= seq and v["e"] > now}
        snap = {
            "policy": self.policy.snapshot(),
            "meta": {
                "last_seq": seq,
                "log_position": None if self.last_applied_position is None else list(self.last_applied_position),
                "arm_ids": list(self.arm_ids),
                "encoder_identity": self.spec.encoder_identity,
                "used": _used_columns(used),
                "created_at": now,
                "pid": os.getpid(),
            },
        }
        path = save_snapshot(snap, self.dir / SNAPSHOT_FILE)  # temp file, fsync, rename
        durable.fsync_dir(self.dir)  # the rename is durable: now the segments it covers may go
        self.snapshot_seq, self.last_snapshot_at = seq, now
        self.journal.compact(seq)
        return path

    # ------------------------------------------------------------- housekeeping
    def _prune_used(self, now: float) -> None:
        for k in [k for k, v in self.used.items() if v["e"] <= now]:
            self.used.pop(k, None)

    def prune(self) -> None:
        self._prune_used(self.clock())

    def stats(self) -> dict[str, Any]:
        p = self.policy
        return {
            "role": self.role,
            "counts": {
                **{k: dict(v) for k, v in self.counts.items()},
                "used_decisions": len(self.used),
            },
            "posterior": {
                "version": self.version,
                "n_updates": int(p.n_updates),
                "n_refreshes": int(p.n_refreshes),
                "refreshed_at_update": int(p.refreshed_at),
                "history_size": int(getattr(getattr(p, "history", None), "n", p.n_updates)),
                "last_refresh_at": self.last_refresh_at,
                "last_refresh_seconds": self.last_refresh_s,
                "offline_prior": COLD_START_NOTE if self.spec.cold_start else getattr(p, "prior_note", ""),
                "cold_start": bool(self.spec.cold_start),
                "unreachable_arms": self.unreachable_arms,
                "arm_selection": getattr(p.config, "arm_selection", "thompson"),
                "config_version": self._config_version,
                "arms_fingerprint": self.arms_fingerprint,
            },
            "durability": {
                "feedback_log_bytes": int(self.journal.size_bytes),
                "log_segments": len(self.journal.segments),
                "log_first_seq": int(self.journal.first_seq),
                "segments_deleted": int(self.journal.n_deleted),
                "last_seq": int(self.journal.last_seq),
                "last_applied_seq": int(self.last_applied_seq),
                "snapshot_seq": int(self.snapshot_seq),
                "last_snapshot_at": self.last_snapshot_at,
                "fsyncs": int(self.journal.n_fsyncs),
                "recovery": dict(self.recovery),
            },
            "started_at": self.started_at,
        }


def _used_columns(used: dict[str, dict]) -> dict[str, np.ndarray]:
    """The used-nonce table as columns (compact in a snapshot, quick to load)."""
    vals = list(used.values())
    return {
        "nonce": np.array(list(used), dtype=str),
        "request_id": np.array([v["r"] for v in vals], dtype=str),
        "seq": np.array([v["s"] for v in vals], dtype=np.int64),
        "outcome": np.array([v["y"] for v in vals], dtype=str),
        "expires": np.array([v["e"] for v in vals], dtype=np.int64),
    }


def _used_from(stored: Any) -> dict[str, dict]:
    """The used-nonce table of a snapshot: columns, or the dict of earlier versions."""
    if not stored:
        return {}
    if isinstance(stored.get("nonce"), np.ndarray):
        cols = [stored[k].tolist() for k in ("nonce", "request_id", "seq", "outcome", "expires")]
        return {n: {"r": r, "s": s, "y": y, "e": e} for n, r, s, y, e in zip(*cols)}
    return {str(k): dict(v) for k, v in stored.items()}
