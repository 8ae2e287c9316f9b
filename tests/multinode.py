"""A real multi-node Ray cluster on this one machine, for the two-node tests.

Each node is a ``ray start`` (head or worker) with its own raylet, CPUs, object store, custom
resources and labels, started in a new session: every process of that node (raylet, agents, the
workers its raylet forks, and on the head the GCS) stays in that session (Ray's workers make
themselves process-group leaders, so the session, not the group, is what holds a node). So

- :meth:`LocalCluster.kill_node` removes one node the way a machine loss does: SIGKILL of every
  process in its session, nothing graceful;
- :meth:`LocalCluster.node_of` tells which node a process (e.g. a replica's pid) runs on, from its
  session (``/proc``), without a Ray driver in the test process;
- :meth:`LocalCluster.shutdown` SIGKILLs every node's processes and checks that none is left
  (by session, never by name: other Ray instances may run on the machine).

No dashboard (saves about 1 GB and seconds); health checks are tightened on the head (Ray's defaults
take ~15 s to declare a dead node) so a lost node is noticed in about 2 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ray_router.raycompat import RAY_ENV_DEFAULTS

RAY = [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]  # the `ray` CLI of this venv

# GCS health checks of the raylets: a node is dead after 5 misses 1 s apart (Ray's defaults: 5
# misses 3 s apart, ~15 s). Tighter settings marked live raylets dead on a loaded 2-core machine.
FAST_FAILURE_ENV = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "2000",
    "RAY_health_check_failure_threshold": "5",
    "RAY_health_check_initial_delay_ms": "2000",
}
# `ray start` gives a raylet 30 s (hard-coded) to register with the GCS; on a 2-core machine that
# other jobs load, it sometimes takes longer: such a start is retried once (a new session).
SLOW_START = "timed out during startup"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, session, ...)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def session_pids(sid: int) -> list[int]:
    """Pids in session ``sid`` (zombies excluded). Ray's workers call setpgrp (each is its own
    process group) but stay in the session of the ``ray start`` that started their raylet."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (f := _proc_stat(d.name)) is not None and int(f[3]) == sid and f[0] != "Z":
            out.append(int(d.name))
    return out


def sid_of(pid: int) -> int | None:
    f = _proc_stat(pid)
    return None if f is None else int(f[3])


def wait_for_exit(pids: list[int], timeout_s: float) -> list[int]:
    """Block until every process of ``pids`` has exited (a pidfd turns readable when its process
    exits), or ``timeout_s``; the pids still running."""
    fds: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds[os.pidfd_open(pid)] = pid
    deadline = time.monotonic() + timeout_s
    try:
        while fds and (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(list(fds), [], [], left)
            for fd in ready:
                os.close(fd)
                del fds[fd]
        return sorted(fds.values())
    finally:
        for fd in fds:
            os.close(fd)


def kill_session(sid: int, timeout_s: float = 30.0, what: str = "session") -> None:
    """SIGKILL every process of session ``sid`` and wait until they are gone."""
    for _ in range(3):  # a process forked while we kill is caught by the next pass
        pids = session_pids(sid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_for_exit(pids, timeout_s)
    if left := session_pids(sid):
        raise AssertionError(f"processes of {what} survived SIGKILL: {left}")


@dataclass
class Node:
    name: str
    sid: int  # the `ray start` process's pid: the session of every process of this node
    num_cpus: float
    resources: dict[str, float]
    labels: dict[str, str]
    log: Path
    head: bool = False
    killed: bool = False

    def pids(self) -> list[int]:
        return session_pids(self.sid)


@dataclass
class LocalCluster:
    """Nodes started with :meth:`add_node`; the first one is the head."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rr-mn-", dir="/tmp")))
    env: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    port: int = field(default_factory=free_port)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def node_env(self) -> dict[str, str]:
        env = dict(os.environ)
        for k, v in RAY_ENV_DEFAULTS.items():
            env.setdefault(k, v)
        env.update(FAST_FAILURE_ENV)
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (our single-node default: loopback only) refuses a
        # second node. A multi-node Ray uses the machine's address (it replaces 127.0.0.1 with it).
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
        env.update(self.env)
        return env

    def add_node(
        self,
        name: str,
        num_cpus: float = 1,
        resources: dict[str, float] | None = None,
        labels: dict[str, str] | None = None,
        object_store_mb: int = 96,
        timeout_s: float = 120.0,
    ) -> Node:
        """Start one node (the head if it is the first) and return once ``ray start`` has finished."""
        head = not self.nodes
        resources = {name: 1.0, **(resources or {})}
        labels = {"rr-node": name, **(labels or {})}
        args = [
            "start",
            f"--num-cpus={num_cpus:g}",
            f"--resources={json.dumps(resources)}",
            "--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()),
            f"--object-store-memory={object_store_mb * 2**20}",
            "--disable-usage-stats",
            f"--temp-dir={self.root / 'ray'}",
        ]
        # fixed default ports (10001, 52365) would clash with other Ray instances on the machine
        args += [f"--dashboard-agent-listen-port={free_port()}"]
        if head:
            args += [
                "--head",
                f"--port={self.port}",
                "--include-dashboard=false",
                f"--ray-client-server-port={free_port()}",
            ]
        else:
            args += [f"--address={self.address}"]
        for attempt in (1, 2):
            log = self.root / f"node-{name}-{attempt}.log"
            node = self._start(name, args, log, num_cpus, resources, labels, head, timeout_s)
            if node is not None:
                return node
            if SLOW_START not in log.read_text() or attempt == 2:
                break
            self.kill_node(name)  # what the failed start left, before the retry
        raise RuntimeError(f"ray start of node {name!r} failed:\n{log.read_text()[-3000:]}")

    def _start(self, name, args, log, num_cpus, resources, labels, head, timeout_s) -> Node | None:
        from ray_router.serve.launch import HAPROXY_PORT_KEYS

        # each node runs its own HAProxy (Serve's proxy on every node): on separate machines their
        # side ports never meet, on this one each node needs its own (the raylet's env reaches it)
        env = {**self.node_env(), **{k: str(free_port()) for k in HAPROXY_PORT_KEYS}}
        with open(log, "ab") as out:
            proc = subprocess.Popen(RAY + args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            node = Node(name, proc.pid, float(num_cpus), resources, labels, log, head=head)
            self.nodes[name] = node  # registered first: shutdown() cleans up a failed start too
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                rc = None
        return node if rc == 0 else None

    def node_of(self, pid: int) -> str | None:
        """The name of the node whose session holds ``pid`` (None: no node of this cluster)."""
        sid = sid_of(pid)
        return next((n.name for n in self.nodes.values() if n.sid == sid), None)

    def kill_node(self, name: str, timeout_s: float = 30.0) -> None:
        """SIGKILL every process of node ``name`` and wait until they are gone."""
        self.nodes[name].killed = True
        kill_session(self.nodes[name].sid, timeout_s, what=f"node {name!r}")

    def leftovers(self) -> dict[str, list[int]]:
        return {n.name: p for n in self.nodes.values() if (p := n.pids())}

    def shutdown(self) -> None:
        """Kill every node (workers first, the head last) and remove the temp dir; raises if a
        process of the cluster survives."""
        for node in sorted(self.nodes.values(), key=lambda n: n.head):
            if node.pids():
                self.kill_node(node.name)
        left = self.leftovers()
        shutil.rmtree(self.root, ignore_errors=True)
        if left:
            raise AssertionError(f"Ray processes of the test cluster survived: {left}")


def driver_python(cluster: LocalCluster, code: str, timeout_s: float = 60.0, env: dict | None = None) -> str:
    """Run ``code`` in a separate Ray driver connected to ``cluster`` (``ray`` is imported and
    initialised; the code's stdout comes back). The test process itself never joins the cluster,
    so it can hold another Ray instance (e.g. tests/serve's package cluster)."""
    prelude = (
        "import json, ray\n"
        f"ray.init(address={cluster.address!r}, log_to_driver=False, namespace='serve')\n"  # Serve's namespace
    )
    full_env = {**cluster.node_env(), **(env or {})}
    out = subprocess.run(
        [sys.executable, "-c", prelude + code],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        start_new_session=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"driver failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    return out.stdout


def alive_nodes(cluster: LocalCluster) -> list[dict]:
    """Ray's own view of the cluster: ``ray.nodes()`` (alive ones) as {node_id, labels, resources}."""
    code = (
        "print(json.dumps([{'node_id': n['NodeID'], 'labels': n.get('Labels', {}), "
        "'resources': n['Resources']} for n in ray.nodes() if n['Alive']]))"
    )
    return json.loads(driver_python(cluster, code).strip().splitlines()[-1])


def actors(cluster: LocalCluster) -> list[dict]:
    """Every actor the GCS knows, alive or dead, as {class_name, pid, state, node}: ``node`` is the
    ``rr-node`` label of the node it ran on. (``raycompat.actor_table``.)"""
    code = (
        "from ray_router.raycompat import actor_table\n"
        "labels = {n['NodeID']: n.get('Labels', {}).get('rr-node') for n in ray.nodes()}\n"
        "print(json.dumps([{**a, 'node': labels.get(a.pop('node_id'))} for a in actor_table()]))"
    )
    return json.loads(driver_python(cluster, code).strip().splitlines()[-1])
