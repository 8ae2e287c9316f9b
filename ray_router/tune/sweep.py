"""Run a sweep on Ray Tune: embedded local Ray (capped) or an existing cluster; resume; report.

    outcome = run_sweep("tune_jobs/paper_sweep.yaml", storage_path="runs/tune")

1. Validate the sweep file; connect to Ray (``address=None``: a new local instance with
   ``num_cpus`` and ``object_store_memory`` capped; ``"auto"`` or ``ray://...``: a running cluster).
2. Check that a trial's resource request fits the cluster (a trial that asks for more CPUs than
   exist would otherwise stay PENDING forever): a :class:`ConfigError` before any slow work.
3. Prepare the data once in the driver (:mod:`ray_router.tune.prepare`) and ``ray.put`` every
   array; trials get the object refs and never encode text.
4. ``Tuner.fit()`` with per-group ASHA over ``rounds_played``; or, when the storage path already
   holds this sweep, ``Tuner.restore()``: finished trials are kept, unfinished ones continue from
   their last checkpoint (a finished seed).
5. Results as Parquet, the report (best configuration per group re-run on fresh seeds next to
   the defaults), plots and Serve configs (:mod:`ray_router.tune.report`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_router import raycompat
from ray_router.errors import ConfigError
from ray_router.tune.spec import ResourcesSpec, SweepSpec, load_sweep

SPEC_FILE = "ray_router_sweep.json"
RUNS_FILE = "ray_router_runs.jsonl"
METRIC, MODE, TIME_ATTR = "mean_regret", "min", "rounds_played"
TRIAL_LOG_ENV = "RAY_ROUTER_TUNE_TRIAL_LOG"  # optional: append "<trial id> <start|resume>" per trial start


def ray_env() -> None:
    """Environment for a local Ray on this kind of machine (RAY_NOTES.md); set only where unset."""
    # TUNE_GLOBAL_CHECKPOINT_S: save the experiment state at most every 5 s (Tune's default: >= 10 s),
    # so that a killed driver loses little: a trial finished after the last save runs again on resume.
    raycompat.apply_env_defaults({"TUNE_GLOBAL_CHECKPOINT_S": "5", "RAY_AIR_NEW_OUTPUT": "0"})
    if os.environ.get("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS") == "1":
        # With it, Tune writes no result files and ResultGrid.get_dataframe() comes back empty.
        print("[tune] ignoring TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1: the results need Tune's loggers", file=sys.stderr)
        del os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"]


def check_resources(request: ResourcesSpec, total: Mapping[str, float], available: Mapping[str, float]) -> int:
    """How many trials fit at once; a ConfigError when a trial can never (or cannot now) be placed."""
    cpu_total, gpu_total = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    cpu_free, gpu_free = float(available.get("CPU", 0)), float(available.get("GPU", 0))
    if request.cpu > cpu_total:
        raise ConfigError(
            f"a trial asks for {request.cpu:g} CPUs but the Ray cluster has {cpu_total:g} CPUs in all: "
            "lower search.resources_per_trial.cpu (or start Ray with more CPUs / add nodes)"
        )
    if request.gpu > gpu_total:
        raise ConfigError(
            f"a trial asks for {request.gpu:g} GPUs but the Ray cluster has {gpu_total:g}: "
            "set search.resources_per_trial.gpu to 0 or use a cluster with GPUs"
        )
    if request.cpu > cpu_free or request.gpu > gpu_free:
        raise ConfigError(
            f"a trial asks for {request.cpu:g} CPUs / {request.gpu:g} GPUs but only {cpu_free:g} CPUs / "
            f"{gpu_free:g} GPUs of the cluster are free (Serve replicas or other jobs hold the rest): "
            "it would wait forever; free them or lower search.resources_per_trial"
        )
    n = int(cpu_free // request.cpu)
    if request.gpu > 0:
        n = min(n, int(gpu_free // request.gpu))
    return max(1, n)


@dataclass
class SweepOutcome:
    spec: SweepSpec
    experiment_dir: Path
    resumed: bool
    wall_seconds: float
    n_trials: int
    n_complete: int
    n_stopped: int
    n_errored: int
    paths: dict[str, Path] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    trials: Any = field(default=None, repr=False)  # pandas DataFrames (report.result_frames)
    progress: Any = field(default=None, repr=False)


# ------------------------------------------------------------------------ trainable
def ray_router_trial(config: dict, data: dict, spec: SweepSpec) -> None:
    """The Tune function trainable: fetch the group's arrays from the object store, replay, report."""
    import ray
    from ray import tune
    from threadpoolctl import threadpool_limits

    from ray_router.tune.trial import config_group, encoder_of, run_trial, trial_eval_config

    group = data["groups"][config_group(config)]
    encoder = encoder_of(spec, config)
    table = ray.get(group["table"])
    X = ray.get(group["X"][encoder])
    cfg = trial_eval_config(spec, config, group["split_kwargs"])
    state = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = json.loads((Path(d) / "state.json").read_text())
    log_path = os.environ.get(TRIAL_LOG_ENV)
    if log_path:
        with open(log_path, "a") as f:
            f.write(f"{tune.get_context().get_trial_id()} {'resume' if state else 'start'} {os.getpid()}\n")

    def report(metrics: dict, checkpoint: dict | None) -> None:
        metrics = {
            **metrics,
            "encoder": encoder,
            # proof that trials never encode text: no encoder library is even imported here
            "encoder_imported": "sentence_transformers" in sys.modules,
        }
        if checkpoint is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="rr-ckpt-") as d:
            (Path(d) / "state.json").write_text(json.dumps(checkpoint))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    with threadpool_limits(limits=spec.search.blas_threads, user_api="blas"):
        if spec.objective is not None:  # progressive validation on logged duels (ray_router.tune.duels)
            from ray_router.tune.duels import run_duels_trial

            duels = ray.get(data["duels"])
            every, refresh = spec.search.report_every, spec.objective.refresh_every
            run_duels_trial(table, X, duels, cfg, report, report_every=every, refresh_every=refresh, state=state)
        else:
            run_trial(table, X, cfg, report, report_every=spec.search.report_every, state=state)


def trial_dirname(trial) -> str:
    c = trial.config
    return f"{trial.trial_id}-{c.get('dataset')}-{c.get('split')}-seed{c.get('split_seed')}"


def default_artifacts_dir() -> Path:
    """CCFT artifacts are cached next to the embedding cache: ``$RAY_ROUTER_CACHE_DIR/ccft``, else
    ``~/.cache/ray-router/ccft``; one folder per (dataset, split, split seed, fingerprint)."""
    from ray_router.embeddings.cache import default_cache_dir

    return default_cache_dir().parent / "ccft"


def param_space(spec: SweepSpec, datasets: list[str] | None = None) -> dict:
    """Tune's param_space: grid axes (dataset, split, split_seed) and the sampled sections.
    ``datasets``: the dataset labels to use (default: all of the file's)."""
    from ray import tune

    def dist(d):
        a = d.args
        return {
            "choice": lambda: tune.choice(list(a)),
            "grid": lambda: tune.grid_search(list(a)),
            "uniform": lambda: tune.uniform(*a),
            "loguniform": lambda: tune.loguniform(*a),
            "randint": lambda: tune.randint(*a),
            "lograndint": lambda: tune.lograndint(*a),
            "quniform": lambda: tune.quniform(*a),
        }[d.kind]()

    space: dict[str, Any] = {
        "dataset": tune.grid_search(datasets if datasets is not None else [d.key for d in spec.datasets]),
        "split": tune.grid_search([s.key for s in spec.splits]),
        "split_seed": tune.grid_search(list(spec.split_seeds)),
    }
    for sec, fields in spec.space_dists().items():
        space.setdefault(sec, {}).update({k: dist(d) for k, d in fields.items()})
    for sec, fields in spec.space_constants().items():
        space.setdefault(sec, {}).update(fields)
    return space


def _scheduler(spec: SweepSpec):
    s = spec.search.scheduler
    if s.type == "fifo":
        from ray.tune.schedulers import FIFOScheduler

        return FIFOScheduler()
    from ray_router.tune.scheduler import GroupedASHA

    return GroupedASHA(
        time_attr=TIME_ATTR,
        max_t=spec.max_rounds,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
        brackets=s.brackets,
    )


def _progress_callback(spec: SweepSpec, log: Callable[[str], None]):
    from ray import tune

    max_t = spec.max_rounds

    class Progress(tune.Callback):
        def __init__(self) -> None:
            self.done = 0

        def _line(self, trials, trial, what: str) -> None:
            self.done += 1
            r = trial.last_result or {}
            c = trial.config
            rounds = r.get(TIME_ATTR, 0)
            unit = "rounds" if spec.objective is None else "duels predicted"
            status = (
                what if what == "error" else ("complete" if rounds >= max_t else f"stopped at {rounds}/{max_t} {unit}")
            )
            regret = r.get("cum_regret_mean") if rounds >= max_t else None
            detail = (
                f"cum regret {regret:.1f}"
                if regret is not None
                else f"mean regret {r.get(METRIC, float('nan')):.4f}/round"
            )
            if spec.objective is not None:
                detail = f"{spec.objective.metric} {r.get(spec.objective.metric, float('nan')):.4f}"
            log(
                f"trial {trial.trial_id} {c.get('dataset')}/{c.get('split')}/seed{c.get('split_seed')}: {status}, "
                f"{detail} ({self.done} ended in this run)"
            )

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(trials, trial, "complete")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trials, trial, "error")

    return Progress()


# ----------------------------------------------------------------------------- driver
def _log(msg: str) -> None:
    print(f"[tune] {msg}", file=sys.stderr, flush=True)


def _spec_fingerprint(spec: SweepSpec) -> dict:
    d = spec.model_dump(mode="json")
    d.pop("smoke_test", None)
    d.pop("report", None)  # the report may change between runs without touching the trials
    d.pop("description", None)
    if spec.objective is not None and Path(spec.objective.duels).is_file():  # the same log, not only its name
        from ray_router.tune.duels import file_digest

        d["objective"]["sha256"] = file_digest(spec.objective.duels)
    return d


def trial_statuses(exp_dir: Path) -> dict[str, str]:
    """trial id -> status, from the experiment state Tune last saved in ``exp_dir``."""
    files = sorted(exp_dir.glob("experiment_state-*.json"))
    if not files:
        return {}
    data = json.loads(files[-1].read_text())
    return {t["trial_id"]: t["status"] for t in (json.loads(e[0]) for e in data.get("trial_data", []))}


def _unfinished(spec: SweepSpec, exp_dir: Path, n_datasets: int | None = None) -> int:
    """Trials of the sweep not yet terminated or errored (the run was interrupted): the saved state's
    unfinished trials plus those never created (``n_datasets``: the datasets in use)."""
    statuses = trial_statuses(exp_dir)
    done = sum(1 for s in statuses.values() if s in ("TERMINATED", "ERROR"))
    expected = spec.n_trials * (n_datasets if n_datasets is not None else len(spec.datasets)) // len(spec.datasets)
    return max(expected - done, sum(1 for s in statuses.values() if s not in ("TERMINATED", "ERROR")))


def _append_run(exp_dir: Path, event: dict) -> None:
    with open(exp_dir / RUNS_FILE, "a") as f:
        f.write(json.dumps(event) + "\n")


def driver_runs(exp_dir: Path) -> list[dict]:
    """One entry per driver run of this sweep (fresh start or resume), oldest first; a run killed
    before ``Tuner.fit()`` returned has ``interrupted: True`` and no ``fit_seconds``."""
    path = exp_dir / RUNS_FILE
    runs: dict[str, dict] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        if not line.strip():
            continue
        e = json.loads(line)
        r = runs.setdefault(e["run"], {"interrupted": True})
        if e.get("event") == "end":
            r.update(interrupted=bool(e.get("interrupted")), fit_seconds=e["fit_seconds"])
        elif e.get("event") == "done":
            r["wall_seconds"] = e["wall_seconds"]
        else:
            r.update({k: v for k, v in e.items() if k != "event"})
    return list(runs.values())


def run_sweep(
    path: str | Path,
    smoke_test: bool = False,
    address: str | None = None,
    storage_path: str | Path | None = None,
    num_cpus: int | None = None,
    object_store_mb: int | None = None,
    fresh: bool = False,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    ray_temp_dir: str | None = None,
    artifacts_dir: str | Path | None = None,
    make_report: bool = True,
    log: Callable[[str], None] = _log,
    encoder: str | None = None,
    duels: str | Path | None = None,
) -> SweepOutcome:
    """The steps of the module docstring; ``KeyboardInterrupt`` when Ctrl-C left trials unfinished.
    ``encoder``: another base encoder name than the file's ``encoder.name`` (e.g. ``openai:MODEL@URL``).
    ``duels``: a duel log to score the trials on (sets ``objective.duels``; :mod:`ray_router.tune.duels`)."""
    from ray_router.tune.duels import resolve_objective

    spec = load_sweep(path, smoke_test=smoke_test, duels=duels)  # a bad file fails here, before Ray is imported
    if encoder is not None:
        from ray_router.config import parse
        from ray_router.embeddings.spec import EncoderSpec

        values = {**spec.encoder.model_dump(exclude_defaults=True), "name": encoder}
        spec = spec.model_copy(update={"encoder": parse(EncoderSpec, values, where="--encoder")})
    spec, duel_log = resolve_objective(spec)  # a missing or bad duel log fails here too
    ray_env()
    exp_dir = Path(storage_path or "runs/tune").expanduser().resolve() / spec.name
    resumable = _check_storage(spec, exp_dir, fresh, log)
    t_start = time.time()
    # on a joined cluster the trials run in its raylets' environment: pass ray-router's own settings on
    worker_env = {k: v for k, v in os.environ.items() if k.startswith("RAY_ROUTER_")}
    started = raycompat.init_ray(
        address=address,
        num_cpus=num_cpus,
        object_store_mb=object_store_mb,
        temp_dir=ray_temp_dir,
        worker_env=worker_env,
    )
    try:
        max_parallel = _max_parallel(spec, exp_dir, resumable, log)
        prepared, data = _prepare_data(spec, exp_dir, artifacts_dir, data_dir, cache_dir, device, log, duel_log)
        tuner = _make_tuner(spec, exp_dir, data, prepared, resumable, max_parallel, log)
        run = _start_run(exp_dir, t_start, resumable, prepared)
        grid, fit_seconds = _fit(tuner)
        outcome = _collect(grid, spec, exp_dir, run, fit_seconds, resumable, len(prepared.tables), log)
        if make_report and duel_log is not None:
            _report_duels(outcome, prepared, data, duel_log, t_start, log)
        elif make_report:
            _report(outcome, prepared, data, data_dir, t_start, log)
        _finish_run(outcome, run, t_start)
        return outcome
    finally:
        if started:
            import ray

            ray.shutdown()


def _check_storage(spec: SweepSpec, exp_dir: Path, fresh: bool, log: Callable[[str], None]) -> bool:
    """Whether ``exp_dir`` holds this sweep to resume (``fresh``: removed first); a ConfigError when it
    holds something else."""
    from ray import tune

    resumable = exp_dir.exists() and tune.Tuner.can_restore(str(exp_dir))
    if fresh and exp_dir.exists():
        log(f"--fresh: removing {exp_dir}")
        shutil.rmtree(exp_dir)
        return False
    if exp_dir.exists() and not resumable and any(exp_dir.iterdir()) and not (exp_dir / SPEC_FILE).exists():
        raise ConfigError(f"{exp_dir} exists and is not a ray-router sweep; choose another --storage-path")
    stored = exp_dir / SPEC_FILE
    if resumable and stored.exists() and json.loads(stored.read_text()) != _spec_fingerprint(spec):
        raise ConfigError(
            f"{exp_dir} holds a different sweep (the file changed since it started): resume with "
            "the same file, pass --fresh to start over, or use another --storage-path"
        )
    return resumable


def _max_parallel(spec: SweepSpec, exp_dir: Path, resumable: bool, log: Callable[[str], None]) -> int:
    """How many trials run at once (a ConfigError when a trial cannot be placed at all)."""
    import ray

    max_parallel = check_resources(spec.search.resources_per_trial, ray.cluster_resources(), ray.available_resources())
    if spec.search.max_concurrent_trials:
        max_parallel = min(max_parallel, spec.search.max_concurrent_trials)
    log(
        f"{'resuming' if resumable else 'starting'} sweep {spec.name!r} in {exp_dir}: "
        f"{len(spec.groups)} groups x {spec.search.num_samples} samples, up to {max_parallel} trials at once "
        f"({ray.cluster_resources().get('CPU', 0):g} CPUs)"
    )
    return max_parallel


def _prepare_data(
    spec: SweepSpec,
    exp_dir: Path,
    artifacts_dir,
    data_dir,
    cache_dir,
    device,
    log: Callable[[str], None],
    duel_log=None,
) -> tuple[Any, dict]:
    """Load, fine-tune and embed in the driver; every array and table goes to the object store once.
    Returns (prepared, data): ``data["groups"][group key]`` holds the refs a trial of that group reads;
    ``data["duels"]`` the duel log of a duels objective (checked against every table and the encoder)."""
    import ray

    from ray_router.tune.prepare import prepare

    exp_dir.mkdir(parents=True, exist_ok=True)
    artifacts = Path(artifacts_dir).expanduser().resolve() if artifacts_dir else default_artifacts_dir()
    prepared = prepare(spec, artifacts, data_dir=data_dir, cache_dir=cache_dir, device=device, log=log)
    tot = prepared.encoding_totals()
    log(
        f"data ready in {prepared.seconds:.0f}s: {tot['texts_encoded']} texts encoded, "
        f"{tot['unique_texts']} unique (encoder, text) pairs, {tot['cache_hits']} cache hits"
    )
    refs = {k: ray.put(v) for k, v in prepared.arrays.items()}
    table_refs = {k: ray.put(v) for k, v in prepared.tables.items()}
    data: dict[str, Any] = {
        "groups": {
            g.key: {
                "table": table_refs[g.dataset],
                "X": {e: refs[a] for e, a in g.arrays.items()},
                "split_kwargs": g.split_kwargs,
            }
            for g in prepared.groups.values()
        }
    }
    if duel_log is not None:
        from ray_router.tune.duels import check_log

        check_log(spec, prepared, duel_log)
        data["duels"] = ray.put(duel_log)
        log(f"objective: {spec.metric[0]} of progressive validation on {len(duel_log)} logged duels")
    return prepared, data


def _make_tuner(
    spec: SweepSpec, exp_dir: Path, data: dict, prepared, resumable: bool, max_parallel: int, log: Callable[[str], None]
):
    """``Tuner.restore`` of the stored sweep, or a new Tuner (which records the sweep's fingerprint)."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    trainable = tune.with_resources(
        tune.with_parameters(ray_router_trial, data=data, spec=spec),
        {"cpu": spec.search.resources_per_trial.cpu, "gpu": spec.search.resources_per_trial.gpu},
    )
    if resumable:
        return tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    (exp_dir / SPEC_FILE).write_text(json.dumps(_spec_fingerprint(spec), indent=1))
    return tune.Tuner(
        trainable,
        param_space=param_space(spec, datasets=list(prepared.tables)),
        tune_config=tune.TuneConfig(
            metric=spec.metric[0],
            mode=spec.metric[1],
            scheduler=_scheduler(spec),
            num_samples=spec.search.num_samples,
            # the same sampled configuration runs on every (dataset, split, split seed) group
            search_alg=BasicVariantGenerator(
                random_state=spec.search.seed, constant_grid_search=True, max_concurrent=max_parallel
            ),
            reuse_actors=False,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=str(exp_dir.parent),
            verbose=0,
            # keep every (tiny) per-seed checkpoint: num_to_keep forces an experiment-state sync
            # each time a trial reaches it
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=[_progress_callback(spec, log)],
        ),
    )


def _start_run(exp_dir: Path, t_start: float, resumable: bool, prepared) -> dict:
    """Record this driver run's start in the runs file; returns its entry."""
    import ray

    run = {
        "run": f"{t_start:.3f}",
        "started": t_start,
        "resumed": resumable,
        "prepare_seconds": round(prepared.seconds, 1),
        "cpus": ray.cluster_resources().get("CPU", 0),
        **prepared.encoding_totals(),
    }
    _append_run(exp_dir, {**run, "event": "start"})
    return run


def _fit(tuner) -> tuple[Any, float]:
    t_fit = time.time()
    grid = tuner.fit()
    return grid, time.time() - t_fit


def _collect(
    grid,
    spec: SweepSpec,
    exp_dir: Path,
    run: dict,
    fit_seconds: float,
    resumed: bool,
    n_datasets: int,
    log: Callable[[str], None],
) -> SweepOutcome:
    """Write the result frames and count the trials; KeyboardInterrupt when some are unfinished (Ctrl-C),
    a ConfigError when every trial failed."""
    from ray_router.tune import report as rep

    trials, progress = rep.result_frames(grid, spec)
    paths = rep.write_frames(exp_dir, trials, progress)
    unfinished = _unfinished(spec, exp_dir, n_datasets)
    _append_run(
        exp_dir,
        {"run": run["run"], "event": "end", "fit_seconds": round(fit_seconds, 1), "interrupted": bool(unfinished)},
    )
    if unfinished:  # Ctrl-C: Tune saved its state and returned early
        log(
            f"interrupted with {unfinished} trial(s) unfinished; run the same command again to resume "
            f"from {exp_dir} (finished trials are kept)"
        )
        raise KeyboardInterrupt

    def count(status: str) -> int:
        return int((trials["status"] == status).sum()) if len(trials) else 0

    outcome = SweepOutcome(
        spec=spec,
        experiment_dir=exp_dir,
        resumed=resumed,
        wall_seconds=0.0,
        n_trials=len(trials),
        n_complete=count("complete"),
        n_stopped=count("stopped"),
        n_errored=count("error"),
        paths=paths,
        trials=trials,
        progress=progress,
    )
    log(
        f"tuning done in {fit_seconds:.0f}s: {outcome.n_trials} trials, {outcome.n_complete} complete, "
        f"{outcome.n_stopped} stopped early, {outcome.n_errored} errored"
    )
    if outcome.n_errored == outcome.n_trials:
        first = next((r.error for r in grid if r.error is not None), None)
        raise ConfigError(f"every trial failed; first error: {first}")
    return outcome


def _report(outcome: SweepOutcome, prepared, data: dict, data_dir, t_start: float, log: Callable[[str], None]) -> None:
    """Fresh-seed re-runs of the best and default configurations, then the report files."""
    from ray_router.tune import report as rep

    spec, exp_dir = outcome.spec, outcome.experiment_dir
    reruns = rerun_best(spec, prepared, data, outcome.trials, log, cache_dir=exp_dir / "report" / "reruns")
    outcome.paths.update(
        rep.write_report(
            exp_dir,
            spec,
            prepared,
            outcome.trials,
            outcome.progress,
            reruns,
            driver_runs(exp_dir),
            data_dir=data_dir,
            log=log,
            wall_seconds=time.time() - t_start,
        )
    )
    outcome.summary = json.loads(outcome.paths["summary"].read_text())


def _report_duels(
    outcome: SweepOutcome, prepared, data: dict, duel_log, t_start: float, log: Callable[[str], None]
) -> None:
    """A duels objective's report: fresh-seed progressive validation of the best, default and uniform."""
    from ray_router.tune.duels import rerun_on_duels, write_duels_report

    spec, exp_dir = outcome.spec, outcome.experiment_dir
    reruns = rerun_on_duels(spec, prepared, data, outcome.trials, log)
    outcome.paths.update(
        write_duels_report(
            exp_dir,
            spec,
            prepared,
            outcome.trials,
            outcome.progress,
            reruns,
            duel_log,
            driver_runs(exp_dir),
            say=log,
            wall_seconds=time.time() - t_start,
        )
    )
    outcome.summary = json.loads(outcome.paths["summary"].read_text())


def _finish_run(outcome: SweepOutcome, run: dict, t_start: float) -> None:
    outcome.wall_seconds = time.time() - t_start
    _append_run(
        outcome.experiment_dir, {"run": run["run"], "event": "done", "wall_seconds": round(outcome.wall_seconds, 1)}
    )


# ------------------------------------------------------------------------------ report
def _rerun_task(table, X, cfg, label: str, blas_threads: int):
    from threadpoolctl import threadpool_limits

    from ray_router.evaluation.experiment import evaluate

    with threadpool_limits(limits=blas_threads, user_api="blas"):
        res = evaluate(table, X, cfg, encoder=label, blas_threads=None)
    curves = res.curves[["policy", "seed", "round", "cum_regret"]]
    return res.records, curves[curves["round"] % 10 == 0].reset_index(drop=True)


def _rerun_key(spec: SweepSpec, group, enc: str, cfg) -> str:
    """Everything a re-run's result depends on: the data (dataset entry, base encoder, CCFT artifact,
    whose name holds its fingerprint) and the full EvalConfig (seeds included)."""
    import dataclasses
    import hashlib

    blob = json.dumps(
        {
            "dataset": spec.dataset(group.dataset).model_dump(mode="json"),
            "encoder": spec.encoder.model_dump(mode="json"),
            "embedding": enc,
            "ccft": group.ccft_path if enc == "ccft" else None,
            "cfg": dataclasses.asdict(cfg),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def rerun_best(
    spec: SweepSpec, prepared, data: dict, trials, log: Callable[[str], None], cache_dir: Path | None = None
) -> list[dict]:
    """Per group: the best complete trial's configuration and the default configuration (and the
    uniform reference) replayed on ``report.seeds`` fresh seeds, as Ray tasks. One entry per run.
    Results are kept in ``cache_dir`` by (group, encoder, EvalConfig), so rebuilding the report (e.g.
    after a resume) replays only what changed."""
    import pickle

    import ray

    from ray_router.tune.spec import default_config
    from ray_router.tune.trial import encoder_of, trial_eval_config

    task = ray.remote(num_cpus=spec.search.resources_per_trial.cpu)(_rerun_task)
    fresh = {"base_seed": spec.report.base_seed, "n_seeds": spec.report.seeds}
    defaults = default_config(spec)
    jobs = []
    for g in prepared.groups.values():
        gd = data["groups"][g.key]
        rows = trials[(trials["group"] == g.key) & (trials["status"] == "complete")]
        candidates: list[tuple[str, dict, tuple]] = [("default", defaults, ("fgts_cdb",))]
        if len(rows):
            best = rows.sort_values("cum_regret_mean").iloc[0]
            candidates.insert(0, ("best", {**best["config"]}, ("fgts_cdb",)))
        else:
            log(f"{g.key}: no complete trial (all stopped early or failed); re-running the default only")
        candidates.append(("uniform", {}, ("uniform",)))
        for role, config, policies in candidates:
            enc = encoder_of(spec, config) if role != "uniform" else "base"
            cfg = trial_eval_config(spec, config, g.split_kwargs, policies=policies, **fresh)
            cached = cache_dir / f"{_rerun_key(spec, g, enc, cfg)}.pkl" if cache_dir else None
            if cached is not None and cached.is_file():
                ref = None
            else:
                ref = task.remote(gd["table"], gd["X"][enc], cfg, enc, spec.search.blas_threads)
            trial_id = str(best["trial_id"]) if role == "best" else None
            jobs.append(
                (
                    {
                        "group": g.key,
                        "dataset": g.dataset,
                        "split": g.split,
                        "split_seed": g.split_seed,
                        "role": role,
                        "encoder": enc,
                        "config": config,
                        "trial_id": trial_id,
                    },
                    ref,
                    cached,
                )
            )
    t0 = time.time()
    n_new = sum(1 for _, ref, _ in jobs if ref is not None)
    log(
        f"re-running {n_new} configurations on {spec.report.seeds} fresh seeds "
        f"({spec.report.base_seed}..{spec.report.base_seed + spec.report.seeds - 1})"
        + (f"; {len(jobs) - n_new} from earlier re-runs" if n_new < len(jobs) else "")
    )
    out = []
    for meta, ref, cached in jobs:
        if ref is None:
            if cached is None:
                raise RuntimeError(f"{meta['group']}: a re-run has neither a Ray task nor a cached result")
            records, curves = pickle.loads(cached.read_bytes())
        else:
            records, curves = ray.get(ref)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_suffix(".tmp")
                tmp.write_bytes(pickle.dumps((records, curves)))
                tmp.replace(cached)
        out.append({**meta, "record": records[0], "curves": curves})
    log(f"re-runs done in {time.time() - t0:.0f}s")
    return out
