"""The standby posterior without Ray: a second :class:`PosteriorService` started on a state directory
whose lock another one holds (a KubeRay ``NewCluster`` upgrade's new cluster beside the old one)
follows the holder's log read-only, through its compactions, and takes over when the lock frees,
with nothing lost and nothing applied twice. Both services run in this process on real files; the
lock is a real ``flock`` (two open file descriptions conflict even within one process)."""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import pytest

from ray_router.policies.snapshot import load_snapshot
from ray_router.serve.durable import LOG_DIR, FeedbackJournal
from ray_router.serve.errors import Standby
from ray_router.serve.state import SNAPSHOT_FILE
from tests.serve import test_state
from tests.serve.test_state import Clock, Router, crash

enc, router = test_state.enc, test_state.router  # the fixtures of test_state: a service on a temp state dir

POLL_S = 0.05


def wait_until(r: Router, predicate, timeout_s: float = 30.0, what: str = "condition") -> None:
    """Run ``r``'s event loop (its background loops: follow, lock, refresh) until ``predicate()``."""

    async def poll() -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            await asyncio.sleep(POLL_S)
        return bool(predicate())

    assert r.run(poll()), f"timed out after {timeout_s}s waiting for {what}"


def feed(r: Router, n: int, tag: str) -> list[dict]:
    """n acknowledged feedbacks on the writer ``r`` (varied queries, all three outcomes)."""
    acks = []
    for i in range(n):
        d = r.route(f"{tag} query {i}")
        acks.append(r.feedback(d.decision_id, ("first", "second", "tie")[i % 3], f"{tag}-{i}"))
    r.settle()
    return acks


def history(r: Router) -> dict[str, np.ndarray]:
    return r.st.policy.snapshot()["history"]


def same_learned_state(a: Router, b: Router) -> None:
    """b applied exactly a's duels, in a's order (contexts, arms, outcomes, offered sets)."""
    ha, hb = history(a), history(b)
    assert set(ha) == set(hb)
    for k in ha:
        np.testing.assert_array_equal(ha[k], hb[k], err_msg=k)
    assert b.st.policy.n_updates == a.st.policy.n_updates == a.st.last_applied_seq
    assert set(b.st.used) == set(a.st.used)


class Recorder:
    """Collects what the service records (the metrics object under Serve is Ray's)."""

    def __init__(self) -> None:
        self.values: list[tuple[float, dict | None]] = []

    def inc(self, value: float = 1.0, tags: dict | None = None) -> None:
        self.values.append((value, tags))

    observe = set = inc


class Metrics:
    def __init__(self) -> None:
        for name in ("feedback", "refresh", "apply_lag", "log_bytes", "version", "role"):
            setattr(self, name, Recorder())

    def role_now(self) -> str:
        last = {tags["role"]: v for v, tags in self.role.values}
        (role,) = [k for k, v in last.items() if v == 1]
        return role


@pytest.mark.parametrize("holder_stops", ["close", "crash"])
def test_a_standby_follows_the_holder_through_compaction_and_takes_over(router, holder_stops):
    clock = Clock()
    seg = 1_000  # ~6 records a segment at d = 16: compactions delete segments the standby was reading
    a = router(clock, segment_bytes=seg)
    acked = feed(a, 8, "a1")
    mb = Metrics()
    b = router(clock, segment_bytes=seg, standby_poll_s=POLL_S, metrics=mb)
    assert a.svc.role == "writer" and b.svc.role == "standby" and mb.role_now() == "standby"
    assert b.st.last_applied_seq == 8 and b.st.recovery["role"] == "standby"  # read at start
    assert b.run(b.svc.stats())["role"] == "standby" and b.run(b.svc.status())["role"] == "standby"
    assert b.run(b.svc.health())["role"] == "standby"
    assert b.run(b.svc.status())["lock_holder"]["pid"] == os.getpid()  # A, in this process
    same_learned_state(a, b)

    # writes are refused with a retryable 503; nothing of the refused feedback is kept anywhere
    d = b.route("refused while standby")
    with pytest.raises(Standby) as refused:
        b.feedback(d.decision_id, "first", "refused-1")
    assert refused.value.http_status == 503 and int(refused.value.headers["Retry-After"]) > 0
    for admin in (b.svc.snapshot_now(), b.svc.refresh_now()):
        with pytest.raises(Standby):
            b.run(admin)
    assert d.decision_id and not (set(b.st.used) - set(a.st.used))

    # the holder keeps writing: the standby follows and publishes new samples
    acked += feed(a, 10, "a2")
    v0 = b.st.version
    wait_until(b, lambda: b.st.last_applied_seq == a.st.journal.last_seq == 18, what="the standby to follow")
    wait_until(b, lambda: b.st.version > v0 and b.st.pending_updates == 0, what="the standby's refresh")
    same_learned_state(a, b)

    # the holder snapshots: the segments the standby was reading are deleted; it re-reads the snapshot
    acked += feed(a, 10, "a3")
    a.run(a.svc.snapshot_now())
    assert a.st.journal.first_seq > b.st.last_applied_seq + 1, "the compaction must outrun the standby"
    acked += feed(a, 5, "a4")
    reloads = b.st.reloads
    wait_until(b, lambda: b.st.last_applied_seq == a.st.journal.last_seq == 33, what="following after compaction")
    assert b.st.reloads > reloads
    same_learned_state(a, b)
    acked += feed(a, 3, "a5")  # not followed yet when the holder stops: the promotion applies it

    # the holder stops (a graceful close leaves a last snapshot and compacts; a crash just drops the lock)
    if holder_stops == "close":
        a.close()
    else:
        crash(a)
    wait_until(b, lambda: b.svc.role == "writer", what="the takeover")
    # the promotion applied what the standby had not followed yet, before the writer started
    # (the holder's last snapshot covers them after a close: re-read; after a crash: the log's tail)
    assert b.st.last_applied_seq == b.st.journal.last_seq == 36
    promoted = b.st.recovery
    # after a close, the last snapshot and compaction may have deleted the segment the standby was
    # reading (then it re-reads the snapshot) or not (the 3 records still follow in the log): which
    # one depends on where the segments roll, i.e. on the records' sizes
    reread = holder_stops == "close" and promoted["promotion_reloaded_snapshot"]
    assert reread or promoted["promotion_replayed"] == 3, promoted
    assert mb.role_now() == "writer"
    assert b.st.recovery["role"] == "writer" and b.st.lock.held
    assert b.run(b.svc.health())["role"] == "writer" and b.run(b.svc.stats())["role"] == "writer"

    # the new writer accepts feedback (the one refused above, too) and refuses a duplicate
    acked.append(b.feedback(d.decision_id, "first", "refused-1-retry"))
    acked += feed(b, 4, "b1")
    with pytest.raises(Exception, match="already recorded"):
        b.feedback(d.decision_id, "second", "another")

    # every acknowledged feedback is applied exactly once, in the log, by seq
    seqs = [ack["seq"] for ack in acked]
    assert sorted(seqs) == list(range(1, len(acked) + 1)) == list(range(1, b.st.journal.last_seq + 1))
    assert b.st.policy.n_updates == b.st.last_applied_seq == len(acked)
    logged = [rec for _, rec in FeedbackJournal(b.st.dir / LOG_DIR).scan()]
    snap_seq = logged[0]["seq"] - 1 if logged else len(acked)
    # what the log no longer holds, a snapshot on disk does (the holder's closing one, when the
    # promotion did not need to re-read it, is newer than the one the standby last read)
    on_disk = int(load_snapshot(b.st.dir / SNAPSHOT_FILE)["meta"]["last_seq"])
    assert snap_seq <= max(b.st.snapshot_seq, on_disk) and [r["seq"] for r in logged] == seqs[snap_seq:]
    assert len({r["nonce"] for r in logged}) == len(logged)


def test_a_standby_on_an_empty_state_dir_takes_over_when_the_holder_goes(router):
    clock = Clock()
    a = router(clock)
    b = router(clock, standby_poll_s=POLL_S)
    assert b.svc.role == "standby" and b.st.last_applied_seq == 0
    acked = feed(a, 3, "a")
    wait_until(b, lambda: b.st.last_applied_seq == 3, what="following from an empty start")
    a.close()
    wait_until(b, lambda: b.svc.role == "writer", what="the takeover")
    acked += feed(b, 2, "b")
    assert [x["seq"] for x in acked] == [1, 2, 3, 4, 5] and b.st.policy.n_updates == 5


def test_apply_lag_is_observed_once_per_feedback_when_its_samples_are_published(router):
    m = Metrics()
    a = router(Clock(), metrics=m)
    t0 = time.monotonic()
    feed(a, 6, "lag")
    elapsed = time.monotonic() - t0
    lags = [v for v, _ in m.apply_lag.values]
    assert len(lags) == 6, lags  # one observation per acknowledged feedback, none twice
    assert all(0 <= x <= elapsed for x in lags)
    assert len(m.feedback.values) == 6 and m.role_now() == "writer"


# ------------------------------------------------------------------ real processes, real Serve
def holder_main(args_json: str, acked_path: str) -> None:
    """The old cluster's Posterior, in a process of its own: the :class:`PosteriorService` that the
    app's builder would make from these app ``args`` (same state dir, arm table and keys), the
    writer; it records feedback on duels it issues itself and appends ``seq nonce`` to
    ``acked_path`` after each acknowledgement, until it is killed."""
    import json
    import secrets

    from ray_router.serve.arms import resolve_arm_table
    from ray_router.serve.builder import posterior_spec
    from ray_router.serve.config import AppArgs
    from ray_router.serve.posterior_service import PosteriorService
    from ray_router.serve.tokens import decision_signer, quantise

    args = AppArgs.model_validate(json.loads(args_json))
    table = resolve_arm_table(args)
    spec = posterior_spec(args, table, str(args.state_dir().resolve()))
    signer = decision_signer(spec.hmac_key_env, spec.state_dir, spec.arm_ids)[0]
    rng = np.random.default_rng(7)
    dim = int(np.asarray(spec.arm_embeddings).shape[1])

    async def run() -> None:
        svc = PosteriorService(spec, args.state.refresh_min_interval_s)
        await svc.start()
        assert svc.role == "writer", "the holder must start with the lock free"
        with open(acked_path, "a", buffering=1) as out:
            for i in range(10**9):
                x = rng.normal(size=dim)
                first, second = rng.choice(len(spec.arm_ids), size=2, replace=False)
                token = signer.issue(
                    secrets.token_hex(12),
                    time.time() + 600,
                    "duel",
                    int(first),
                    int(second),
                    None,
                    quantise(x / np.linalg.norm(x)),
                )
                ack = await svc.feedback(token, ("first", "second", "tie")[i % 3], f"holder-{i}")
                claims = signer.verify(token)
                out.write(f"{ack['seq']} {claims.nonce}\n")
                await asyncio.sleep(0.02)

    asyncio.run(run())


def _acked_by_holder(path) -> dict[str, int]:
    lines = path.read_text().split("\n")[:-1]  # a last line without its newline was cut by the kill
    return {nonce: int(seq) for seq, nonce in (line.split() for line in lines)}


@pytest.mark.integration
def test_a_serve_app_beside_a_live_writer_is_a_standby_and_takes_over_when_it_is_killed(serve_cluster, tmp_path):
    import json
    import subprocess
    import sys

    import httpx

    from ray_router.serve import launch
    from tests.serve.conftest import REPO, SECRET_ENV, delete_router, deploy_router, synthetic_arm_args, wait_for
    from tests.serve.helpers import error_code
    from tests.serve.test_recovery import _log_records, _nonce, _status

    state_dir = tmp_path / "state"
    arm_table = synthetic_arm_args(tmp_path / "arms", encoder="hash")
    base = launch.load_serve_config(REPO / "serve_configs" / "local.yaml")
    (app_cfg,) = launch.our_apps(base)
    holder_args = {**app_cfg["args"], **arm_table, "state": {"dir": str(state_dir)}}
    acked_path = tmp_path / "holder-acked.txt"
    acked_path.touch()
    env = {**os.environ, **SECRET_ENV, "PYTHONPATH": str(REPO)}
    code = f"from tests.serve.test_standby import holder_main; holder_main({json.dumps(json.dumps(holder_args))}, {str(acked_path)!r})"
    log = open(tmp_path / "holder.log", "wb")  # noqa: SIM115 - closed in finally
    holder = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True
    )
    try:
        wait_for(lambda: len(_acked_by_holder(acked_path)) >= 5 or holder.poll() is not None, 120, what="the holder")
        assert holder.poll() is None, (tmp_path / "holder.log").read_text()[-3000:]

        app = deploy_router(serve_cluster, state_dir, arm_table)  # RUNNING, though the lock is held
        health = httpx.get(f"{app.url}/healthz", timeout=30)
        assert health.status_code == 200 and health.json()["status"] == "standby", health.text
        assert health.json()["lock_holder"]["pid"] == holder.pid  # who to look for
        assert httpx.get(f"{app.url}/v1/stats", timeout=30).json()["role"] == "standby"
        assert _status(app)["posterior"]["role"] == "standby"
        route = httpx.post(f"{app.url}/v1/route", json={"query": "routes work on a standby"}, timeout=60)
        assert route.status_code == 200, route.text
        refused_id = route.json()["decision_id"]
        refused = httpx.post(
            f"{app.url}/v1/feedback", json={"decision_id": refused_id, "outcome": "first"}, headers=app.auth, timeout=60
        )
        assert refused.status_code == 503 and error_code(refused.json()) == "standby", refused.text
        assert int(refused.headers["retry-after"]) >= 1
        snap = httpx.post(f"{app.url}/v1/admin/snapshot", headers=app.admin, timeout=60)
        assert snap.status_code == 503 and error_code(snap.json()) == "standby", snap.text

        # the standby follows the live writer: its applied seq passes what the holder had acknowledged
        seen = max(_acked_by_holder(acked_path).values())
        wait_for(lambda: _status(app)["posterior"]["last_applied_seq"] >= seen, 30, what="the standby following")
        standby_pid = _status(app)["posterior"]["pid"]

        holder.kill()  # SIGKILL: no snapshot, the kernel drops the lock
        holder.wait(timeout=30)
        t_kill = time.monotonic()
        by_holder = _acked_by_holder(acked_path)
        wait_for(lambda: httpx.get(f"{app.url}/healthz", timeout=30).json()["status"] == "ok", 60, what="the takeover")
        takeover_s = time.monotonic() - t_kill

        # the refused feedback, retried, lands now; and new feedback is accepted
        by_http = {}
        retry = httpx.post(
            f"{app.url}/v1/feedback", json={"decision_id": refused_id, "outcome": "first"}, headers=app.auth, timeout=60
        )
        assert retry.status_code == 200, retry.text
        by_http[_nonce(refused_id)] = retry.json()["seq"]
        for i in range(10):
            d = httpx.post(f"{app.url}/v1/route", json={"query": f"after the takeover {i}"}, timeout=60).json()
            f = httpx.post(
                f"{app.url}/v1/feedback",
                json={"decision_id": d["decision_id"], "outcome": "tie"},
                headers=app.auth,
                timeout=60,
            )
            assert f.status_code == 200, f.text
            by_http[_nonce(d["decision_id"])] = f.json()["seq"]

        wait_for(lambda: (s := _status(app)["posterior"])["last_applied_seq"] == s["last_seq"], what="all applied")
        after = _status(app)["posterior"]
        # the standby itself became the writer: not a replacement replica recovering from the files
        assert after["pid"] == standby_pid and after["recovery"]["role"] == "writer", after
        assert "promotion_replayed" in after["recovery"], after["recovery"]
        records = _log_records(app)
        logged = {rec["nonce"]: rec["seq"] for rec in records}
        assert len(logged) == len(records), "a decision took two feedbacks"
        lost = {n: s for n, s in {**by_holder, **by_http}.items() if logged.get(n) != s}
        assert not lost, f"{len(lost)} acknowledged feedback(s) missing from the log"
        stats = httpx.get(f"{app.url}/v1/stats", timeout=60).json()
        assert stats["role"] == "writer"
        assert stats["posterior"]["n_updates"] == len(records) == stats["durability"]["last_seq"]
        print(
            f"standby -> writer: {len(by_holder)} acked by the holder, {len(by_http)} by the app, "
            f"{len(records)} logged, takeover {takeover_s:.2f}s after SIGKILL, "
            f"{after['recovery']['promotion_replayed']} records applied by the promotion"
        )
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=30)
        log.close()
        delete_router()
