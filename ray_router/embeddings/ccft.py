"""CCFT: Category-Calibrated Fine-Tuning of a sentence-transformers encoder (ALGORITHM.md s.3, step 1).

Fine-tune the encoder on the category labels of the offline split so that queries of one category
sit close together and queries of different categories far apart. The result is a versioned
artifact directory that any encoder in this package reloads by path::

    path = fine_tune(offline.texts, offline.categories, CCFTConfig(), "artifacts/ccft-rb-seed0")
    encoder = get_encoder(str(path))            # CachedEncoder; identity differs from the base model's

Artifact layout (``out_dir``): the sentence-transformers model files written by
``SentenceTransformer.save`` plus ``ray_router_artifact.json``::

    format_version, kind="ccft", name, fingerprint, base_model{name, identity, fingerprint, path},
    config{...CCFTConfig...}, max_seq_length, categories{cat: {available, used}}, n_train,
    data_sha256, created_at, train_seconds, train_cpu_seconds, final_loss, loss_history, n_steps, device, versions{...}

``fingerprint`` = ``ccft-`` + 16 hex of sha256(format version, base fingerprint, config, data hash).
It enters the encoder identity (``SentenceTransformerEncoder`` reads it), so the embedding cache never
mixes CCFT vectors with the base model's or with another CCFT run's. Re-running :func:`fine_tune` with
the same inputs into a directory that already holds an artifact with that fingerprint returns it
without training: callers cache artifacts by choosing ``out_dir`` per (encoder, split).

Importing this module is cheap; ``torch`` and ``sentence_transformers`` load when training starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ray_router.embeddings.sentence import ARTIFACT_FILE, SentenceTransformerEncoder, resolve_device
from ray_router.errors import ConfigError, DataError

if TYPE_CHECKING:  # pragma: no cover
    import torch

FORMAT_VERSION = 1
ARTIFACT_KIND = "ccft"
LOSSES = ("masked_mnrl", "mnrl")


# ============================================================================ config
def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class CCFTConfig:
    """Hyperparameters of one CCFT run (frozen, validated on construction: bad values raise
    :class:`ConfigError`).

    - ``loss``: ``masked_mnrl`` (default; in-batch contrastive loss whose same-category in-batch
      items are masked out instead of counted as negatives, see :class:`InBatchContrastiveLoss`) or
      ``mnrl`` (plain MultipleNegativesRankingLoss: every other in-batch positive is a negative).
      With few categories (RouterBench's subset has 3) about a third of plain MNRL's negatives share
      the anchor's category, so it pushes same-category queries apart; hence the masked default.
    - ``queries_per_category`` (32): offline queries sampled per category (all of a category when it
      has fewer). The paper reports ~5 suffice; 32 is **our choice**: it still costs seconds on a CPU
      and gives the contrastive loss more than a few distinct pairs per category.
    - ``epochs`` (4): passes over the sampled queries; each query is an anchor once per epoch, paired
      with a different random query of its category. A few epochs because the sample is tiny.
    - ``lr`` (2e-5), ``batch_size`` (32), ``scale`` (20, the inverse temperature of the cosine
      logits): ALGORITHM.md's defaults (MNRL's). ``warmup_ratio`` (0.1): linear warm-up over that
      fraction of the steps, then linear decay to 0 (sentence-transformers' ``WarmupLinear``).
      ``weight_decay`` (0.01, AdamW) and ``max_grad_norm`` (1.0; 0 = no clipping) as in
      sentence-transformers' ``fit``.
    - ``max_seq_length``: token limit during training, stored in the artifact (so the fine-tuned
      encoder reads the same tokens it was trained on); None = the base model's (256 for MiniLM).
    - ``seed``: query sampling, pairing, batch order, dropout. On CPU the same inputs and seed give
      bit-identical weights.
    """

    loss: str = "masked_mnrl"
    queries_per_category: int = 32
    epochs: int = 4
    lr: float = 2e-5
    batch_size: int = 32
    scale: float = 20.0
    max_seq_length: int | None = None
    seed: int = 0
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"CCFTConfig.loss must be one of {list(LOSSES)}, got {self.loss!r}")
        for name, low in (("queries_per_category", 1), ("epochs", 1), ("batch_size", 2), ("seed", 0)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ConfigError(f"CCFTConfig.{name} must be an integer >= {low}, got {value!r}")
        if self.max_seq_length is not None and (not _is_int(self.max_seq_length) or self.max_seq_length < 2):
            raise ConfigError(f"CCFTConfig.max_seq_length must be None or an integer >= 2, got {self.max_seq_length!r}")
        for name in ("lr", "scale"):
            value = getattr(self, name)
            if not _is_real(value) or value <= 0:
                raise ConfigError(f"CCFTConfig.{name} must be a finite number > 0, got {value!r}")
        if not _is_real(self.warmup_ratio) or not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"CCFTConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        for name in ("weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not _is_real(value) or value < 0:
                raise ConfigError(f"CCFTConfig.{name} must be a finite number >= 0, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (ints and floats as Python types)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v if v is None or isinstance(v, str) else (int(v) if _is_int(v) else float(v))
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "CCFTConfig":
        """Build from a mapping; an unknown key is a :class:`ConfigError` that lists the fields."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(f"unknown CCFTConfig field(s) {unknown}; valid: {names}")
        return cls(**dict(values))


# ============================================================================== loss
_LOSS_CLASS: Any = None


def _loss_class():
    """Define the loss class on first use, so that importing this module does not import torch
    (``from ray_router.embeddings.ccft import InBatchContrastiveLoss`` goes through ``__getattr__``)."""
    global _LOSS_CLASS
    if _LOSS_CLASS is not None:
        return _LOSS_CLASS
    import torch
    from torch import nn

    class InBatchContrastiveLoss(nn.Module):
        """In-batch contrastive loss over (anchor, positive) pairs, optionally label-aware.

        For a batch of ``B`` pairs with embeddings ``a_i``, ``p_i`` and category labels ``y_i``, the
        logits are ``L_ij = scale · cos(a_i, p_j)`` and the loss is the cross-entropy of picking
        ``p_i`` for ``a_i`` among the candidates ``{p_j}``::

            loss = mean_i [ -L_ii + log sum_{j in C(i)} exp(L_ij) ]

        - ``label_aware=False``: ``C(i)`` = every ``j`` (MultipleNegativesRankingLoss: Henderson et
          al. 2017, "Efficient Natural Language Response Suggestion for Smart Reply",
          arXiv:1705.00652; sentence-transformers' ``MultipleNegativesRankingLoss``).
        - ``label_aware=True``: ``C(i)`` = ``{i} ∪ {j : y_j != y_i}``: in-batch items of the anchor's
          own category are masked out instead of being counted as negatives, in the spirit of
          supervised contrastive learning (Khosla et al. 2020, "Supervised Contrastive Learning",
          NeurIPS, arXiv:2004.11362), which never treats same-label samples as negatives. A row whose
          candidates are all masked has loss 0.

        ``forward(anchors, positives, labels=None)``: ``(B, d)`` float tensors and ``(B,)`` integer
        labels (required when label-aware). Returns a scalar tensor.
        """

        def __init__(self, scale: float = 20.0, label_aware: bool = True):
            super().__init__()
            if not _is_real(scale) or scale <= 0:
                raise ConfigError(f"loss scale must be a finite number > 0, got {scale!r}")
            self.scale = float(scale)
            self.label_aware = bool(label_aware)

        def logits(self, anchors: "torch.Tensor", positives: "torch.Tensor", labels: "torch.Tensor | None" = None):
            a = nn.functional.normalize(anchors, p=2, dim=-1)
            p = nn.functional.normalize(positives, p=2, dim=-1)
            scores = self.scale * (a @ p.T)
            if self.label_aware:
                if labels is None:
                    raise ConfigError("the label-aware loss needs the category label of every pair")
                labels = labels.to(scores.device)
                same = labels[:, None] == labels[None, :]
                same.fill_diagonal_(False)
                scores = scores.masked_fill(same, float("-inf"))
            return scores

        def forward(self, anchors: "torch.Tensor", positives: "torch.Tensor", labels: "torch.Tensor | None" = None):
            if anchors.shape != positives.shape or anchors.ndim != 2:
                raise ConfigError(
                    f"anchors {tuple(anchors.shape)} and positives {tuple(positives.shape)} must both be (B, d)"
                )
            scores = self.logits(anchors, positives, labels)
            target = torch.arange(len(scores), device=scores.device)
            return nn.functional.cross_entropy(scores, target)

        def extra_repr(self) -> str:
            return f"scale={self.scale}, label_aware={self.label_aware}"

        def get_config_dict(self) -> dict[str, Any]:  # same hook sentence-transformers' losses offer
            return {"scale": self.scale, "label_aware": self.label_aware}

    InBatchContrastiveLoss.__module__ = __name__
    InBatchContrastiveLoss.__qualname__ = "InBatchContrastiveLoss"
    _LOSS_CLASS = InBatchContrastiveLoss
    return InBatchContrastiveLoss


def __getattr__(name: str) -> Any:
    if name == "InBatchContrastiveLoss":
        return _loss_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_loss(config: CCFTConfig):
    """The loss module a config asks for (imports torch)."""
    cls = _loss_class()
    return cls(scale=config.scale, label_aware=config.loss == "masked_mnrl")


# ========================================================================= sampling
def _labels(categories: Sequence[str] | np.ndarray) -> np.ndarray:
    return np.asarray([str(c) for c in categories], dtype=object)


def sample_training_queries(
    texts: Sequence[str], categories: Sequence[str] | np.ndarray, queries_per_category: int, seed: int = 0
) -> np.ndarray:
    """Row indices of the CCFT training sample: ``queries_per_category`` random rows of each category
    (all of a category with fewer), categories visited in sorted order with one
    ``numpy.random.default_rng(seed)``; within a category the rows are in drawn order."""
    labels = _labels(categories)
    if len(labels) != len(texts):
        raise DataError(f"CCFT: {len(texts)} texts but {len(labels)} category labels")
    rng = np.random.default_rng(seed)
    picks = []
    for c in sorted(set(labels.tolist())):
        rows = np.flatnonzero(labels == c)
        picks.append(rows[rng.permutation(len(rows))[:queries_per_category]])
    return np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)


def training_data_sha256(texts: Sequence[str], labels: Sequence[str]) -> str:
    """sha256 (hex) of the training sample: the JSON list of ``[label, text]`` in training order."""
    payload = json.dumps([[str(c), str(t)] for t, c in zip(texts, labels)], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _pair_batches(labels: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """One epoch of (anchor, positive) index batches.

    Each category's samples are shuffled and cut into disjoint pairs, so a text occurs at most once
    per epoch and never twice in a batch (as sentence-transformers' ``NoDuplicatesBatchSampler``
    ensures: a duplicate would be an in-batch "negative" identical to the anchor). With an odd count
    the sample left over sits out this epoch (another one the next); a category of one sample pairs
    it with itself (SimCSE's dropout-noise positive). Pairs are shuffled and cut into near-equal
    batches of at most ``batch_size`` (no batch of one when there are two or more pairs)."""
    anchors, positives = [], []
    for c in sorted(set(labels.tolist())):
        perm = rng.permutation(np.flatnonzero(labels == c))
        if len(perm) == 1:
            perm = np.concatenate([perm, perm])
        n_pairs = len(perm) // 2
        anchors.append(perm[0 : 2 * n_pairs : 2])
        positives.append(perm[1 : 2 * n_pairs : 2])
    a, p = np.concatenate(anchors), np.concatenate(positives)
    order = rng.permutation(len(a))
    a, p = a[order], p[order]
    n_batches = max(1, math.ceil(len(a) / batch_size))
    return list(zip(np.array_split(a, n_batches), np.array_split(p, n_batches)))


# ========================================================================== training
@dataclass
class CCFTResult:
    """What :func:`train` returns: the fine-tuned ``SentenceTransformer`` (eval mode) and the
    artifact metadata (without ``created_at``, which :func:`save_artifact` adds)."""

    model: Any
    metadata: dict[str, Any]


def _base_encoder(base_model: Any) -> SentenceTransformerEncoder:
    inner = getattr(base_model, "encoder", None)  # a CachedEncoder wrapping a real encoder
    if isinstance(inner, SentenceTransformerEncoder):
        base_model = inner
    if isinstance(base_model, SentenceTransformerEncoder):
        return SentenceTransformerEncoder(base_model.model_path, device="cpu")
    if base_model is None or isinstance(base_model, (str, os.PathLike)):
        return SentenceTransformerEncoder(base_model, device="cpu")
    raise ConfigError(
        "base_model must be None (packaged MiniLM), a model directory or a SentenceTransformerEncoder, "
        f"got {base_model!r}"
    )


def _model_max_seq_length(path: Path) -> int | None:
    """The token limit a saved model declares: ``sentence_bert_config.json`` (older
    sentence-transformers), else the tokenizer's ``model_max_length`` (what 6.x saves), else None."""
    for name, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        try:
            value = json.loads((path / name).read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if _is_int(value) and 0 < value < 1_000_000:  # transformers writes ~1e30 for "no limit"
            return int(value)
    return None


@dataclass(frozen=True)
class _Plan:
    """Everything fixed before training: the sample, its hash, the resolved config, the fingerprint."""

    base: SentenceTransformerEncoder
    config: CCFTConfig
    texts: list[str]
    labels: np.ndarray
    available: dict[str, int]
    data_sha256: str
    fingerprint: str


def _plan(texts: Sequence[str], categories: Sequence[str] | np.ndarray, config: CCFTConfig, base_model: Any) -> _Plan:
    if not isinstance(config, CCFTConfig):
        raise ConfigError(f"config must be a CCFTConfig, got {type(config).__name__}")
    texts = [str(t) for t in texts]
    labels = _labels(categories)
    if len(texts) != len(labels):
        raise DataError(f"CCFT: {len(texts)} texts but {len(labels)} category labels")
    available = {c: int((labels == c).sum()) for c in sorted(set(labels.tolist()))}
    if len(available) < 2:
        raise DataError(f"CCFT needs queries of at least 2 categories, got {sorted(available)}")
    base = _base_encoder(base_model)
    if config.max_seq_length is None:  # resolve, so that None and the base's own limit hash alike
        limit = _model_max_seq_length(base.model_path)
        if limit is not None:
            config = dataclasses.replace(config, max_seq_length=limit)
    rows = sample_training_queries(texts, labels, config.queries_per_category, config.seed)
    train_texts, train_labels = [texts[i] for i in rows], labels[rows]
    data_hash = training_data_sha256(train_texts, train_labels)
    blob = json.dumps(
        {"format_version": FORMAT_VERSION, "base": base.fingerprint, "config": config.to_dict(), "data": data_hash},
        sort_keys=True,
    )
    fingerprint = "ccft-" + hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
    return _Plan(base, config, train_texts, train_labels, available, data_hash, fingerprint)


def ccft_fingerprint(
    texts: Sequence[str], categories: Sequence[str] | np.ndarray, config: CCFTConfig, base_model: Any = None
) -> str:
    """The fingerprint :func:`fine_tune` would give these inputs, without training (cheap)."""
    return _plan(texts, categories, config, base_model).fingerprint


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("torch", "sentence_transformers", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - informational only
            pass
    return out


def _train(plan: _Plan, device: str) -> CCFTResult:
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    config = plan.config
    dev = resolve_device(device)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = SentenceTransformer(str(plan.base.model_path), device=dev)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if config.max_seq_length is not None:
        model.max_seq_length = int(config.max_seq_length)
    loss_fn = make_loss(config)
    preprocess = getattr(model, "preprocess", None) or model.tokenize

    cats = sorted(set(plan.labels.tolist()))
    y_all = torch.tensor([cats.index(c) for c in plan.labels], dtype=torch.long)
    rng = np.random.default_rng(config.seed)
    epochs = [_pair_batches(plan.labels, config.batch_size, rng) for _ in range(config.epochs)]
    n_steps = sum(len(e) for e in epochs)
    n_warmup = math.ceil(config.warmup_ratio * n_steps)

    def lr_factor(step: int) -> float:  # sentence-transformers' WarmupLinear
        if step < n_warmup:
            return (step + 1) / (n_warmup + 1)  # never 0, so the first step moves the weights
        return max(0.0, (n_steps - step) / max(1, n_steps - n_warmup))

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if any(k in name for k in ("bias", "LayerNorm.weight", "LayerNorm.bias")) else decay).append(param)
    optimiser = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_factor)

    fork_devices = [torch.device(dev).index or 0] if dev.startswith("cuda") else []
    history: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(config.seed)
        model.train()
        for batches in epochs:
            losses = []
            for a_idx, p_idx in batches:
                batch_texts = [plan.texts[i] for i in a_idx] + [plan.texts[i] for i in p_idx]
                features = preprocess(batch_texts)
                features = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in features.items()}
                emb = model(features)["sentence_embedding"]
                loss = loss_fn(emb[: len(a_idx)], emb[len(a_idx) :], y_all[a_idx])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimiser.step()
                scheduler.step()
                losses.append(float(loss.detach()))
            history.append(float(np.mean(losses)))
    model.eval()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start

    counts = {c: {"available": n, "used": int((plan.labels == c).sum())} for c, n in plan.available.items()}
    metadata = {
        "format_version": FORMAT_VERSION,
        "kind": ARTIFACT_KIND,
        "name": f"ccft-{plan.base.name}",
        "fingerprint": plan.fingerprint,
        "base_model": {
            "name": plan.base.name,
            "identity": plan.base.identity,
            "fingerprint": plan.base.fingerprint,
            "path": str(plan.base.model_path),
        },
        "config": plan.config.to_dict(),
        "max_seq_length": int(model.max_seq_length),
        "categories": counts,
        "n_train": len(plan.texts),
        "data_sha256": plan.data_sha256,
        "train_seconds": round(seconds, 3),
        "train_cpu_seconds": round(cpu_seconds, 3),  # all threads; wall >> cpu / threads means a busy machine
        "final_loss": history[-1],
        "loss_history": history,
        "n_steps": n_steps,
        "device": dev,
        "versions": _versions(),
    }
    return CCFTResult(model=model, metadata=metadata)


def train(
    texts: Sequence[str],
    categories: Sequence[str] | np.ndarray,
    config: CCFTConfig | None = None,
    base_model: Any = None,
    device: str = "auto",
) -> CCFTResult:
    """Fine-tune in memory (no files written); :func:`fine_tune` is the usual entry point."""
    return _train(_plan(texts, categories, config or CCFTConfig(), base_model), device)


# ========================================================================== artifact
def read_artifact(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of a CCFT artifact directory (:class:`ConfigError` if it is not one)."""
    path = Path(path).expanduser()
    meta_path = path / ARTIFACT_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not a CCFT artifact (cannot read {ARTIFACT_FILE}: {e})") from e
    if not isinstance(meta, dict) or meta.get("kind") != ARTIFACT_KIND:
        kind = meta.get("kind") if isinstance(meta, dict) else None
        raise ConfigError(f"{meta_path}: not a CCFT artifact (kind {kind!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{meta_path}: format version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    if not (path / "modules.json").is_file():
        raise ConfigError(f"{path}: artifact metadata present but the model files are missing")
    return meta


def _existing_fingerprint(path: Path) -> str | None:
    try:
        return str(read_artifact(path)["fingerprint"])
    except (ConfigError, KeyError):
        return None


def save_artifact(result: CCFTResult, out_dir: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write ``result`` as an artifact directory (atomically: into a temporary sibling, then renamed).

    An existing ``out_dir`` holding the same fingerprint is kept as is; another artifact there is
    replaced only with ``overwrite=True``; a non-empty directory that is not an artifact is never
    touched (:class:`ConfigError`)."""
    out = Path(out_dir).expanduser().resolve()
    fingerprint = result.metadata["fingerprint"]
    if out.exists():
        found = _existing_fingerprint(out)
        if found == fingerprint:
            return out
        _check_replaceable(out, found, fingerprint, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    try:
        _quiet_save(result.model, tmp)
        meta = {**result.metadata, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (tmp / ARTIFACT_FILE).write_text(json.dumps(meta, indent=1, sort_keys=False) + "\n", encoding="utf-8")
        if out.exists():  # overwrite (checked above) or an empty directory
            found = _existing_fingerprint(out)
            if found == fingerprint:  # another process finished the same artifact meanwhile
                return out
            shutil.rmtree(out) if found is not None else out.rmdir()
        try:
            os.replace(tmp, out)
        except OSError:
            if _existing_fingerprint(out) == fingerprint:  # lost a race to an identical writer
                return out
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _quiet_save(model: Any, path: Path) -> None:
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar
    try:
        model.save(str(path), create_model_card=False)
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def _check_replaceable(out: Path, found: str | None, fingerprint: str, overwrite: bool) -> None:
    if not out.is_dir():
        raise ConfigError(f"CCFT out_dir {out} exists and is not a directory")
    if found is None:
        if any(out.iterdir()):
            raise ConfigError(
                f"CCFT out_dir {out} is a non-empty directory that holds no CCFT artifact; not touching it"
            )
        return
    if not overwrite:
        raise ConfigError(
            f"CCFT out_dir {out} holds another artifact (fingerprint {found}, wanted {fingerprint}); "
            "pass overwrite=True to replace it or choose another directory"
        )


def fine_tune(
    texts: Sequence[str],
    categories: Sequence[str] | np.ndarray,
    config: CCFTConfig | None,
    out_dir: str | os.PathLike[str],
    base_model: Any = None,
    device: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Fine-tune the encoder on ``(texts, categories)`` (the offline split) and save the artifact.

    ``config`` (None = ``CCFTConfig()``): samples ``queries_per_category`` queries per category
    (seeded), trains with the config's loss, and writes ``out_dir`` (see the module docstring).
    ``overwrite`` allows replacing another CCFT artifact there. When ``out_dir`` already holds an
    artifact with the same fingerprint (same base model, config and training sample) it is returned
    without training. ``base_model``: None = the packaged all-MiniLM-L6-v2, or a local
    sentence-transformers directory / :class:`SentenceTransformerEncoder`. ``device``: ``auto`` uses
    CUDA when torch sees a GPU, else the CPU. Returns the artifact path; load it with
    ``get_encoder(str(path))`` or ``SentenceTransformerEncoder(path)``.
    """
    plan = _plan(texts, categories, config or CCFTConfig(), base_model)
    out = Path(out_dir).expanduser().resolve()
    if out.exists():
        found = _existing_fingerprint(out)
        if found == plan.fingerprint:
            return out
        _check_replaceable(out, found, plan.fingerprint, overwrite)  # fail before training, not after
    return save_artifact(_train(plan, device), out, overwrite=overwrite)


# ======================================================================== separation
def _silhouette_cosine(X: np.ndarray, y: np.ndarray, n_labels: int, chunk: int = 2048) -> np.ndarray:
    """Per-sample silhouette with cosine distance (rows of ``X`` unit-norm); 0 for singleton labels."""
    n = len(X)
    onehot = np.zeros((n, n_labels))
    onehot[np.arange(n), y] = 1.0
    counts = onehot.sum(axis=0)
    out = np.zeros(n)
    for start in range(0, n, chunk):
        Xc = X[start : start + chunk]
        D = np.clip(1.0 - Xc @ X.T, 0.0, 2.0)
        D[np.arange(len(Xc)), np.arange(start, start + len(Xc))] = 0.0
        sums = D @ onehot  # (chunk, L): total distance to each label's members
        own = y[start : start + chunk]
        rows = np.arange(len(Xc))
        n_own = counts[own]
        a = sums[rows, own] / np.maximum(n_own - 1, 1)
        means = sums / np.maximum(counts, 1)
        means[:, counts == 0] = np.inf
        means[rows, own] = np.inf
        b = means.min(axis=1)
        denom = np.maximum(a, b)
        s = np.where(denom > 0, (b - a) / np.where(denom > 0, denom, 1.0), 0.0)
        out[start : start + chunk] = np.where(n_own > 1, s, 0.0)
    return out


def _unit64(X: Any) -> np.ndarray:
    """Rows scaled to unit L2 norm, in float64 (all-zero rows stay zero)."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise DataError(f"category_separation: expected an (n, d) array, got shape {X.shape}")
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def category_separation(
    X_train: np.ndarray,
    cats_train: Sequence[str] | np.ndarray,
    X_eval: np.ndarray,
    cats_eval: Sequence[str] | np.ndarray,
) -> dict[str, Any]:
    """How well embeddings separate categories on held-out queries (numpy only).

    - ``nearest_centroid_accuracy``: each eval row is assigned the category whose train centroid
      (mean of the unit-normalised train rows) has the highest cosine; the share assigned correctly,
      over eval rows whose category occurs in the train set (``n_eval_unseen`` counts the others).
    - ``silhouette``: mean silhouette of the eval rows under their true labels with cosine distance
      (Rousseeuw 1987; 0 for a row alone in its label, as in scikit-learn), NaN with fewer than two
      eval categories. In [-1, 1], higher = tighter, better separated categories.
    - ``per_category``: accuracy and mean silhouette of each eval category.
    """
    Xt, Xe = _unit64(X_train), _unit64(X_eval)
    yt, ye = _labels(cats_train), _labels(cats_eval)
    if Xt.ndim != 2 or Xe.ndim != 2 or Xt.shape[1] != Xe.shape[1]:
        raise DataError(f"category_separation: shapes {Xt.shape} and {Xe.shape} are not (n, d) with one d")
    if len(Xt) != len(yt) or len(Xe) != len(ye):
        raise DataError("category_separation: every embedding row needs one category label")
    if len(Xt) == 0 or len(Xe) == 0:
        raise DataError("category_separation: empty train or eval set")
    train_cats = sorted(set(yt.tolist()))
    centroids = _unit64(np.stack([Xt[yt == c].mean(axis=0) for c in train_cats]))
    predicted = np.asarray(train_cats, dtype=object)[np.argmax(Xe @ centroids.T, axis=1)]
    seen = np.isin(ye, train_cats)
    correct = predicted == ye
    accuracy = float(correct[seen].mean()) if seen.any() else float("nan")

    eval_cats = sorted(set(ye.tolist()))
    y_idx = np.array([eval_cats.index(c) for c in ye], dtype=np.int64)
    if len(eval_cats) >= 2:
        s = _silhouette_cosine(Xe, y_idx, len(eval_cats))
        silhouette = float(s.mean())
    else:
        s, silhouette = np.full(len(Xe), np.nan), float("nan")
    per_category = {
        c: {
            "n_eval": int((ye == c).sum()),
            "accuracy": float(correct[ye == c].mean()) if c in train_cats else float("nan"),
            "silhouette": float(s[ye == c].mean()),
        }
        for c in eval_cats
    }
    return {
        "nearest_centroid_accuracy": accuracy,
        "silhouette": silhouette,
        "n_train": int(len(Xt)),
        "n_eval": int(len(Xe)),
        "n_eval_unseen": int((~seen).sum()),
        "categories": train_cats,
        "per_category": per_category,
    }


__all__ = [
    "CCFTConfig",
    "CCFTResult",
    "InBatchContrastiveLoss",
    "LOSSES",
    "FORMAT_VERSION",
    "make_loss",
    "sample_training_queries",
    "training_data_sha256",
    "ccft_fingerprint",
    "train",
    "fine_tune",
    "save_artifact",
    "read_artifact",
    "category_separation",
]
