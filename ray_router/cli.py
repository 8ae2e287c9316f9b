"""``ray-router`` command line. Bad input prints one ``error: ...`` line and exits 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray_router import raycompat
from ray_router.errors import ConfigError, RouterError


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    return tuple(_float(p) for p in _csv(text))


def parse_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["fgts_cdb.eta=0.5", ...]`` -> ``{"fgts_cdb": {"eta": 0.5}}`` (values parsed as YAML scalars)."""
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        policy, dot, fld = key.partition(".")
        if not sep or not dot or not policy or not fld:
            raise ConfigError(f"--set expects POLICY.FIELD=VALUE, got {item!r}")
        value = yaml.safe_load(raw)
        if isinstance(value, str) and value.lower() in ("inf", "+inf", ".inf"):
            value = math.inf
        out.setdefault(policy, {})[fld] = value
    return out


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="data folder (default: $RAY_ROUTER_DATA_DIR, else ./data)")


def _add_table_args(p: argparse.ArgumentParser) -> None:
    """Columns of a user's own Parquet/CSV table (passed to the loader only when given)."""
    p.add_argument(
        "--arms",
        type=_csv,
        default=None,
        metavar="A,B,C",
        help="comma-separated score columns that are the arms (default: the <stem>.summary.json "
        "'models' list, else every column X with an 'X|total_cost' column)",
    )
    p.add_argument(
        "--text-column",
        default=None,
        metavar="NAME",
        help="query text column of a Parquet/CSV table (default: prompt, question, query, text or instruction)",
    )
    p.add_argument(
        "--category-column",
        default=None,
        metavar="NAME",
        help="category column of a Parquet/CSV table (default: eval_name, task, category or source)",
    )
    p.add_argument(
        "--id-column",
        default=None,
        metavar="NAME",
        help="unique query id column of a Parquet/CSV table (default: sample_id, row_id, query_id, "
        "id, else the row number)",
    )


# --flag -> loader keyword; the column flags apply only to tables read by load_generic.
_COLUMN_FLAGS = {
    "text_column": ("--text-column", "text_col"),
    "category_column": ("--category-column", "category_col"),
    "id_column": ("--id-column", "id_col"),
}


def _table_options(args, dataset: str) -> dict[str, Any]:
    """Loader options from --arms/--text-column/--category-column/--id-column: only those given."""
    from ray_router.data.registry import uses_generic_loader

    options: dict[str, Any] = {}
    if args.arms is not None:
        if not args.arms:
            raise ConfigError("--arms needs at least one column name, e.g. --arms gpt-4,meta/llama-2-70b-chat")
        options["arms"] = list(args.arms)
    given = []
    for attr, (flag, keyword) in _COLUMN_FLAGS.items():
        value = getattr(args, attr)
        if value is None:
            continue
        if not value.strip():
            raise ConfigError(f"{flag} needs a column name")
        options[keyword] = value
        given.append(flag)
    if given and not uses_generic_loader(dataset):
        raise ConfigError(
            f"{', '.join(given)}: only for a Parquet/CSV table or routerdc; {dataset!r} has fixed "
            "columns (--arms still selects its arms)"
        )
    return options


def _add_encoder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--encoder",
        default="minilm",
        help="minilm (packaged all-MiniLM-L6-v2), hash (stand-in), a sentence-transformers folder, or "
        "openai:MODEL@URL[#option=value,...] (an OpenAI-compatible /embeddings server; API key from "
        "$RAY_ROUTER_EMBEDDINGS_API_KEY; README: remote encoders)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument(
        "--encoder-backend",
        default="torch",
        choices=("torch", "onnx", "onnx-int8"),
        help="torch, onnx (exported once, run by onnxruntime) or onnx-int8 (int8-quantized); README: encoder backends",
    )
    p.add_argument(
        "--cache-dir", default=None, help="embedding cache (default: $RAY_ROUTER_CACHE_DIR or ~/.cache/ray-router)"
    )


def _add_eval_args(p: argparse.ArgumentParser, *, seeds: int, rounds: int) -> None:
    p.add_argument("--dataset", default="routerbench", help="routerbench, routerdc, mixinstruct, or a file path")
    p.add_argument("--policies", type=_csv, default=("fgts_cdb", "uniform"), help="comma-separated policy names")
    p.add_argument("--seeds", type=int, default=seeds, help="number of seeds")
    p.add_argument("--base-seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=rounds, help="rounds per seed")
    p.add_argument("--cost-weight", type=_float, default=0.0, help="λ in utility = score − λ·cost_norm")
    p.add_argument("--kappa", type=_float, default=10.0, help="judge sharpness (inf = noiseless judge)")
    p.add_argument("--weighting", default="perf", help="perf, perf_cost, excel_perf_cost or excel_mask")
    p.add_argument("--split", default="stratified", help="stratified, k_per_category or holdout")
    p.add_argument("--offline-fraction", type=_float, default=0.2)
    p.add_argument("--k-per-category", type=int, default=5)
    p.add_argument("--held-out", default=None, help="category held out of the offline part (--split holdout)")
    p.add_argument(
        "--split-seed", type=int, default=None, help="one fixed split for every seed (default: a split per seed)"
    )
    p.add_argument(
        "--context",
        default="query",
        choices=("query", "constant"),
        help="constant: every query embedding replaced by one vector (ablation: is the router contextual?)",
    )
    p.add_argument(
        "--cost-normaliser",
        default="shared",
        choices=("shared", "category_max"),
        help="costs in the weightings: the environment's normaliser (shared) or the old per-table max",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="POLICY.FIELD=VALUE",
        help="policy hyperparameter, e.g. fgts_cdb.eta=0.5 (repeatable)",
    )
    p.add_argument("--workers", type=int, default=1, help="processes running seeds in parallel")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_table_args(p)
    _add_data_args(p)
    _add_encoder_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-router", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("evaluate", help="replay policies on a logged benchmark; writes summary.json, curves, plot")
    _add_eval_args(p, seeds=5, rounds=2000)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--duels",
        default=None,
        metavar="FILE.parquet",
        help="progressive validation on logged duels (`ray-router log export`) instead of a replay: each policy "
        "predicts every duel before learning from it; --dataset and the split flags build its arm embeddings "
        "and offline data; --rounds is unused",
    )
    p.add_argument("--refresh-every", type=int, default=1, help="--duels: posterior refresh after this many updates")
    p.add_argument("--any-encoder", action="store_true", help="--duels: allow a log embedded by another encoder")

    p = sub.add_parser("run", help="the main job: a short FGTS.CDB vs uniform experiment on real RouterBench")
    _add_eval_args(p, seeds=5, rounds=2000)
    p.add_argument("--out", default="runs/main", help="output folder")
    p.set_defaults(policies=("fgts_cdb", "uniform", "best_fixed"), workers=2)

    p = sub.add_parser("log", help="a service's feedback log: export")
    lsub = p.add_subparsers(dest="log_command", required=True)
    le = lsub.add_parser("export", help="every logged duel as a Parquet table (for evaluate --duels); read-only")
    le.add_argument("state_dir", help="the service's state directory (state.dir of its Serve config)")
    le.add_argument("--out", required=True, help="Parquet file to write, e.g. duels.parquet")

    p = sub.add_parser("data", help="dataset files: download, info")
    dsub = p.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser(
        "download", help="fetch the real release files from the Hugging Face Hub (needs internet; shows a progress bar)"
    )
    d.add_argument("name", help="routerbench or mixinstruct")
    d.add_argument("--dest", default=None, help="target folder (default: the data dir)")
    d.add_argument(
        "--splits",
        type=_csv,
        default=None,
        metavar="A,B",
        help="routerbench: 0shot,5shot (default both); mixinstruct: train,val,test (default test,val)",
    )
    d.add_argument(
        "--if-missing",
        action="store_true",
        help="do nothing when the folder already holds a file of the dataset that `load_dataset` reads "
        "(`make run` uses it: it downloads RouterBench only on a machine without the data)",
    )
    _add_data_args(d)
    d = dsub.add_parser("info", help="load a dataset and print its summary")
    d.add_argument("name", help="routerbench, routerdc, mixinstruct or a file path")
    _add_table_args(d)
    _add_data_args(d)

    p = sub.add_parser("experiment", help="the paper's experiments")
    esub = p.add_subparsers(dest="experiment", required=True)
    e = esub.add_parser("paper", help="{base, CCFT} x 4 weightings + baselines, unseen category, perf-cost/AIQ")
    e.add_argument("--dataset", default="routerbench", help="routerbench, routerdc, or a MixInstruct/other file")
    e.add_argument("--out", required=True, help="output folder (report.md, summary.json, plots)")
    e.add_argument("--quick", action="store_true", help="a few minutes on 2 cores: subsample, fewer rounds")
    e.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5)")
    e.add_argument("--rounds", type=int, default=None, help="rounds per seed")
    e.add_argument("--cost-weight", type=_float, default=None, help="λ of the main grid (default 0.2)")
    e.add_argument("--held-out", default=None, help="category held out (default: the smallest)")
    e.add_argument("--baselines", type=_csv, default=None, help="comma-separated baselines")
    e.add_argument("--lambdas", type=_floats, default=None, help="λ grid of the perf-cost view, e.g. 0,0.25,1")
    e.add_argument("--subsample", type=int, default=None, help="a stratified sample of N queries (0 = all)")
    e.add_argument("--workers", type=int, default=2)
    _add_data_args(e)
    _add_encoder_args(e)

    sub.add_parser("policies", help="list registered policies and their hyperparameters")
    _add_tune_parser(sub)
    _add_serve_parser(sub)
    _add_grafana_parser(sub)
    _add_calibrate_parser(sub)
    return parser


# ------------------------------------------------------------------ tune (ray_router.tune)
def _add_tune_parser(sub) -> None:
    p = sub.add_parser("tune", help="Ray Tune sweep from a YAML file (tune_jobs/); resumes from its storage path")
    p.add_argument("sweep", help="sweep file, e.g. tune_jobs/paper_sweep.yaml")
    p.add_argument("--smoke-test", action="store_true", help="the file's smoke_test budget (CI: under ~2 minutes)")
    p.add_argument(
        "--address", default=None, help="existing Ray cluster (auto, ray://host:10001); default: a local Ray"
    )
    p.add_argument("--storage-path", default="runs/tune", help="results root; the sweep lives in STORAGE/<name>")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--object-store-mb", type=int, default=256, help="object store of the local Ray (MiB)")
    p.add_argument("--fresh", action="store_true", help="delete STORAGE/<name> and start over instead of resuming")
    p.add_argument("--no-report", action="store_true", help="tune only: no fresh-seed re-runs, report or Serve export")
    _add_data_args(p)
    p.add_argument(
        "--cache-dir", default=None, help="embedding cache (default: $RAY_ROUTER_CACHE_DIR or ~/.cache/ray-router)"
    )
    p.add_argument("--device", default=None, help="encoder device (default: the sweep file's)")
    p.add_argument(
        "--encoder", default=None, help="base encoder instead of the sweep file's encoder.name, e.g. openai:MODEL@URL"
    )
    p.add_argument(
        "--artifacts-dir",
        default=None,
        help="CCFT artifacts (default: $RAY_ROUTER_CACHE_DIR/ccft, else ~/.cache/ray-router/ccft)",
    )
    p.add_argument(
        "--duels",
        default=None,
        metavar="FILE",
        help="score trials by progressive validation on this duel log (`ray-router log export`): sets objective.duels",
    )


# run_sweep's arguments that `ray-router tune` takes as flags of the same name
SWEEP_OPTIONS = (
    "smoke_test",
    "address",
    "storage_path",
    "num_cpus",
    "object_store_mb",
    "fresh",
    "data_dir",
    "cache_dir",
    "device",
    "artifacts_dir",
    "encoder",
    "duels",
)


def cmd_tune(args) -> int:
    from ray_router.tune.sweep import run_sweep  # imports Ray only when the command runs

    options = {k: getattr(args, k) for k in SWEEP_OPTIONS}
    out = run_sweep(args.sweep, make_report=not args.no_report, **options)
    print(
        f"{out.experiment_dir}: {out.n_trials} trials ({out.n_complete} complete, {out.n_stopped} stopped early, "
        f"{out.n_errored} errored){' after resuming' if out.resumed else ''}; {out.wall_seconds:.0f}s"
    )
    for name, path in out.paths.items():
        print(f"  {name}: {path}")
    return 1 if out.n_errored else 0


# ----------------------------------------------------------------- serve (ray_router.serve)
def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the routing service (Ray Serve) from a Serve config, on 127.0.0.1")
    p.add_argument("--config", default="serve_configs/local.yaml", help="Serve config YAML (see serve_configs/)")
    p.add_argument("--host", default=None, help="HTTP host (default: the config's)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's)")
    p.add_argument(
        "--state-dir",
        default=None,
        help="posterior state (default: the config's, else $RAY_ROUTER_STATE_DIR, else ~/.local/state/ray-router/serve)",
    )
    _add_data_args(p)
    p.add_argument(
        "--address", default=None, help="existing Ray cluster (auto, ray://host:10001); default: a local Ray"
    )
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--object-store-mb", type=int, default=256, help="object store of the local Ray (MiB)")
    p.add_argument("--metrics-port", type=int, default=None, help="export Ray's Prometheus metrics on this port")
    p.add_argument("--check", action="store_true", help="validate the config (Serve schema and app args) and exit")
    p.add_argument(
        "--encoder", default=None, help="encoder name instead of the config's encoder.name, e.g. openai:MODEL@URL"
    )


def cmd_serve(args) -> int:
    from ray_router.serve.launch import serve_main  # imports Ray only when the command runs

    return serve_main(args)


# ------------------------------------------------------------ calibrate (ray_router.calibrate)
def _add_calibrate_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="ask each arm's upstream a category-labelled prompt set; write a routing table, the arm "
        "embeddings with a per-category profile, and the Serve config that uses them",
    )
    p.add_argument("--config", required=True, help="Serve config YAML whose arms have upstreams")
    p.add_argument("--prompts", default="starter", help="'starter' (ships with ray-router) or a .jsonl file")
    p.add_argument("--per-category", type=int, default=5, help="prompts per category (first N in file order)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--judge-base-url", default=None, help="OpenAI-compatible URL of the judge (prompts without reference)"
    )
    p.add_argument("--judge-model", default=None, help="the judge's model name")
    p.add_argument("--judge-api-key-env", default=None, metavar="NAME", help="env var holding the judge's API key")
    p.add_argument("--no-judge", action="store_true", help="leave out the prompts that have no reference answer")
    p.add_argument("--concurrency", type=int, default=8, help="upstream calls at once")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per upstream call")
    p.add_argument("--max-tokens", type=int, default=512, help="max_tokens of each answer")
    p.add_argument("--retries", type=int, default=1, help="retries of a call on 429/5xx/connection errors")


def cmd_calibrate(args) -> int:
    import yaml

    from ray_router.calibrate import calibrate, judge_endpoint

    for name, low in (("concurrency", 1), ("max_tokens", 1), ("retries", 0)):
        if getattr(args, name) < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least {low}")
    if not args.timeout > 0:
        raise ConfigError("--timeout must be positive")
    judge = judge_endpoint(args.judge_base_url, args.judge_model, args.judge_api_key_env)
    result = calibrate(
        args.config,
        args.out,
        args.prompts,
        args.per_category,
        judge,
        no_judge=args.no_judge,
        concurrency=args.concurrency,
        timeout_s=args.timeout,
        max_tokens=args.max_tokens,
        retries=args.retries,
    )
    paths = result["paths"]
    print(f"# ray-router calibrate: table {paths['table']}, answers {paths['answers']}")
    print(f"# the ray-router application's args (complete config: ray-router serve --config {paths['serve_config']})")
    print(yaml.safe_dump(result["config"], sort_keys=False), end="")
    return 0


# --------------------------------------------------------------- grafana (ray_router.grafana)
def _add_grafana_parser(sub) -> None:
    p = sub.add_parser("grafana", help="the Grafana dashboard: export its JSON, or push it through Grafana's HTTP API")
    gsub = p.add_subparsers(dest="grafana_command", required=True)
    g = gsub.add_parser("export", help="write the dashboard JSON (the file k8s/base/grafana provisions)")
    g.add_argument("--out", default=None, help="file to write (default: stdout)")
    g = gsub.add_parser("push", help="create or replace the dashboard (POST /api/dashboards/db)")
    g.add_argument(
        "--url", required=True, help="Grafana's base URL, e.g. https://grafana.example.com (a sub-path is kept)"
    )
    g.add_argument(
        "--token-env",
        default="GRAFANA_TOKEN",
        metavar="NAME",
        help="env var holding a service-account token or API key, sent as Bearer "
        "(default GRAFANA_TOKEN, else GRAFANA_API_KEY)",
    )
    g.add_argument(
        "--basic-auth-env", default=None, metavar="NAME", help="env var holding USER:PASSWORD, instead of a token"
    )
    g.add_argument("--folder-uid", default=None, help="folder to put the dashboard in (default: General)")
    g.add_argument("--no-overwrite", action="store_true", help="fail if Grafana has the dashboard already")
    g.add_argument("--message", default=None, help="version-history message")
    g.add_argument("--timeout", type=_float, default=15.0, help="seconds")


def cmd_grafana(args) -> int:
    from ray_router.grafana import build_dashboard, dashboard_json, push_dashboard  # leaf package, imported here only

    if args.grafana_command == "export":
        text = dashboard_json()
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text, encoding="utf-8")
            print(f"wrote {args.out}", file=sys.stderr)
        else:
            sys.stdout.write(text)
        return 0
    token, basic = None, None
    if args.basic_auth_env:
        user, sep, password = os.environ.get(args.basic_auth_env, "").partition(":")
        if not sep or not user:
            raise ConfigError(f"${args.basic_auth_env} must hold USER:PASSWORD")
        basic = (user, password)
    else:
        names = [args.token_env] + (["GRAFANA_API_KEY"] if args.token_env == "GRAFANA_TOKEN" else [])
        token = next((os.environ[n] for n in names if os.environ.get(n)), None)
        if token is None:
            raise ConfigError(
                f"no Grafana token: set ${names[0]} (a service-account token with the Editor role) "
                "or pass --basic-auth-env"
            )
    result = push_dashboard(
        args.url,
        build_dashboard(),
        token=token,
        basic_auth=basic,
        folder_uid=args.folder_uid,
        overwrite=not args.no_overwrite,
        message=args.message,
        timeout_s=args.timeout,
    )
    print(f"{result.status}: dashboard {result.uid} version {result.version}: {args.url.rstrip('/')}{result.url}")
    return 0


# ---------------------------------------------------------------------------- commands
def _load_embedded(args, identity: list[str] | None = None) -> tuple[Any, Any, str]:
    from ray_router.data import load_dataset, resolve_data_dir
    from ray_router.embeddings import get_encoder

    options = _table_options(args, args.dataset)
    table = load_dataset(args.dataset, data_dir=resolve_data_dir(args.data_dir), **options)
    cache = args.cache_dir if args.cache_dir is not None else None
    encoder = get_encoder(args.encoder, cache_dir=cache, device=args.device, backend=args.encoder_backend)
    t0 = time.perf_counter()
    X = encoder.encode(list(table.texts))
    print(
        f"[ray-router] {table.name}: {table.n_queries} queries x {table.n_arms} arms, "
        f"{len(table.category_names)} categories; embedded in {time.perf_counter() - t0:.1f}s "
        f"({getattr(encoder, 'n_encoded', '?')} texts encoded, the rest from the cache)",
        file=sys.stderr,
    )
    if identity is not None:
        identity.append(str(getattr(encoder, "identity", "")))
    label = args.encoder if args.encoder in ("minilm", "hash", "lookup") else "custom"
    label = "openai" if args.encoder.startswith("openai:") else label
    label = "base" if label == "minilm" else label
    return table, X, label if args.encoder_backend == "torch" else f"{label}:{args.encoder_backend}"


# EvalConfig fields set by `evaluate`/`run` flags: field -> argparse dest (the field's name where not listed)
_EVAL_FLAGS = (
    "policies",
    "n_seeds",
    "base_seed",
    "n_rounds",
    "cost_weight",
    "kappa",
    "split",
    "offline_fraction",
    "k_per_category",
    "held_out",
    "split_seed",
    "weighting",
    "context",
    "cost_normaliser",
)
_EVAL_DEST = {"n_seeds": "seeds", "n_rounds": "rounds"}


def _eval_config(args):
    from ray_router.config import parse
    from ray_router.evaluation import EvalConfig

    values = {f: getattr(args, _EVAL_DEST.get(f, f)) for f in _EVAL_FLAGS}
    values.update(policies=tuple(args.policies), policy_configs=parse_overrides(args.overrides))
    return parse(EvalConfig, values, where=args.command)


def cmd_evaluate(args) -> int:
    from ray_router.evaluation import evaluate, format_table, write_outputs

    cfg = _eval_config(args)  # validate before any slow work
    if getattr(args, "duels", None) is not None:
        return _evaluate_duels(args, cfg)
    table, X, encoder_label = _load_embedded(args)
    progress = not args.no_progress and sys.stderr.isatty()
    done = []

    def on_seed(seed: int) -> None:
        done.append(seed)
        print(f"[ray-router] seed {seed} done ({len(done)}/{cfg.n_seeds})", file=sys.stderr)

    result = evaluate(table, X, cfg, encoder=encoder_label, progress=progress, workers=args.workers, on_seed=on_seed)
    paths = write_outputs(result, args.out, title=f"{table.name}: cumulative regret, mean and 95% CI")
    print(format_table(result.records))
    print(f"\nwrote {paths['summary']}, {paths['curves']}, {paths['plot']}, {paths['served_plot']}")
    return 0


def _evaluate_duels(args, cfg) -> int:
    """``evaluate --duels``: progressive validation of the policies on a logged-duel file."""
    from ray_router.evaluation import progressive
    from ray_router.evaluation.duels import read_duels

    log = read_duels(args.duels)  # a bad file fails before any slow work
    identity: list[str] = []
    table, X, encoder_label = _load_embedded(args, identity)
    progressive.check_encoder(
        log,
        identity[0] if identity else "",
        args.any_encoder,
        ": pass the same --encoder (or --any-encoder to compare anyway)",
    )

    def on_run(name: str, seed: int) -> None:
        print(f"[ray-router] {name} seed {seed}: {len(log)} duels", file=sys.stderr)

    summaries = progressive.evaluate_duels(table, X, cfg, log, refresh_every=args.refresh_every, on_run=on_run)
    meta = {"duels": str(args.duels), "n_duels": len(log), "dataset": table.name, "encoder": encoder_label}
    paths = progressive.write_outputs(summaries, args.out, meta)
    print(progressive.format_table(summaries))
    print(f"\nwrote {paths['summary']}, {paths['plot']}")
    return 0


def cmd_experiment(args) -> int:
    from ray_router.config import parse
    from ray_router.evaluation.paper import PaperConfig, run_paper

    overrides = {
        k: v
        for k, v in {
            "dataset": args.dataset,
            "n_seeds": args.seeds,
            "n_rounds": args.rounds,
            "cost_weight": args.cost_weight,
            "held_out": args.held_out,
            "baselines": args.baselines,
            "workers": args.workers,
            "lambda_grid": args.lambdas or None,
            "subsample": args.subsample,
        }.items()
        if v is not None
    }
    if args.encoder.startswith("openai:"):  # the base rows on a remote encoder; CCFT fine-tunes the local MiniLM
        overrides["base_encoder"] = args.encoder
    cfg = PaperConfig.quick(**overrides) if args.quick else parse(PaperConfig, overrides, where="experiment paper")
    result = run_paper(
        cfg,
        args.out,
        data_dir=args.data_dir,
        cache_dir=args.cache_dir,
        device=args.device,
        backend=args.encoder_backend,
    )
    print(result.report)
    print(f"\nwrote {result.paths['report']} and {result.paths['summary']}")
    return 0


def cmd_log(args) -> int:
    from ray_router.serve.log_export import export

    res = export(args.state_dir, args.out)
    print(
        f"wrote {res.path}: {res.n_duels} duels (seq {res.first_seq}..{res.last_seq})"
        + (f"; {res.compacted} earlier records were compacted into the snapshot" if res.compacted else "")
    )
    return 0


def cmd_data(args) -> int:
    from ray_router.data import load_dataset, resolve_data_dir

    if args.data_command == "download":
        return _download(args)
    table = load_dataset(args.name, data_dir=resolve_data_dir(args.data_dir), **_table_options(args, args.name))
    print(json.dumps(table.describe(), indent=2))
    return 0


def _download(args) -> int:
    from ray_router.data import resolve_data_dir
    from ray_router.data.download import download_dataset, hub_endpoint, present_release

    dest = Path(args.dest) if args.dest else resolve_data_dir(args.data_dir)
    if args.if_missing:
        present = present_release(args.name, dest)
        if present is not None:
            print(f"[ray-router] {args.name}: {present} is there; nothing to download", file=sys.stderr)
            return 0
    print(f"[ray-router] downloading {args.name} from {hub_endpoint()} into {dest}", file=sys.stderr)
    for path in download_dataset(args.name, dest, splits=args.splits):
        print(path)
    return 0


def cmd_policies(args) -> int:
    import dataclasses

    from ray_router.policies import get_entry, policy_names

    for name in policy_names():
        entry = get_entry(name)
        config = dataclasses.asdict(entry.config()) if dataclasses.fields(entry.config_cls) else {}
        fields = ", ".join(f"{k}={v!r}" for k, v in config.items())
        print(f"{name}: {entry.description}\n    {fields or '(no hyperparameters)'}")
    return 0


COMMANDS = {
    "evaluate": cmd_evaluate,
    "log": cmd_log,
    "run": cmd_evaluate,
    "data": cmd_data,
    "policies": cmd_policies,
    "experiment": cmd_experiment,
    "tune": cmd_tune,
}
COMMANDS["serve"] = cmd_serve
COMMANDS["grafana"] = cmd_grafana
COMMANDS["calibrate"] = cmd_calibrate


def main(argv: Sequence[str] | None = None) -> int:
    raycompat.apply_env_defaults()  # offline model hub, quiet tokenizers, Ray's local settings (where unset)
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except RouterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
