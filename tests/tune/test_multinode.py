"""A sweep on a real two-node Ray cluster: ``ray-router tune --address`` places trials on both nodes.

Two raylets on this machine (``tests/multinode.py``), one CPU each, so two trials at once must run on
different nodes. The trials read their arrays from the object store of the driver's node (node_b's
trials pull them across the object managers); both nodes write Tune's results to one local storage
path (on separate machines it would be shared storage, as ``RunConfig(storage_path=...)`` requires).
Where each trial ran comes from the GCS actor table (the trial actor's pid and node), matched with
the pids the trials log when they start (``RAY_ROUTER_TUNE_TRIAL_LOG``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd
import pytest

from tests.multinode import LocalCluster, actors, alive_nodes
from tests.tune.conftest import sweep_dict, write_sweep

pytestmark = pytest.mark.integration


@pytest.fixture
def two_nodes(tmp_path) -> Iterator[LocalCluster]:
    cluster = LocalCluster()
    try:
        cluster.add_node("node_a", num_cpus=1)  # the head
        cluster.add_node("node_b", num_cpus=1)
        yield cluster
    finally:
        cluster.shutdown()  # raises if a process of either node survives


def test_a_sweep_on_two_nodes_runs_trials_on_both(tmp_path, tune_env, synth_table, drivers, two_nodes):
    assert sorted(n["labels"]["rr-node"] for n in alive_nodes(two_nodes)) == ["node_a", "node_b"]
    d = sweep_dict(
        synth_table,
        splits=["stratified"],
        eval={"n_rounds": 300, "n_seeds": 2, "cost_weight": 0.0},
        search={"num_samples": 4, "report_every": 100, "scheduler": {"type": "fifo"}},
    )
    sweep = write_sweep(tmp_path / "two-nodes.yaml", d)
    log = tmp_path / "trials.log"  # written by the trials
    # set in the driver's environment only: the sweep passes RAY_ROUTER_* on to the trials, whose
    # raylets were started without it
    env = {**two_nodes.node_env(), **tune_env, "RAY_ROUTER_TUNE_TRIAL_LOG": str(log)}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"  # a multi-node cluster (tests/multinode.py)
    drv = drivers(
        ["tune", str(sweep), "--address", two_nodes.address, "--storage-path", str(tmp_path / "st"), "--no-report"],
        env,
        tmp_path / "sweep.log",
    )
    rc = drv.wait(timeout=300)  # a bound against hanging, not a speed target
    out = drv.output()
    assert rc == 0, out[-4000:]
    assert "up to 2 trials at once (2 CPUs)" in out  # one CPU on each node
    trials = pd.read_parquet(tmp_path / "st" / "tiny" / "results.parquet")
    assert len(trials) == 4 and (trials["status"] == "complete").all()
    starts = [line.split() for line in log.read_text().splitlines() if line.strip()]
    assert len(starts) == 4 and {s[1] for s in starts} == {"start"}
    trial_pids = {int(s[2]) for s in starts}
    ran_on = {a["pid"]: a["node"] for a in actors(two_nodes) if a["pid"] in trial_pids}
    assert set(ran_on) == trial_pids, (ran_on, trial_pids)
    assert set(ran_on.values()) == {"node_a", "node_b"}, ran_on
    print(f"trials per node: {pd.Series(list(ran_on.values())).value_counts().to_dict()}")
