"""Encoder backends (torch, onnx, onnx-int8): same vectors? how much faster? same routing?

    PYTHONPATH=$PWD .venv/bin/python bench/encoder_backends.py [--backends onnx,onnx-int8]
        [--routerdc-sample 2000] [--latency-queries 200] [--batch-texts 256] [--seeds 5] [--rounds 2000]

Per backend, measured in one run against float32 torch (all-MiniLM-L6-v2 as sentence-transformers
runs it):

1. **Cosine** of each query's vector to torch's: every unique RouterBench query text (3,164; part 4
   needs them all anyway) and ``--routerdc-sample`` RouterDC texts drawn at random (seed 0; default
   2,000 of 15,343, ``0`` = all: on the shared 2-core machine the onnx backends encode its long
   prompts at tens of texts per second, so all of them take over ten minutes per backend): min,
   0.1% quantile and mean, per dataset. Vectors come through the on-disk embedding cache (its
   identity includes the backend), so a second run encodes nothing new.
2. **Bare encode latency**, one query per call at 1 intra-op thread (``torch.set_num_threads(1)``,
   which the onnx sessions follow): p50 and p99 over ``--latency-queries`` RouterBench queries x
   ``--latency-reps`` passes, the same for every backend (after 10 warm-up calls), the backends
   taking turns on each query, and the ratio to torch's p50.
3. **Batched throughput** at 1 thread: ``--batch-texts`` RouterBench queries encoded with batch size
   64 (the onnx backend splits it into calls of at most 16 texts and onnx-int8 runs one text per
   call, both by design: see ``ray_router/embeddings/onnx_backend.py``).
4. **Routing quality**: FGTS.CDB's served regret with the backend's vectors vs torch's on RouterBench
   through the real evaluator, configured exactly as ``ray-router evaluate --dataset routerbench
   --cost-weight 0.2 --policies fgts_cdb,best_fixed --seeds 5 --rounds 2000 --encoder-backend X``
   (the CLI's own parser builds the config): mean and 95% CI per backend, whether the CIs overlap,
   and the paired per-seed difference backend − torch (same seeds, so the same splits and streams)
   with its 95% CI. A backend whose paired interval excludes 0 changes routing quality.
5. ``--int8-recipes`` (instead of 1-4): the int8 recipes ``onnx_backend`` chose between (every
   ``MatMul`` dynamic: recipe 1; feed-forward ``MatMulNBits``: recipe 2; every ``MatMul`` dynamic
   with the second or both feed-forward inputs row-scaled: recipe 3 is the latter), built from the
   float32 export in a temporary directory: min and mean cosine to torch per dataset and the
   interleaved single-query p50 ratio to torch; also the chosen graph with onnxruntime's
   SkipLayerNormalization fusion on, and each ``--baseline DIR``, an export an earlier version made
   (e.g. recipe 2's and the float32 one of export format 2, still in the export cache), run as that
   version ran it. With
   ``--routerdc-sample 500`` it takes about 5 minutes here.

Timings on a shared 2-core machine are noisy; the ratios come from one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ray_router.data import load_dataset, resolve_data_dir
from ray_router.embeddings import SentenceTransformerEncoder, get_encoder


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _latency(encoders: dict, queries: list[str], reps: int) -> dict[str, np.ndarray]:
    """ms per single-query call; the backends take turns on each query (rotating who goes first), so
    the shared machine's load drifts hit all of them alike."""
    names = list(encoders)
    for enc in encoders.values():
        for q in queries[:10]:
            enc.encode([q])
    out: dict[str, list[float]] = {b: [] for b in names}
    for rep in range(reps):
        for i, q in enumerate(queries):
            k = (i + rep) % len(names)
            for b in names[k:] + names[:k]:
                t0 = time.perf_counter()
                encoders[b].encode([q])
                out[b].append(time.perf_counter() - t0)
    return {b: np.array(v) * 1e3 for b, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="onnx,onnx-int8", help="backends compared with torch")
    ap.add_argument("--routerdc-sample", type=int, default=2000, help="RouterDC texts in the cosine check (0 = all)")
    ap.add_argument("--latency-queries", type=int, default=200)
    ap.add_argument("--latency-reps", type=int, default=2, help="passes over the latency queries")
    ap.add_argument("--batch-texts", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=1, help="evaluator processes (seeds in parallel)")
    ap.add_argument("--no-regret", action="store_true", help="skip part 4")
    ap.add_argument(
        "--int8-recipes", action="store_true", help="only part 5: the int8 recipes compared (cosine, latency)"
    )
    ap.add_argument(
        "--baseline",
        action="append",
        default=[],
        help="with --int8-recipes: an export directory of an earlier version, timed in the same run (repeatable)",
    )
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    backends = ["torch", *[b for b in args.backends.split(",") if b and b != "torch"]]
    t_start = time.perf_counter()

    data_dir = resolve_data_dir(args.data_dir)
    tables = {name: load_dataset(name, data_dir=data_dir) for name in ("routerbench", "routerdc")}
    texts = {name: list(dict.fromkeys(str(t) for t in table.texts)) for name, table in tables.items()}
    if 0 < args.routerdc_sample < len(texts["routerdc"]):
        keep = np.random.default_rng(0).choice(len(texts["routerdc"]), size=args.routerdc_sample, replace=False)
        texts["routerdc"] = [texts["routerdc"][i] for i in sorted(keep)]
    print(f"cosine texts: {', '.join(f'{n} {len(t)}' for n, t in texts.items())} (unique query texts)")
    if args.int8_recipes:
        _int8_recipes(args, texts)
        print(f"\ntotal {time.perf_counter() - t_start:.0f}s")
        return

    # 1. cosine to torch, through the embedding cache (identity per backend)
    vectors: dict[str, dict[str, np.ndarray]] = {}
    for b in backends:
        enc = get_encoder("minilm", backend=b)
        t0 = time.perf_counter()
        vectors[b] = {n: enc.encode(ts) for n, ts in texts.items()}
        print(
            f"[{b}] {sum(map(len, texts.values()))} texts in {time.perf_counter() - t0:.0f}s "
            f"({getattr(enc, 'n_encoded', '?')} encoded, the rest from the cache); identity {enc.identity}"
        )
    print("\n== 1. cosine to float32 torch (per query text)")
    print(f"{'backend':<10} {'dataset':<12} {'n':>6} {'min':>9} {'q0.001':>9} {'mean':>9} {'1 - min':>8}")
    for b in backends[1:]:
        for n in texts:
            c = _cosines(vectors[b][n], vectors["torch"][n])
            q = np.quantile(c, 0.001)
            print(f"{b:<10} {n:<12} {len(c):>6} {c.min():9.6f} {q:9.6f} {c.mean():9.6f} {1 - c.min():8.1e}")

    # 2. + 3. latency and throughput at 1 thread, bare encoders (no cache)
    import torch

    torch.set_num_threads(1)
    rb = texts["routerbench"]
    rng = np.random.default_rng(1)
    lat_q = [rb[i] for i in rng.choice(len(rb), size=min(args.latency_queries, len(rb)), replace=False)]
    batch_q = [rb[i] for i in rng.choice(len(rb), size=min(args.batch_texts, len(rb)), replace=False)]
    bare = {b: SentenceTransformerEncoder(device="cpu", backend=b) for b in backends}  # type: ignore[arg-type]
    rows = {}
    lats = _latency(bare, lat_q, args.latency_reps)
    for b, enc in bare.items():
        lat = lats[b]
        enc.encode(batch_q[:64])
        t0 = time.perf_counter()
        enc.encode(batch_q, batch_size=64)
        rows[b] = (np.percentile(lat, 50), np.percentile(lat, 99), len(batch_q) / (time.perf_counter() - t0))
        print(f"[{b}] latency and throughput measured (threads {enc.threads})", file=sys.stderr)
    mean_chars = np.mean([len(q) for q in lat_q])
    print(
        f"\n== 2./3. bare encode at 1 thread: {len(lat_q)} single queries x {args.latency_reps} passes, backends ",
        end="",
    )
    print(f"interleaved (mean {mean_chars:.0f} chars), ", end="")
    print(f"{len(batch_q)} texts at batch 64")
    print(f"{'backend':<10} {'p50 ms':>8} {'p99 ms':>8} {'p50 ratio':>10} {'texts/s':>9} {'ratio':>7}")
    for b, (p50, p99, tps) in rows.items():
        t50, _, ttps = rows["torch"]
        print(f"{b:<10} {p50:8.2f} {p99:8.2f} {p50 / t50:10.2f} {tps:9.1f} {tps / ttps:7.2f}")
    torch.set_num_threads(os.cpu_count() or 1)

    if not args.no_regret:
        _regret(args, tables["routerbench"], backends)
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")


def _int8_recipes(args, texts: dict[str, list[str]]) -> None:
    """Part 5: the int8 recipes that ``onnx_backend`` chose between, built from the float32 export
    into a temporary directory and run one text per call at 1 thread: cosine to torch and the
    single-query p50 (interleaved, ratio to torch's and to the ``--baseline`` export's in the same
    run)."""
    import tempfile
    from pathlib import Path

    import onnx
    import torch

    from ray_router.embeddings import onnx_backend as ob

    fp32 = SentenceTransformerEncoder(device="cpu", backend="onnx")
    src = fp32.model.directory
    graph = onnx.load(str(src / ob.MODEL_FILE))
    attention, ffn = ob.int8_plan(graph)
    weights = {i.name: tuple(i.dims) for i in graph.graph.initializer}
    nodes = {n.name: n for n in graph.graph.node}
    ffn2 = [n for n in ffn if weights[nodes[n].input[1]][0] > weights[nodes[n].input[1]][1]]  # inner -> hidden
    recipes = {  # name: (dynamically quantized nodes, MatMulNBits 8-bit nodes and block, row-scaled nodes)
        "v1 all dynamic": (attention + ffn, [], 0, []),
        "v2 dynamic; FFN MatMulNBits b256": (attention, ffn, 256, []),
        "all dynamic; FFN2 row-scaled": (attention + ffn, [], 0, ffn2),
        "v3 all dynamic; FFN row-scaled (chosen)": (attention + ffn, [], 0, ffn),
    }
    logging.getLogger().setLevel(logging.ERROR)
    tmp = Path(tempfile.mkdtemp(prefix="int8-recipes-"))
    meta = {**json.loads((src / ob.EXPORT_FILE).read_text()), "backend": "onnx-int8"}  # one text per call
    models = {}
    for i, (name, (dyn, nbits, block, scaled)) in enumerate(recipes.items()):
        d = tmp / f"r{i}"
        d.mkdir()
        onnx.save(
            ob.quantize_matmuls(src / ob.MODEL_FILE, dyn, nbits, block, row_scaled=scaled), str(d / ob.MODEL_FILE)
        )
        (d / ob.TOKENIZER_FILE).write_bytes((src / ob.TOKENIZER_FILE).read_bytes())
        models[name] = ob.OnnxModel(d, meta=meta, threads=1)
    torch_enc = get_encoder("minilm", backend="torch")
    ref = {n: torch_enc.encode(ts) for n, ts in texts.items()}
    print("\n== 5. int8 recipes: cosine to float32 torch, single-query p50 at 1 thread (ratio to torch's)")
    cos = {}
    for name, model in models.items():
        t0 = time.perf_counter()
        cos[name] = {n: _cosines(model.encode(ts), ref[n]) for n, ts in texts.items()}
        print(f"[{name}] cosines in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    torch.set_num_threads(1)
    rb = texts["routerbench"]
    rng = np.random.default_rng(1)
    lat_q = [rb[i] for i in rng.choice(len(rb), size=min(args.latency_queries, len(rb)), replace=False)]
    chosen = list(recipes)[-1]
    runners = {
        "torch": SentenceTransformerEncoder(device="cpu"),
        "onnx (float32)": ob.OnnxModel(src, threads=1),
        **models,
        # the session option's share of the gain: the chosen graph with SkipLayerNormalization fused
        "v3, SkipLayerNormFusion on": ob.OnnxModel(
            models[chosen].directory, meta=meta, threads=1, disabled_optimizers=()
        ),
    }
    for path in args.baseline:  # exports of an earlier version, run as that version ran them (no optimizer off)
        base = Path(path).expanduser()
        runners[f"baseline {base.name[-22:]}"] = ob.OnnxModel(base, threads=1, disabled_optimizers=())
    lats = _latency(runners, lat_q, args.latency_reps)
    p50 = {name: np.percentile(lat, 50) for name, lat in lats.items()}
    header = " ".join(f"{n[:11] + ' min':>15} {'mean':>8}" for n in texts)
    print(f"{'recipe':<42} {header} {'p50 ms':>7} {'/torch':>6}")
    for name in runners:
        if name in cos:
            cells = " ".join(f"{cos[name][n].min():15.5f} {cos[name][n].mean():8.5f}" for n in texts)
        else:
            cells = " ".join(f"{'-':>15} {'-':>8}" for _ in texts)
        print(f"{name:<42} {cells} {p50[name]:7.2f} {p50[name] / p50['torch']:6.2f}")
    for name in runners:
        if name.startswith("baseline"):
            print(
                f"p50 ratio to {name}: chosen int8 {p50[chosen] / p50[name]:.2f}, "
                f"onnx (float32) {p50['onnx (float32)'] / p50[name]:.2f}"
            )
    print(f"({len(lat_q)} RouterBench queries x {args.latency_reps} passes, interleaved)")
    torch.set_num_threads(os.cpu_count() or 1)
    shutil.rmtree(tmp, ignore_errors=True)


def _regret(args, table, backends: list[str]) -> None:
    from ray_router.cli import _eval_config, build_parser
    from ray_router.evaluation import evaluate
    from ray_router.evaluation.experiment import paired_difference

    argv = ["evaluate", "--dataset", "routerbench", "--cost-weight", "0.2", "--policies", "fgts_cdb,best_fixed"]
    argv += ["--seeds", str(args.seeds), "--rounds", str(args.rounds), "--out", "unused"]
    cfg = _eval_config(build_parser().parse_args(argv))
    records = {}
    for b in backends:
        X = get_encoder("minilm", backend=b).encode([str(t) for t in table.texts])
        t0 = time.perf_counter()
        result = evaluate(table, X, cfg, encoder=b, workers=args.workers)
        records[b] = {r["policy"]: r for r in result.records}
        print(f"[{b}] evaluated in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    print(
        f"\n== 4. RouterBench ({table.n_queries} queries), λ = 0.2, {cfg.n_seeds} seeds x {cfg.n_rounds} rounds: "
        "served regret, mean [95% CI]"
    )
    ref = records["torch"]["fgts_cdb"]
    lo_t, hi_t = ref["served_regret_ci95"]
    print(f"{'backend':<10} {'FGTS.CDB served':>24} {'best_fixed':>10} {'CIs overlap':>11}  paired backend − torch")
    for b in backends:
        r = records[b]["fgts_cdb"]
        lo, hi = r["served_regret_ci95"]
        ci = f"{r['served_regret_mean']:.1f} [{lo:.1f}, {hi:.1f}]"
        overlap = "-" if b == "torch" else ("yes" if lo <= hi_t and lo_t <= hi else "NO")
        d = paired_difference(r["served_regret_per_seed"], ref["served_regret_per_seed"])
        paired = "-" if b == "torch" else f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] {d['verdict']}"
        best = records[b]["best_fixed"]["served_regret_mean"]
        print(f"{b:<10} {ci:>24} {best:10.1f} {overlap:>11}  {paired}")
    print("per seed, served | dueling regret of FGTS.CDB:")
    for b in backends:
        r = records[b]["fgts_cdb"]
        served = " ".join(f"{v:.2f}" for v in r["served_regret_per_seed"])
        dueling = " ".join(f"{v:.2f}" for v in r["cum_regret_per_seed"])
        print(f"  {b:<10} {served} | {dueling}")
    for b in backends[1:]:
        r = records[b]["fgts_cdb"]
        d = paired_difference(r["served_regret_per_seed"], ref["served_regret_per_seed"])
        changed = d["verdict"] != "no significant difference"
        print(f"{b}: {'CHANGES routing quality' if changed else 'no measurable change of routing quality'}")


if __name__ == "__main__":
    main()
