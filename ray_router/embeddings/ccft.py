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

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

import numpy as np
from pydantic import Field, TypeAdapter, ValidationError

from ray_router.config import as_config_error, config_dataclass, field_names, replace
from ray_router.embeddings.options import Int, PositiveReal, Real
from ray_router.embeddings.sentence import ARTIFACT_FILE, SentenceTransformerEncoder, resolve_device
from ray_router.errors import ConfigError, DataError

if TYPE_CHECKING:  # pragma: no cover
    import torch

FORMAT_VERSION = 1
ARTIFACT_KIND = "ccft"


# ============================================================================ config
Loss = Literal["masked_mnrl", "mnrl"]
LOSSES: tuple[str, ...] = get_args(Loss)


@config_dataclass
class CCFTConfig:
    """Hyperparameters of one CCFT run (a strict, frozen pydantic dataclass: build it with
    ``ray_router.config.parse(CCFTConfig, values, where=...)`` to get a :class:`ConfigError` naming the
    field; direct construction raises pydantic's ``ValidationError``).

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
      fraction of the steps, then linear decay to 0 (see :func:`warmup_linear_schedule`).
      ``weight_decay`` (0.01, AdamW) and ``max_grad_norm`` (1.0; 0 = no clipping) as in
      sentence-transformers' ``fit``.
    - ``max_seq_length``: token limit during training, stored in the artifact (so the fine-tuned
      encoder reads the same tokens it was trained on); None = the base model's (256 for MiniLM).
    - ``seed``: query sampling, pairing, batch order, dropout. On CPU the same inputs and seed give
      bit-identical weights.

    Numbers are checked strictly (``"3"`` and ``True`` are not integers, NaN and inf are refused);
    numpy scalars count as the Python numbers they hold.
    """

    loss: Loss = "masked_mnrl"
    queries_per_category: Annotated[Int, Field(ge=1)] = 32
    epochs: Annotated[Int, Field(ge=1)] = 4
    lr: PositiveReal = 2e-5
    batch_size: Annotated[Int, Field(ge=2)] = 32
    scale: PositiveReal = 20.0
    max_seq_length: Annotated[Int, Field(ge=2)] | None = None
    seed: Annotated[Int, Field(ge=0)] = 0
    warmup_ratio: Annotated[Real, Field(ge=0, lt=1)] = 0.1
    weight_decay: Annotated[Real, Field(ge=0)] = 0.01
    max_grad_norm: Annotated[Real, Field(ge=0)] = 1.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (the fields are Python ints, floats, strings or None)."""
        return {name: getattr(self, name) for name in field_names(CCFTConfig)}


# ============================================================================== loss
_LOSS_CLASS: Any = None
_POSITIVE_REAL: TypeAdapter[float] = TypeAdapter(PositiveReal)


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
            try:
                self.scale = _POSITIVE_REAL.validate_python(scale, strict=True)
            except ValidationError as e:
                raise as_config_error(e, "loss scale") from None
            self.label_aware = bool(label_aware)

        def logits(self, anchors: torch.Tensor, positives: torch.Tensor, labels: torch.Tensor | None = None):
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

        def forward(self, anchors: torch.Tensor, positives: torch.Tensor, labels: torch.Tensor | None = None):
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
    from ray_router.embeddings.openai_encoder import OpenAIEncoder, cannot_fine_tune, is_openai_name

    inner = getattr(base_model, "encoder", None)  # a CachedEncoder wrapping a real encoder
    if is_openai_name(base_model) or isinstance(inner or base_model, OpenAIEncoder):
        raise cannot_fine_tune(f"{getattr(base_model, 'identity', base_model)!r}".partition("#")[0])
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
        if type(value) is int and 0 < value < 1_000_000:  # transformers writes ~1e30 for "no limit"
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
            config = replace(config, where="CCFTConfig", max_seq_length=limit)
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
        with contextlib.suppress(Exception):  # informational only
            out[mod] = __import__(mod).__version__
    return out


def _train(plan: _Plan, device: str) -> CCFTResult:
    """One CCFT run: load the base model, draw every epoch's pairs, build the optimiser and its
    schedule, fit, and describe the result."""
    dev = resolve_device(device)
    model = _load_base_model(plan, dev)
    epochs = _draw_epochs(plan)
    n_steps = sum(len(batches) for batches in epochs)
    optimiser = _optimiser(model, plan.config)
    scheduler = warmup_linear_schedule(optimiser, math.ceil(plan.config.warmup_ratio * n_steps), n_steps)
    start, cpu_start = time.perf_counter(), time.process_time()
    history = _fit(model, plan, epochs, optimiser, scheduler, dev)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return CCFTResult(model=model, metadata=_metadata(plan, model, history, n_steps, dev, seconds, cpu_seconds))


def _load_base_model(plan: _Plan, dev: str) -> Any:
    """The base ``SentenceTransformer`` on ``dev`` with the config's token limit (no progress bar)."""
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = SentenceTransformer(str(plan.base.model_path), device=dev)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if plan.config.max_seq_length is not None:
        model.max_seq_length = int(plan.config.max_seq_length)
    return model


def _draw_epochs(plan: _Plan) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Every epoch's (anchor, positive) batches, drawn up front with one generator seeded by the config."""
    rng = np.random.default_rng(plan.config.seed)
    return [_pair_batches(plan.labels, plan.config.batch_size, rng) for _ in range(plan.config.epochs)]


_NO_DECAY = ("bias", "LayerNorm.weight", "LayerNorm.bias")


def _optimiser(model: Any, config: CCFTConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on every parameter but biases and LayerNorms (as sentence-transformers' ``fit``)."""
    import torch

    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        (no_decay if any(k in name for k in _NO_DECAY) else decay).append(param)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )


def warmup_linear_schedule(optimiser: torch.optim.Optimizer, n_warmup: int, n_steps: int) -> Any:
    """Linear warm-up over ``n_warmup`` steps, then linear decay to 0 at ``n_steps``: at step ``s``
    (0-based) the learning rate is ``lr · (s + 1) / (n_warmup + 1)`` during the warm-up and
    ``lr · (n_steps - s) / max(1, n_steps - n_warmup)`` after it.

    transformers' ``get_linear_schedule_with_warmup`` started one step later (over ``n_warmup + 1``
    warm-up and ``n_steps + 1`` total steps, resumed at step 1): so the first step's rate is never 0
    and the first step moves the weights (a one-step run would otherwise train nothing)."""
    from transformers import get_linear_schedule_with_warmup

    for group in optimiser.param_groups:
        group.setdefault("initial_lr", group["lr"])  # what a scheduler resumed at step 1 reads
    return get_linear_schedule_with_warmup(optimiser, n_warmup + 1, n_steps + 1, last_epoch=0)


def _fit(model: Any, plan: _Plan, epochs: list, optimiser: Any, scheduler: Any, dev: str) -> list[float]:
    """Train ``model`` in place; the mean loss of each epoch. Dropout draws from torch's global
    generator, seeded by the config inside ``fork_rng`` (the caller's generator state is kept)."""
    import torch

    loss_fn = make_loss(plan.config)
    cats = sorted(set(plan.labels.tolist()))
    labels = torch.tensor([cats.index(c) for c in plan.labels], dtype=torch.long)
    fork_devices = [torch.device(dev).index or 0] if dev.startswith("cuda") else []
    history: list[float] = []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(plan.config.seed)
        model.train()
        for batches in epochs:
            losses = [
                _train_step(model, loss_fn, optimiser, scheduler, plan, a_idx, p_idx, labels[a_idx])
                for a_idx, p_idx in batches
            ]
            history.append(float(np.mean(losses)))
    model.eval()
    return history


def _train_step(
    model: Any,
    loss_fn: Any,
    optimiser: Any,
    scheduler: Any,
    plan: _Plan,
    a_idx: np.ndarray,
    p_idx: np.ndarray,
    labels: torch.Tensor,
) -> float:
    """One optimiser step on a batch of (anchor, positive) pairs; returns its loss."""
    import torch

    emb = _embed([plan.texts[i] for i in a_idx] + [plan.texts[i] for i in p_idx], model)
    loss = loss_fn(emb[: len(a_idx)], emb[len(a_idx) :], labels)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    if plan.config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), plan.config.max_grad_norm)
    optimiser.step()
    scheduler.step()
    return float(loss.detach())


def _embed(texts: list[str], model: Any) -> torch.Tensor:
    """Sentence embeddings of ``texts`` with gradients (the model's forward pass, not ``encode``)."""
    preprocess = getattr(model, "preprocess", None) or model.tokenize
    features = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in preprocess(texts).items()}
    return model(features)["sentence_embedding"]


def _metadata(
    plan: _Plan, model: Any, history: list[float], n_steps: int, dev: str, seconds: float, cpu_seconds: float
) -> dict[str, Any]:
    """The artifact metadata of a finished run (``created_at`` is added when it is saved)."""
    return {
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
        "categories": {c: {"available": n, "used": int((plan.labels == c).sum())} for c, n in plan.available.items()},
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
def _silhouette_cosine(X: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-sample silhouette with cosine distance (scikit-learn, which works through the distance
    matrix in chunks); 0 for a row alone in its label. At least two labels."""
    from sklearn.metrics import silhouette_samples

    if len(set(labels.tolist())) >= len(X):  # every row alone in its label (scikit-learn refuses it)
        return np.zeros(len(X))
    return np.asarray(silhouette_samples(X, labels, metric="cosine"), dtype=np.float64)


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
    """How well embeddings separate categories on held-out queries.

    - ``nearest_centroid_accuracy``: each eval row is assigned the category whose train centroid
      (mean of the unit-normalised train rows) has the highest cosine; the share assigned correctly,
      over eval rows whose category occurs in the train set (``n_eval_unseen`` counts the others).
    - ``silhouette``: mean silhouette of the eval rows under their true labels with cosine distance
      (Rousseeuw 1987; scikit-learn's ``silhouette_samples``, 0 for a row alone in its label), NaN with fewer than two
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
    if len(eval_cats) >= 2:
        s = _silhouette_cosine(Xe, ye)
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
        "n_train": len(Xt),
        "n_eval": len(Xe),
        "n_eval_unseen": int((~seen).sum()),
        "categories": train_cats,
        "per_category": per_category,
    }


__all__ = [
    "FORMAT_VERSION",
    "LOSSES",
    "CCFTConfig",
    "CCFTResult",
    "InBatchContrastiveLoss",  # noqa: F822 - defined on first use, by __getattr__
    "category_separation",
    "ccft_fingerprint",
    "fine_tune",
    "make_loss",
    "read_artifact",
    "sample_training_queries",
    "save_artifact",
    "train",
    "training_data_sha256",
    "warmup_linear_schedule",
]
