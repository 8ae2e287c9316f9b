"""The driver's one-off work before any trial starts: load the datasets, embed every query with the
base encoder, fine-tune CCFT per (dataset, split, split seed) and embed with it. Pure: no Ray.

Every text goes through :class:`~ray_router.embeddings.CachedEncoder` (the on-disk cache keyed by
encoder identity and text hash), so a resumed or repeated sweep encodes nothing again, and the
counters say so: per encoder identity, texts requested, unique texts, texts actually encoded (sent to
the model) and cache hits. Trials receive the arrays (through Ray's object store) and never encode.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ray_router.data.table import RoutingTable
from ray_router.errors import ConfigError, DataError
from ray_router.tune.spec import SweepSpec, ccft_config, slug
from ray_router.tune.trial import group_key


@dataclass
class Group:
    dataset: str
    split: str
    split_seed: int
    split_kwargs: dict  # EvalConfig split fields, held-out category resolved
    arrays: dict[str, str]  # encoder choice (base / ccft) -> key into Prepared.arrays
    ccft_path: str | None = None
    n_offline: int = 0
    n_online: int = 0

    @property
    def key(self) -> str:
        return group_key(self.dataset, self.split, self.split_seed)


@dataclass
class Prepared:
    tables: dict[str, RoutingTable] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    groups: dict[str, Group] = field(default_factory=dict)
    encoding: list[dict] = field(default_factory=list)  # one row per encoder identity
    ccft: list[dict] = field(default_factory=list)  # one row per artifact
    skipped: dict[str, str] = field(default_factory=dict)  # optional datasets whose files are missing
    seconds: float = 0.0
    base_identity: str = ""  # the base encoder's identity (a duel log must match it)

    def encoding_totals(self) -> dict:
        rows = self.encoding
        return {
            "texts_requested": int(sum(r["texts_requested"] for r in rows)),
            "unique_texts": int(sum(r["unique_texts"] for r in rows)),
            "texts_encoded": int(sum(r["texts_encoded"] for r in rows)),
            "cache_hits": int(sum(r["cache_hits"] for r in rows)),
        }


class _Counter:
    """Texts per encoder identity: requested, unique, encoded (model calls), answered by the cache."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}
        self.texts: dict[str, set[str]] = {}

    def encode(self, encoder: Any, texts: list[str], label: str) -> np.ndarray:
        before_enc, before_hit = getattr(encoder, "n_encoded", None), getattr(encoder, "n_hits", None)
        t0 = time.perf_counter()
        X = np.asarray(encoder.encode(texts), dtype=np.float32)
        row = self.rows.setdefault(
            encoder.identity,
            {
                "encoder": encoder.identity,
                "used_for": [],
                "texts_requested": 0,
                "unique_texts": 0,
                "texts_encoded": 0,
                "cache_hits": 0,
                "seconds": 0.0,
                "cached": before_enc is not None,
            },
        )
        seen = self.texts.setdefault(encoder.identity, set())
        seen.update(texts)
        row["used_for"].append(label)
        row["texts_requested"] += len(texts)
        row["unique_texts"] = len(seen)
        if before_enc is not None:
            row["texts_encoded"] += encoder.n_encoded - before_enc
            row["cache_hits"] += encoder.n_hits - before_hit
        else:  # an uncached stand-in (hash): every text is computed
            row["texts_encoded"] += len(texts)
        row["seconds"] += time.perf_counter() - t0
        return X


def subsample(table: RoutingTable, n: int, seed: int) -> RoutingTable:
    """A stratified sample of ``n`` queries (the whole table when ``n`` is 0 or too large)."""
    if not n or n >= table.n_queries:
        return table
    from ray_router.data.splits import stratified_split

    keep = stratified_split(table.categories, offline_fraction=n / table.n_queries, seed=seed).offline
    return table.subset(keep)


def resolve_held_out(table: RoutingTable, held_out: str) -> str:
    counts = {c: int((table.categories == c).sum()) for c in table.category_names}
    if held_out == "smallest":
        return min(counts, key=lambda c: (counts[c], c))
    if held_out not in counts:
        raise ConfigError(f"{table.name}: held-out category {held_out!r} not in {sorted(counts)}")
    return held_out


def split_kwargs(spec: SweepSpec, table: RoutingTable, split_label: str, split_seed: int, dataset: str = "") -> dict:
    s = spec.split(split_label)
    out: dict[str, Any] = {
        "split": s.split,
        "offline_fraction": s.offline_fraction,
        "k_per_category": s.k_per_category,
        "held_out": None,
        "split_seed": int(split_seed),
    }
    if s.split == "holdout":
        out["held_out"] = resolve_held_out(table, s.held_out_for(dataset))
    return out


def prepare(
    spec: SweepSpec,
    artifacts_dir: str | Path,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    log: Callable[[str], None] = print,
) -> Prepared:
    """Load, split, fine-tune and embed everything the sweep's trials and report need."""
    from ray_router.data import load_dataset, resolve_data_dir
    from ray_router.embeddings import get_encoder
    from ray_router.embeddings.openai_encoder import cannot_fine_tune
    from ray_router.evaluation.experiment import EvalConfig, make_split

    t_start = time.perf_counter()
    out = Prepared()
    counter = _Counter()
    needs_ccft = "ccft" in spec.encoders_needed()
    device = device or spec.encoder.device
    if needs_ccft and spec.encoder.remote:
        raise cannot_fine_tune(f"the sweep's encoder.name {spec.encoder.name.partition('#')[0]!r}")
    base = get_encoder(spec.encoder.name, cache_dir=cache_dir, device=device, **spec.encoder.encoder_options())
    out.base_identity = str(getattr(base, "identity", ""))
    if needs_ccft and spec.encoder.name in ("hash", "lookup"):
        raise ConfigError(
            "the space uses the ccft encoder, which fine-tunes a sentence-transformers model; "
            f"encoder.name = {spec.encoder.name!r} is a stand-in (use minilm or a model folder)"
        )
    artifacts = Path(artifacts_dir)
    for d in spec.datasets:
        try:
            table = load_dataset(d.name, data_dir=resolve_data_dir(data_dir), **d.options)
        except DataError as e:
            if not d.optional:
                raise
            out.skipped[d.key] = str(e).splitlines()[0]
            log(f"{d.key}: skipped (optional, not available: {out.skipped[d.key]})")
            continue
        table = subsample(table, d.subsample, d.subsample_seed)
        out.tables[d.key] = table
        texts = [str(t) for t in table.texts]
        base_key = f"{d.key}/base"
        out.arrays[base_key] = counter.encode(base, texts, f"{d.key} (base)")
        log(
            f"{d.key}: {table.n_queries} queries x {table.n_arms} arms, categories "
            f"{list(table.category_names)}; base embeddings ready"
        )
        for s in spec.splits:
            for seed in spec.split_seeds:
                kw = split_kwargs(spec, table, s.key, seed, d.key)
                split = make_split(table, EvalConfig(policies=("uniform",), **kw), int(seed))
                group = Group(
                    d.key,
                    s.key,
                    int(seed),
                    kw,
                    {"base": base_key},
                    n_offline=len(split.offline),
                    n_online=len(split.online),
                )
                if needs_ccft:
                    group.ccft_path, key = _ccft(
                        spec,
                        table,
                        split,
                        d.key,
                        s.key,
                        int(seed),
                        base,
                        artifacts,
                        cache_dir,
                        device,
                        counter,
                        out,
                        log,
                    )
                    group.arrays["ccft"] = key
                out.groups[group.key] = group
    if not out.tables:
        raise ConfigError(f"no dataset of the sweep is available: {out.skipped}")
    out.encoding = list(counter.rows.values())
    out.seconds = time.perf_counter() - t_start
    return out


def _ccft(
    spec, table, split, ds, sp, seed, base, artifacts: Path, cache_dir, device, counter: _Counter, out: Prepared, log
) -> tuple[str, str]:
    from ray_router.embeddings import get_encoder
    from ray_router.embeddings.ccft import ccft_fingerprint, fine_tune

    cfg = ccft_config(spec.ccft)
    texts = [str(t) for t in table.texts[split.offline]]
    cats = [str(c) for c in table.categories[split.offline]]
    fp = ccft_fingerprint(texts, cats, cfg, base_model=base)
    path = artifacts / f"ccft-{slug(ds)}-{slug(sp)}-seed{seed}-{fp.removeprefix('ccft-')}"
    reused = (path / "ray_router_artifact.json").is_file()
    t0 = time.perf_counter()
    path = fine_tune(texts, cats, cfg, path, base_model=base, device=device)
    seconds = time.perf_counter() - t0
    out.ccft.append(
        {
            "dataset": ds,
            "split": sp,
            "split_seed": seed,
            "path": str(path),
            "fingerprint": fp,
            "reused": reused,
            "seconds": round(seconds, 1),
            "n_offline": len(texts),
        }
    )
    log(f"{ds}/{sp}/seed {seed}: CCFT artifact {'reused' if reused else 'trained'} in {seconds:.0f}s ({path.name})")
    enc = get_encoder(str(path), cache_dir=cache_dir, device=device, backend=spec.encoder.backend)
    key = f"{ds}/{sp}/{seed}/ccft"
    out.arrays[key] = counter.encode(enc, [str(t) for t in table.texts], f"{ds}/{sp}/seed{seed} (ccft)")
    return str(path), key
