"""Does CCFT separate categories better than the base encoder? (issue 3, "Must show")

For each dataset: a seeded stratified offline/online split; CCFT fine-tunes the packaged
all-MiniLM-L6-v2 on ``queries_per_category`` offline queries per category; then both encoders embed
a sample of offline queries (category centroids) and a sample of held-out online queries, and
:func:`ray_router.embeddings.ccft.category_separation` scores the online ones (nearest-centroid
accuracy, cosine silhouette). Embeddings go through the on-disk cache and the artifact is reused on
a re-run with the same inputs, so a second run only re-scores.

    RAY_ROUTER_DATA_DIR=../shared/data .venv/bin/python bench/ccft_separation.py --dataset routerbench routerdc
    .venv/bin/python bench/ccft_separation.py --smoke-test        # seconds: tiny config, tiny samples

Texts are what ``load_dataset`` gives (``--text-view default``; for RouterBench that is the prompt
without the 5-shot block its category shares). ``--text-view full_prompt`` (RouterBench only) keeps
that block: ARC and WinoGrande prompts then share a 392- and 288-token prefix per category, so at
MiniLM's 256-token limit every ARC prompt (and every WinoGrande prompt) embeds to the same vector.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _sample(rows: np.ndarray, cats: np.ndarray, per_category: int, rng: np.random.Generator) -> np.ndarray:
    groups = [rows[cats[rows] == c] for c in sorted(set(cats[rows]))]
    return np.sort(np.concatenate([rng.permutation(g)[:per_category] for g in groups]))


def run_one(dataset: str, args: argparse.Namespace) -> dict:
    from ray_router.config import parse
    from ray_router.data import load_dataset, stratified_split
    from ray_router.embeddings import get_encoder
    from ray_router.embeddings.ccft import CCFTConfig, category_separation, fine_tune, read_artifact

    options = {"strip_shared_prefix": False} if args.text_view == "full_prompt" else {}
    table = load_dataset(dataset, data_dir=args.data_dir, **options)
    texts = np.asarray([str(t) for t in table.texts], dtype=object)
    cats = np.asarray([str(c) for c in table.categories], dtype=object)
    split = stratified_split(cats, args.offline_fraction, args.seed)
    overrides = {
        k: v
        for k, v in (
            ("queries_per_category", args.queries_per_category),
            ("epochs", args.epochs),
            ("loss", args.loss),
            ("max_seq_length", args.max_seq_length),
            ("batch_size", args.batch_size),
            ("lr", args.lr),
        )
        if v is not None
    }
    config = parse(CCFTConfig, {"seed": args.seed, **overrides}, where="CCFT config")
    cache_root = Path(os.environ.get("RAY_ROUTER_CACHE_DIR", "~/.cache/ray-router")).expanduser()
    artifact_root = Path(args.artifact_dir) if args.artifact_dir else cache_root / "ccft"
    out_dir = artifact_root / f"{dataset}-{args.text_view}-split{args.seed}"

    t0 = time.perf_counter()
    path = fine_tune(texts[split.offline], cats[split.offline], config, out_dir, device=args.device, overwrite=True)
    fine_tune_wall = time.perf_counter() - t0
    meta = read_artifact(path)

    rng = np.random.default_rng(args.seed + 1)
    centroid_rows = _sample(split.offline, cats, args.centroid_per_category, rng)
    eval_rows = _sample(split.online, cats, args.eval_per_category, rng)
    cache = args.cache_dir or None
    max_len = meta["max_seq_length"]
    base_opts = {} if max_len == 256 else {"max_seq_length": max_len}  # 256: the packaged model's own limit
    encoders = {
        "base": get_encoder("minilm", cache_dir=cache, device=args.device, **base_opts),
        "ccft": get_encoder(str(path), cache_dir=cache, device=args.device),
    }
    results, encode_seconds = {}, {}
    for name, enc in encoders.items():
        t1 = time.perf_counter()
        X_train = enc.encode(list(texts[centroid_rows]))
        X_eval = enc.encode(list(texts[eval_rows]))
        encode_seconds[name] = round(time.perf_counter() - t1, 2)
        results[name] = category_separation(X_train, cats[centroid_rows], X_eval, cats[eval_rows])
        results[name]["identity"] = enc.identity
    return {
        "dataset": dataset,
        "text_view": args.text_view,
        "split_seed": args.seed,
        "offline_fraction": args.offline_fraction,
        "n_offline": len(split.offline),
        "n_online": len(split.online),
        "config": meta["config"],
        "artifact": str(path),
        "fingerprint": meta["fingerprint"],
        "train_seconds": meta["train_seconds"],
        "train_cpu_seconds": meta.get("train_cpu_seconds"),
        "fine_tune_wall_seconds": round(fine_tune_wall, 2),
        "final_loss": meta["final_loss"],
        "loss_history": meta["loss_history"],
        "n_steps": meta["n_steps"],
        "device": meta["device"],
        "encode_seconds": encode_seconds,
        "base": results["base"],
        "ccft": results["ccft"],
    }


def markdown(records: list[dict]) -> str:
    lines = [
        "| dataset | view | encoder | nearest-centroid acc | silhouette (cosine) | n eval | train wall s "
        "| train cpu s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        for enc in ("base", "ccft"):
            s = r[enc]
            lines.append(
                f"| {r['dataset']} | {r['text_view']} | {enc} | {s['nearest_centroid_accuracy']:.4f} | "
                f"{s['silhouette']:.4f} | {s['n_eval']} | {r['train_seconds'] if enc == 'ccft' else ''} | "
                f"{(r['train_cpu_seconds'] or '') if enc == 'ccft' else ''} |"
            )
    lines.append("")
    lines.append("Per category (accuracy / silhouette), base -> ccft:")
    for r in records:
        parts = [
            f"{c}: {r['base']['per_category'][c]['accuracy']:.3f}/{r['base']['per_category'][c]['silhouette']:.3f} -> "
            f"{r['ccft']['per_category'][c]['accuracy']:.3f}/{r['ccft']['per_category'][c]['silhouette']:.3f}"
            for c in r["base"]["per_category"]
        ]
        lines.append(f"- {r['dataset']} ({r['text_view']}): " + "; ".join(parts))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", nargs="+", default=["routerbench"], help="routerbench and/or routerdc")
    p.add_argument("--data-dir", default=None, help="default: $RAY_ROUTER_DATA_DIR, else ./data")
    p.add_argument(
        "--text-view",
        choices=("default", "full_prompt"),
        default="default",
        help="full_prompt: RouterBench prompts with their shared 5-shot block",
    )
    p.add_argument("--offline-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0, help="split seed and CCFT seed")
    p.add_argument("--centroid-per-category", type=int, default=200, help="offline queries per category (centroids)")
    p.add_argument("--eval-per-category", type=int, default=200, help="held-out online queries per category scored")
    p.add_argument("--queries-per-category", type=int, default=None, help="CCFT config override")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--loss", default=None)
    p.add_argument("--max-seq-length", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--artifact-dir", default=None, help="CCFT artifacts root (default: $RAY_ROUTER_CACHE_DIR/ccft)")
    p.add_argument("--cache-dir", default=None, help="embedding cache root (default: the package default)")
    p.add_argument("--out", default=None, help="write the records as JSON here")
    p.add_argument("--smoke-test", action="store_true", help="tiny config and samples: checks the script runs")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.queries_per_category = args.queries_per_category or 4
        args.epochs = args.epochs or 1
        args.max_seq_length = args.max_seq_length or 32
        args.centroid_per_category = min(args.centroid_per_category, 10)
        args.eval_per_category = min(args.eval_per_category, 10)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    records = []
    for dataset in args.dataset:
        record = run_one(dataset, args)
        records.append(record)
        print(json.dumps({k: v for k, v in record.items() if k not in ("base", "ccft")}), file=sys.stderr)
    print(markdown(records))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
