"""The arm table: ids, prices, upstreams and model embeddings a_k, resolved once by the builder.

Three sources (``arm_embeddings``): a file (``ray-router calibrate`` writes one, with a per-category
profile), a dataset's offline split, or a cold start (no offline data: :func:`cold_start_embeddings`
and the neutral :func:`cold_start_prior`).

Arm embeddings come from a file or are computed from a dataset's offline split with the core
function ``offline_arm_embeddings`` the replay evaluation uses (costs divided by the largest
category mean: the service applies each request's own cost weight at ranking time), with the same encoder the embedder replicas serve (so query and arm
embeddings share one space). The offline texts go through the core's embedding cache, so only the
first start of a given encoder pays for encoding them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ray_router.errors import ConfigError, DataError, RouterError, UnknownArmError
from ray_router.serve.config import AppArgs, DatasetEmbeddingsSpec, UpstreamSpec
from ray_router.serve.ranking import normalised_prices
from ray_router.serve.specs import COLD_START_NOTE

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class ArmTable:
    ids: tuple[str, ...]
    prices: np.ndarray  # (K,) USD per query
    embeddings: np.ndarray  # (K, d)
    encoder_identity: str
    source: str
    upstreams: tuple[UpstreamSpec | None, ...] = field(default=())
    offline_prior: dict | None = None  # OfflinePrior.to_dict(): what the offline rows know (ALGORITHM.md s.5)
    cold_start: bool = False  # arm_embeddings.cold_start: no offline data, all arms equal, online learning only

    @property
    def n_arms(self) -> int:
        return len(self.ids)

    @property
    def price_norm(self) -> np.ndarray:
        return normalised_prices(self.prices)

    def index(self, arm_id: str) -> int:
        try:
            return self.ids.index(arm_id)
        except ValueError:
            raise UnknownArmError(f"unknown arm {arm_id!r}; known arms: {list(self.ids)}") from None


def _encoder_for(args: AppArgs, cache_dir: Any = False):
    from ray_router.embeddings import get_encoder

    return get_encoder(
        args.encoder.name, cache_dir=cache_dir, device=args.encoder.device, **args.encoder.encoder_options()
    )


def encoder_identity(args: AppArgs) -> tuple[str, int]:
    """``(identity, dim)`` of the configured encoder, without loading a model."""
    enc = _encoder_for(args, cache_dir=False)
    return enc.identity, int(enc.dim)


PRIOR_KEYS = ("prior_centroids", "prior_utility", "prior_counts", "prior_categories")


def _prior_from_npz(z, path: Path, ids: list[str], file_ids: list[str] | None) -> dict | None:
    """An operator's per-category profile stored beside the embeddings (:func:`save_arm_embeddings`)."""
    from ray_router.policies.offline_prior import OfflinePrior

    present = [k for k in PRIOR_KEYS if k in z.files]
    if not present:
        return None
    if len(present) != len(PRIOR_KEYS):
        raise DataError(f"{path}: a per-category profile needs all of {list(PRIOR_KEYS)}; has {present}")
    U = np.asarray(z["prior_utility"], dtype=np.float64)
    n_cols = len(file_ids) if file_ids is not None else len(ids)
    if U.ndim != 2 or U.shape[1] != n_cols:
        raise DataError(f"{path}: prior_utility must be (categories, {n_cols} arms), got shape {U.shape}")
    if file_ids is not None:
        U = U[:, [file_ids.index(a) for a in ids]]
    prior = OfflinePrior.from_profile(
        z["prior_centroids"], U, z["prior_counts"], [str(c) for c in z["prior_categories"]]
    )
    return prior.to_dict()


def _covered(args: AppArgs, present: list[str], where: str) -> list[str]:
    """The arm ids the offline data covers (``present``), in arm-table order; an arm it lacks needs
    a ``profile`` (then it is placed by :func:`_place_profiled`), else a ConfigError."""
    ids = list(args.arm_ids)
    missing = [a for a in ids if a not in present]
    unprofiled = [a for a in missing if args.arms[ids.index(a)].profile is None]
    if unprofiled:
        raise ConfigError(
            f"{where} has no embedding for arms {unprofiled}; it has {present} (a new arm the offline data does "
            "not cover needs a 'profile': its expected score per category)"
        )
    return [a for a in ids if a in present]


def _from_file(args: AppArgs, file: str, identity: str) -> tuple[np.ndarray, str, dict | None, list[str]]:
    path = Path(file).expanduser()
    if not path.is_file():
        raise DataError(f"arm_embeddings.file: {path} does not exist (use an absolute path)")
    ids = list(args.arm_ids)
    prior = None
    if path.suffix == ".npy":
        A = np.load(path, allow_pickle=False)
    else:
        with np.load(path, allow_pickle=False) as z:
            if "embeddings" not in z.files:
                raise DataError(f"{path}: an .npz of arm embeddings needs an 'embeddings' array; has {z.files}")
            A = z["embeddings"]
            file_ids = [str(a) for a in z["arm_ids"]] if "arm_ids" in z.files else None
            if file_ids is not None:
                ids = _covered(args, file_ids, str(path))
            prior = _prior_from_npz(z, path, ids, file_ids)
            if "encoder_identity" in z.files:
                found = str(z["encoder_identity"])
                if found != identity:
                    raise ConfigError(f"{path} was computed with encoder {found!r}, the service uses {identity!r}")
            if file_ids is not None:
                A = A[[file_ids.index(a) for a in ids]]
    A = np.asarray(A, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != len(ids):
        raise DataError(f"{path}: expected a ({len(ids)}, d) array in arm-table order, got shape {A.shape}")
    return A, str(path), prior, ids


def _place_profiled(
    args: AppArgs, covered: list[str], A: np.ndarray, prior: dict | None
) -> tuple[np.ndarray, dict | None]:
    """Embeddings and prior of the whole arm table: the covered arms' from the offline data, the
    others' from their profiles (:func:`~ray_router.policies.offline_prior.extend_with_profiles`)."""
    from ray_router.policies.offline_prior import OfflinePrior, extend_with_profiles

    ids = list(args.arm_ids)
    new = [a for a in ids if a not in covered]
    if not new:
        return A, prior
    if prior is None:
        raise ConfigError(
            f"arms {new} have only a profile, and the offline data has no per-category prior to place them in"
        )
    profiles = [args.arms[ids.index(a)].profile or {} for a in new]
    prior_all, A_all = extend_with_profiles(prior, A, profiles)
    order = [(covered + new).index(a) for a in ids]  # back to arm-table order
    p = OfflinePrior.from_dict(prior_all)
    d = p.to_dict()
    d["utility"], d["stderr"] = p.utility[:, order], p.stderr[:, order]
    if p.arm_stderr is not None:
        d["arm_stderr"] = p.arm_stderr[order]
    logger.warning(f"ray-router: arms {new} enter with their profiles' prior (no offline rows of them)")
    return A_all[order], OfflinePrior.from_dict(d).to_dict()


def _from_dataset(args: AppArgs, spec: DatasetEmbeddingsSpec) -> tuple[np.ndarray, str, dict | None, list[str]]:
    from ray_router.data import k_per_category, load_dataset, resolve_data_dir, stratified_split
    from ray_router.embeddings.model_embeddings import WeightingConfig, offline_arm_embeddings

    data_dir = resolve_data_dir(spec.data_dir)
    if not data_dir.is_dir():
        raise DataError(
            f"arm_embeddings.from_dataset: data directory {str(data_dir)!r} does not exist. Set "
            "args.arm_embeddings.from_dataset.data_dir in the Serve config, or $RAY_ROUTER_DATA_DIR "
            "(ray-router serve --data-dir), to the folder with the dataset files"
        )
    try:
        table = load_dataset(spec.name, data_dir=data_dir, **spec.options)
    except RouterError as e:
        raise type(e)(f"arm_embeddings.from_dataset: {e}") from None
    column_of = {a.id: a.dataset_arm or a.id for a in args.arms}
    missing = [
        c for a, c in column_of.items() if c not in table.arms and args.arms[args.arm_ids.index(a)].profile is None
    ]
    if missing:
        raise ConfigError(
            f"arm_embeddings.from_dataset: {table.name} has no arm(s) {missing}; its arms are {list(table.arms)} "
            "(set dataset_arm on an arm to map its id to a dataset column, or give a new arm a 'profile')"
        )
    covered = [a for a, c in column_of.items() if c in table.arms]
    cols = np.array([table.arms.index(column_of[a]) for a in covered])
    if spec.split == "stratified":
        split = stratified_split(table.categories, offline_fraction=spec.offline_fraction, seed=spec.seed)
    else:
        split = k_per_category(table.categories, k=spec.k_per_category, seed=spec.seed)
    offline = split.offline
    encoder = _encoder_for(args, cache_dir=spec.cache_dir)  # None -> the core's default cache
    X = encoder.encode([str(t) for t in table.texts[offline]])
    cats = table.categories[offline]
    w = spec.weighting
    wcfg = WeightingConfig(name=w.name, cost_weight=w.cost_weight, top_tau=w.top_tau, beta=w.beta)
    A = offline_arm_embeddings(table, X, offline, wcfg, cost_normaliser="category_max", columns=cols)
    source = f"{table.name} ({table.source}): {len(offline)} offline rows, split {split.name}, weighting {w.name}"
    from ray_router.config import parse
    from ray_router.policies.fgts_cdb import FGTSConfig, resolve_config
    from ray_router.policies.offline_prior import fit_offline_prior
    from ray_router.serve.state import serving_policy_config

    # the shrinkage the service's policy asks for (thin offline data: the thin preset's); quality only
    # (λ = 0): the service applies each request's cost weight at ranking time
    cfg = resolve_config(parse(FGTSConfig, serving_policy_config(args.policy.config)), {"categories": cats})
    prior = fit_offline_prior(
        X,
        table.scores[offline][:, cols],
        cats,
        tau_floor=cfg.shrinkage_tau_floor,
        marginal_stderr=cfg.shrinkage_stderr == "marginal",
    ).to_dict()
    return A, source, prior, covered


def cold_start_embeddings(arm_ids, dim: int) -> np.ndarray:
    """``(K, d)`` arm embeddings for a cold start: each arm a fixed random sign vector ``±1/sqrt(d)``
    seeded by its id (unit norm; the same vector whatever the arm's position in the table).

    Why not one vector for every arm: under the Hadamard map φ = x ⊙ a_k, equal a_k give every
    arm the same features, so no duel could ever tell two arms apart. Why not one-hot e_k: arm k's
    score would be θ_k·x_k, one coordinate of the query, which says nothing about the query and
    flips sign between queries. Independent random signs give each arm its own direction over
    the whole query (<θ ⊙ a_k, x>), with no arm favoured: nearly orthogonal for K << d, all the same
    norm, no structure that a benchmark would have put there."""
    rows = []
    for arm in arm_ids:
        seed = int.from_bytes(hashlib.blake2b(str(arm).encode(), digest_size=8).digest(), "big")
        rows.append(np.random.default_rng(seed).choice([-1.0, 1.0], size=dim))
    return np.stack(rows) / np.sqrt(dim)


def cold_start_prior(n_arms: int, dim: int) -> dict:
    """The neutral per-category profile of a cold start: one category, every arm the same utility,
    resting on one pseudo-row. Its prior feature û_k(x) is equal for every arm (no preference), and
    it switches on the offline prior's per-arm terms (the correction block and ``arm_bias``, prior
    sd = correction_scale · w0 · 0.5): without them FGTS.CDB's Hadamard map has no way to learn
    that one arm is better on every query (ALGORITHM_NOTES: reachability)."""
    from ray_router.policies.offline_prior import OfflinePrior

    centroid = np.full((1, dim), 1.0 / np.sqrt(dim))
    return OfflinePrior.from_profile(centroid, np.zeros((1, n_arms)), [1.0], ["cold-start"]).to_dict()


def resolve_arm_table(args: AppArgs) -> ArmTable:
    identity, dim = encoder_identity(args)
    spec = args.arm_embeddings
    if spec.cold_start:
        logger.warning(f"ray-router: {COLD_START_NOTE} ({len(args.arms)} arms)")
        return ArmTable(
            ids=args.arm_ids,
            prices=np.array([a.price_usd for a in args.arms], dtype=np.float64),
            embeddings=cold_start_embeddings(args.arm_ids, dim),
            encoder_identity=identity,
            source=COLD_START_NOTE,
            upstreams=tuple(a.upstream for a in args.arms),
            offline_prior=cold_start_prior(len(args.arms), dim),
            cold_start=True,
        )
    if spec.file is not None:
        A, source, prior, covered = _from_file(args, spec.file, identity)
    elif spec.from_dataset is not None:
        A, source, prior, covered = _from_dataset(args, spec.from_dataset)
    else:  # ArmEmbeddingsSpec's validator rules this out
        raise ConfigError("set exactly one of arm_embeddings.file, from_dataset and cold_start")
    A, prior = _place_profiled(args, covered, np.asarray(A, dtype=np.float64), prior)
    if A.shape[1] != dim:
        raise ConfigError(f"arm embeddings have dim {A.shape[1]}, the encoder {identity!r} gives {dim}")
    if not np.isfinite(A).all():
        raise DataError("arm embeddings contain NaN or inf")
    return ArmTable(
        ids=args.arm_ids,
        prices=np.array([a.price_usd for a in args.arms], dtype=np.float64),
        embeddings=A,
        encoder_identity=identity,
        source=source,
        upstreams=tuple(a.upstream for a in args.arms),
        offline_prior=prior,
    )


def save_arm_embeddings(
    path: str | Path, arm_ids, embeddings: np.ndarray, encoder_identity: str | None = None, profile: dict | None = None
) -> Path:
    """Write an ``.npz`` that ``arm_embeddings.file`` reads (ids and identity are checked on load).

    ``profile``: an operator's per-category prior for a pool no benchmark covers, ``{"centroids":
    (M, d) mean embedding of a few example queries per category, "utility": (M, K) score per category
    and arm, "counts": (M,) rows each score rests on, "categories": M names}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # dict[str, Any]: numpy's stubs cannot tell that no key is savez's keyword ``allow_pickle``
    arrays: dict[str, Any] = {
        "embeddings": np.asarray(embeddings, dtype=np.float64),
        "arm_ids": np.array([str(a) for a in arm_ids]),
    }
    if profile is not None:
        arrays.update({f"prior_{k}": np.asarray(profile[k]) for k in ("centroids", "utility", "counts", "categories")})
    if encoder_identity:
        arrays["encoder_identity"] = np.array(encoder_identity)
    np.savez(path, **arrays)
    return path


def describe(table: ArmTable) -> str:
    return json.dumps({"arms": list(table.ids), "dim": int(table.embeddings.shape[1]), "source": table.source})
