"""ONNX backends of the sentence-transformers encoder: ``onnx`` (float32) and ``onnx-int8``.

Why an own export and not ``SentenceTransformer(..., backend="onnx")``: sentence-transformers'
ONNX backend loads models through ``optimum.onnxruntime``, which lives in ``optimum-onnx``; its only
release on the local registry (0.1.0) requires ``transformers<4.58`` and ``optimum~=2.1``, and the
project runs transformers 5.24 (sentence-transformers 6.2 needs it). So the model is exported here
with torch's own exporter and run with onnxruntime directly, which needs only ``onnx``,
``onnxscript`` (the exporter's) and ``onnxruntime``, all offline.

What is exported: the **whole** sentence-transformers module stack (Transformer, Pooling, Normalize,
and any Dense layer a fine-tuned folder adds), called exactly as ``SentenceTransformer.forward`` calls
it, so pooling and normalisation are the model's own and not re-implemented here. The inputs are the
tokenizer's tensors (``input_ids``, ``attention_mask`` and, where the model takes them,
``token_type_ids``) with dynamic batch and sequence axes; the output is ``sentence_embedding``.
Exporter: ``torch.onnx.export(dynamo=True)``, the maintained one (the TorchScript exporter is
deprecated and bakes Python branches on shapes into the graph). Tokenization at run time uses the
model's own fast tokenizer (``tokenizers``, saved next to the graph) with the model's
``max_seq_length`` as truncation limit, so a process that finds the export on disk never imports
torch or sentence-transformers. Every export is checked before it is published: the graph's output
must match the torch model's on a few texts (cosine >= :data:`EXPORT_CHECK_MIN_COSINE`).

``onnx-int8``: int8 weights and int8 arithmetic in every product with a weight matrix (the embedding
tables and the attention's scores and softmax stay float32); :data:`INT8_RECIPE` (part of the export
key) names the recipe, :data:`INT8_RECIPE_VERSION` (part of the encoder identity) numbers it:

- onnxruntime's dynamic quantization of each fused ``Attention`` node (``QAttention``: query, key and
  value projections as one int8 product) and of every ``MatMul`` with a weight (the attention's
  output projection and both feed-forward ones; ``DynamicQuantizeMatMul`` once the session fuses
  them): per-channel int8 weights (7-bit in ``QAttention``, the quantizer's fixed choice for it),
  activations quantized at run time with one scale per tensor;
- the feed-forward ``MatMul`` inputs row-scaled first (:func:`_row_scale`: ``MatMul(x / r, W) * r``,
  ``r`` the largest magnitude in each row, i.e. token): exact in float32, and it turns the one
  activation scale per tensor into one per row.

Why. Recipe 1 (every ``MatMul`` dynamic, no row scaling) fell to min cosine 0.971 (RouterDC) / 0.978
(RouterBench) to float32 torch, below the 0.99 the issue asks for. The error came from the
per-tensor activation scales of the feed-forward inputs (on the 150 texts where recipe 1 was worst
plus 150 random ones: float32 for the GELU output's ``MatMul`` alone lifted the worst cosine from
0.971 to 0.990, with the first feed-forward ``MatMul`` in float32 as well to 0.996; float32
attention projections gained nothing; per-tensor ``reduce_range``, uint8 weights or asymmetric
activations did not help; 4-bit weights gave 0.89). Recipe 2 gave the feed-forward products
per-block activation scales through ``MatMulNBits`` (8-bit symmetric weights in blocks of 256,
``accuracy_level`` 4): min 0.99698 / 0.99461 over all queries, but that kernel ran the
feed-forward's 2/3 of the arithmetic at about 3x the time per product of the int8 GEMM behind
``DynamicQuantizeMatMul`` (onnxruntime's profiler, 100 RouterBench queries at 1 thread: its 12 nodes
8.0 of 16.1 ms kernel time, the 24 quantized attention projections 1.4 ms). Row scaling gets per-row
scales out of the fast kernel. Over all 3,162 RouterBench and 15,316 RouterDC queries recipe 3 gives
min cosine 0.99618 / 0.99311, mean 0.99837 / 0.99800 (``bench/encoder_backends.py --backends
onnx-int8 --routerdc-sample 0 --no-regret``; the same run: single-query p50 4.91 ms at 1 thread,
0.30x torch's 16.23 ms, and 3.9x torch's texts/s at batch 64; with part 4 as well, FGTS.CDB's served
regret on RouterBench, 5 seeds x 2,000 rounds, equals torch's on every seed).
``bench/encoder_backends.py --int8-recipes --routerdc-sample 500 --baseline <recipe 2 export>
--baseline <format 2 float32 export>``, single-query p50s interleaved at 1 thread, two runs: recipe
3 0.25 / 0.26x torch and 0.55 / 0.53x recipe 2 as it was served (0.46 / 0.48x torch), at min cosine
0.99618 / 0.99375 (500 RouterDC texts; recipe 2 0.99723 / 0.99651); row-scaling only the second
feed-forward input 0.99097 / 0.99017 at 0.24 / 0.25x torch; recipe 1 0.98067 / 0.97137 at 0.23 /
0.24x; recipe 2's ``MatMulNBits`` on the fused graph 0.38 / 0.39x. Most of recipe 3's remaining mean
error is ``QAttention``'s (attention in float32: mean cosine 0.9993 / 0.9991 instead of 0.9984 /
0.9981 on samples of 1,500 texts, at 1.4x the time). Activation scales are computed per call over
the whole input tensor (the row-scaled inputs' too: their rows share one scale), so an int8 vector
would depend on the texts it was batched with; an encoder's vectors must depend only on the text
(the embedding cache keys on identity + text), hence ``onnx-int8`` runs one text per call. Every
int8 export is checked against the float32 export on a few texts before it is published (cosine >=
:data:`INT8_CHECK_MIN_COSINE`) and must contain exactly the quantized and row-scaled nodes the
recipe names.

Graph optimisations: the float32 export is passed once through onnxruntime's transformer optimizer
(``onnxruntime.transformers.optimizer.optimize_model``, ``model_type="bert"`` with the model's head
count and hidden size, only its portable ONNX-level fusions, ``opt_level=0``), which fuses each
feed-forward bias and erf-GELU into ``BiasGelu``; the session-level optimiser leaves the exporter's
erf-GELU unfused (measured with format 2: 0.63 / 0.64x torch's p50 with the fusion, 0.66 / 0.68x
without, in two runs). The optimizer's attention fusion finds 0 attention blocks here: transformers
5 builds the attention mask with its own functions (``And``, ``Where``, ``IsNaN`` nodes), not the
pattern the fusion looks for, and neither the dynamo export nor the TorchScript exporter's
(``dynamo=False``, with eager or sdpa attention) matches it. So :func:`_fuse_attention` rewrites each
layer's attention into one ``com.microsoft`` ``Attention`` node itself, found by the layer's
parameter names (export format 3; the graph's 291 nodes become 88); outputs equal to float rounding
(the export check applies). That fused node is what makes the int8 graph fast: ``QAttention`` in
one node instead of three quantized projections and some 40 reshapes, transposes and mask
operations per layer.

Every session is created with ``ORT_ENABLE_ALL`` (constant folding, ``MatMul`` and quantization
fusions) when it loads, except, on the CPU, the ``SkipLayerNormalization`` fusion
(:data:`DISABLED_OPTIMIZERS`): onnxruntime 1.30's CPU kernel for it was slower than the ``Add`` and
``LayerNormalization`` it replaces (profiler, recipe 3, 150 RouterBench queries at 1 thread: its 12
nodes 1.42 of 5.17 ms kernel time; without the fusion 3.86 ms in all, 12 ``Add`` 0.12 ms and 13
``LayerNormalization`` 0.20 ms). In the two ``--int8-recipes`` runs above recipe 3 with that fusion
on took 5.61 / 5.94 ms p50 against 4.69 / 4.79 ms; the float32 export (fused attention, fusion off)
0.89 / 0.91x format 2's float32 as served (0.60 / 0.61x vs 0.67x torch). The fully optimised graph
is not saved, because it is specific to the CPU it was made on and a cache directory may be shared.
``session.intra_op.allow_spinning`` is left at its default: at 1 thread it changes nothing (15.7 vs
16.3 ms p50, noise), with more threads spinning is what keeps a single query's latency low.

Threads: the session's intra-op thread count is the one the torch path would use in the same process:
``torch.get_num_threads()`` when torch is already imported (so ``torch.set_num_threads(n)`` and Ray's
per-replica setting both apply), else ``$OMP_NUM_THREADS`` (what torch reads; Ray sets it to a
replica's CPU share), else ``os.cpu_count()`` (torch's default on these machines). One inter-op thread.

Export cache: ``<root>/<name>-<fingerprint>-<backend>-<key hash>/`` with ``model.onnx``,
``tokenizer.json`` and ``export.json``; ``<root>`` is ``$RAY_ROUTER_CACHE_DIR/onnx``, else
``~/.cache/ray-router/onnx``. The key hash covers the source model's fingerprint (the encoder
identity's), the backend, the onnx, onnxruntime and torch versions and :data:`EXPORT_FORMAT`. An export
is written into a temporary directory next to its final place and renamed into place, under a file
lock per key, so a second process waits for the first one's export and then reuses it, and a killed
export leaves only a temporary directory behind (never a half-written export under the final name).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ray_router.embeddings.base import l2_normalise
from ray_router.embeddings.options import ENCODER_BACKENDS
from ray_router.errors import ConfigError, DataError

EXPORT_FORMAT = 3  # 2: the float32 graph passes the transformer optimizer (BiasGelu); 3: fused Attention
EXPORT_FILE = "export.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
EXPORT_CHECK_MIN_COSINE = 0.9999  # an fp32 export that differs more from torch is broken, not rounded
INT8_CHECK_MIN_COSINE = 0.99  # the bar for onnx-int8, checked on _CHECK_TEXTS against fp32
INT8_RECIPE_VERSION = 3  # in the encoder identity (the embedding cache's key); bump with INT8_RECIPE
INT8_RECIPE = "QAttention and MatMul dynamic per-channel QInt8; feed-forward inputs row-scaled"
# texts per onnxruntime call at most: the attention materialises (batch, heads, seq, seq)
# scores (200 MB per layer at 64 x 12 x 256 x 256), so big batches of long texts run out of cache.
# 128 RouterBench queries at 1 thread, busy machine: 28.9 texts/s at batch 64, 49.1 at 16, 55.4 at 4
# (torch: 33.0, 48.6, 51.4)
MAX_ONNX_BATCH = 16
# onnxruntime graph optimisers a CPU-only session skips (module docstring: the SkipLayerNormalization
# kernel was slower than the Add + LayerNormalization it replaces; unmeasured on CUDA, which keeps them)
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
OPSET = 18
_CHECK_TEXTS = (
    "Is 91 prime?",
    "Write a Python function that returns the sum of the squares of a list of integers.",
    "word " * 400,  # longer than any max_seq_length: exercises truncation
)
N_EXPORTS = {"onnx": 0, "onnx-int8": 0}  # exports this process actually ran (tests check reuse)


def default_export_root() -> Path:
    """``$RAY_ROUTER_CACHE_DIR/onnx``, else ``~/.cache/ray-router/onnx``."""
    base = os.environ.get("RAY_ROUTER_CACHE_DIR") or "~/.cache/ray-router"
    return Path(base).expanduser() / "onnx"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"the onnx encoder backends need the package {dist!r} (`pip install -e .` installs it)"
        ) from None


def export_key(fingerprint: str, backend: str) -> dict[str, Any]:
    """What an export depends on; its hash names the export's directory."""
    if backend not in ("onnx", "onnx-int8"):
        raise ConfigError(f"backend: {backend!r} has no export (use one of {list(ENCODER_BACKENDS)})")
    key = {
        "format": EXPORT_FORMAT,
        "source_fingerprint": fingerprint,
        "backend": backend,
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime"),
        "torch": _version("torch"),
    }
    if backend == "onnx-int8":  # a new recipe never reuses an export made with an older one
        key["recipe"] = INT8_RECIPE
    return key


def export_directory(root: Path, name: str, fingerprint: str, backend: str) -> Path:
    key = export_key(fingerprint, backend)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{name}-{fingerprint}")[:80]
    return root / f"{slug}-{backend}-{digest}"


def ensure_export(model_path: Path, name: str, fingerprint: str, backend: str, root: Path | None = None) -> Path:
    """The export directory of ``backend`` for the model at ``model_path`` (fingerprint
    ``fingerprint``): reused when it is on disk, else exported (``onnx-int8`` quantizes the ``onnx``
    export, exporting that first when needed)."""
    root = Path(root).expanduser() if root is not None else default_export_root()
    final = export_directory(root, name, fingerprint, backend)
    if (final / EXPORT_FILE).is_file():
        return final
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{final.name}.lock")):
        if (final / EXPORT_FILE).is_file():  # another process finished it while we waited
            return final
        source = None if backend == "onnx" else ensure_export(model_path, name, fingerprint, "onnx", root)
        tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            t0 = time.perf_counter()
            if backend == "onnx":
                meta = _export_fp32(model_path, tmp)
            else:
                meta = _quantize_int8(source, tmp)  # type: ignore[arg-type]
            meta.update(
                key=export_key(fingerprint, backend),
                name=name,
                source_path=str(model_path),
                seconds=round(time.perf_counter() - t0, 2),
            )
            (tmp / EXPORT_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")
            for path in tmp.iterdir():  # on disk before the rename publishes them
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            if final.exists():  # a leftover without export.json (an older crash); never trusted
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        N_EXPORTS[backend] += 1
    return final


def _export_fp32(model_path: Path, out: Path) -> dict[str, Any]:
    """torch.onnx.export of the whole sentence-transformers stack, checked against torch."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = SentenceTransformer(str(model_path), device="cpu").eval()
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    first = model[0]
    hf_tokenizer: Any = getattr(first, "tokenizer", None)
    backend_tokenizer = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend_tokenizer is None:
        raise ConfigError(f"{model_path}: the onnx backends need a fast (tokenizers) tokenizer")
    max_len = int(model.max_seq_length or 0)
    if max_len < 1:
        raise ConfigError(f"{model_path}: the model declares no max_seq_length")
    features = (getattr(model, "preprocess", None) or model.tokenize)(list(_CHECK_TEXTS[:2]))
    inputs = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in features]

    class _Stack(torch.nn.Module):
        def __init__(self, st: Any) -> None:
            super().__init__()
            self.st = st

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return self.st(dict(zip(inputs, tensors)))["sentence_embedding"]

    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("seq", max=max(max_len, 8))
    args = tuple(features[k] for k in inputs)
    dims = ({0: batch, 1: seq},) * len(inputs)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed" and similar notes
    with (
        torch.no_grad(),
        contextlib.redirect_stdout(sys.stderr),  # the exporter prints progress lines
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Stack(model).eval(),
            args,
            str(out / MODEL_FILE),
            input_names=inputs,
            output_names=["sentence_embedding"],
            dynamic_shapes=(dims,),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    quiet.setLevel(level)
    config = getattr(getattr(first, "auto_model", None), "config", None)
    fusions = _fuse_fp32(
        out / MODEL_FILE, int(getattr(config, "num_attention_heads", 0)), int(getattr(config, "hidden_size", 0))
    )
    tok = backend_tokenizer.__class__.from_str(backend_tokenizer.to_str())
    tok.no_padding()
    tok.no_truncation()
    tok.save(str(out / TOKENIZER_FILE))
    meta = {
        "inputs": inputs,
        "max_seq_length": max_len,
        "do_lower_case": bool(getattr(first, "do_lower_case", False)),
        "pad_id": int(hf_tokenizer.pad_token_id or 0),
        "pad_token": str(hf_tokenizer.pad_token or "[PAD]"),
        "dim": int((getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension)() or 0),
        "backend": "onnx",
        "optimizer_ops": fusions,
    }
    with torch.no_grad():
        ref = model.encode(list(_CHECK_TEXTS), normalize_embeddings=True, convert_to_numpy=True)
    got = OnnxModel(out, meta=meta, threads=1).encode(list(_CHECK_TEXTS))
    cosine = float((l2_normalise(ref) * got).sum(axis=1).min())
    if not cosine >= EXPORT_CHECK_MIN_COSINE:
        raise DataError(f"{model_path}: the ONNX export differs from the torch model (min cosine {cosine:.6f})")
    meta["check_min_cosine"] = cosine
    return meta


def _fuse_fp32(path: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """onnxruntime's transformer optimizer over the exported graph, then each layer's attention as
    one ``Attention`` node (:func:`_fuse_attention`), in place (module docstring); returns the fused
    operators it counted."""
    from onnxruntime.transformers.optimizer import optimize_model

    loggers = [logging.getLogger(n) for n in ("onnxruntime.transformers", "onnx_model", "fusion_base", "")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)  # "symbolic shape inference disabled or failed" and similar notes
    try:
        with contextlib.redirect_stdout(sys.stderr):
            model = optimize_model(
                str(path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=0, use_gpu=False
            )
        stats = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
        stats["Attention"] = _fuse_attention(model, num_heads)
        model.save_model_to_file(str(path), use_external_data_format=False)
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
    return stats


_ATTENTION_BIAS = re.compile(r"layer\.(\d+)\.attention\.(self\.query|self\.key|self\.value|output\.dense)\.bias$")


def _fuse_attention(model: Any, num_heads: int) -> int:
    """Each BERT layer's self-attention as one ``com.microsoft`` ``Attention`` node, in place on
    ``model`` (onnxruntime's ``OnnxModel`` wrapper); returns the number of layers fused.

    The optimizer's own attention fusion does not match this export (module docstring), so the
    layers are found by their parameters instead: the query, key and value projections are the
    ``MatMul`` + bias ``Add`` pairs whose biases are ``layer.<i>.attention.self.{query,key,value}.bias``
    (all three read the same input), and the attention's result is the input of the output
    projection (the ``MatMul`` before ``layer.<i>.attention.output.dense.bias``). ``Attention``
    takes that input, the three weights side by side and the three biases, and the tokenizer's
    attention mask (as int32: a raw 0/1 mask per text, so padding works as before); the output
    projection then reads its output, and the old subgraph (projections, reshapes, the exported
    mask arithmetic, softmax) is pruned. Scale 1/sqrt(head size), BERT's. The export check (cosine to
    torch) guards the rewrite."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.model.graph
    weights = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    adds: dict[tuple[int, str], Any] = {}
    for node in graph.node:
        for name in node.input if node.op_type == "Add" else ():
            m = _ATTENTION_BIAS.search(name)
            if m:
                adds[(int(m.group(1)), m.group(2))] = node

    def linear(add: Any) -> tuple[Any, str]:  # (the MatMul before a bias Add, the bias's name)
        bias = next(i for i in add.input if i in weights)
        matmul = producer.get(next(i for i in add.input if i not in weights))
        if matmul is None or matmul.op_type != "MatMul" or matmul.input[1] not in weights:
            raise DataError(f"attention fusion: {bias} does not follow a MatMul with a constant weight")
        return matmul, bias

    layers = sorted({layer for layer, _ in adds})
    mask = "attention_mask_int32"
    if layers:
        graph.node.append(
            helper.make_node("Cast", ["attention_mask"], [mask], name="Cast_attention_mask", to=TensorProto.INT32)
        )
    for layer in layers:
        qkv = [linear(adds[(layer, p)]) for p in ("self.query", "self.key", "self.value")]
        out_proj, _ = linear(adds[(layer, "output.dense")])
        if len({m.input[0] for m, _ in qkv}) != 1:
            raise DataError(f"attention fusion: layer {layer}'s query, key and value read different inputs")
        w = np.concatenate([numpy_helper.to_array(weights[m.input[1]]) for m, _ in qkv], axis=1)
        b = np.concatenate([numpy_helper.to_array(weights[bias]) for _, bias in qkv])
        name = f"Attention_{layer}"
        graph.initializer.extend(
            [numpy_helper.from_array(w, f"{name}.qkv_weight"), numpy_helper.from_array(b, f"{name}.qkv_bias")]
        )
        graph.node.append(
            helper.make_node(
                "Attention",
                [qkv[0][0].input[0], f"{name}.qkv_weight", f"{name}.qkv_bias", mask],
                [f"{name}_output"],
                name=name,
                domain="com.microsoft",
                num_heads=num_heads,
            )
        )
        out_proj.input[0] = f"{name}_output"
    if layers:
        if not any(o.domain == "com.microsoft" for o in model.model.opset_import):
            model.model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        model.prune_graph(allow_remove_graph_inputs=False)
        model.topological_sort()
    return len(layers)


def int8_plan(model: Any) -> tuple[list[str], list[str]]:
    """The nodes of a float32 graph that :data:`INT8_RECIPE` quantizes: (attention: the ``Attention``
    nodes and the ``MatMul`` nodes with a square 2-D weight, i.e. the output projections, or all
    four projections where attention is not fused; feed-forward: the ``MatMul`` nodes with another
    2-D weight)."""
    weights = {i.name: tuple(i.dims) for i in model.graph.initializer}
    attention: list[str] = []
    ffn: list[str] = []
    for node in model.graph.node:
        if node.op_type == "Attention":
            attention.append(node.name)
        shape = weights.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if shape is not None and len(shape) == 2:
            (attention if shape[0] == shape[1] else ffn).append(node.name)
    return attention, ffn


ROW_SCALE = "RowScale"  # name prefix of the nodes _row_scale adds (the int8 checks count them)


def _row_scale(model: Any, names: Sequence[str]) -> Any:
    """``model`` with each ``MatMul`` in ``names`` computing ``MatMul(x / r, W) * r``, ``r`` the
    largest magnitude of each row of ``x`` (one token's activations; at least 1e-6).

    Exact in float32; the point is what dynamic quantization makes of it: onnxruntime quantizes a
    ``MatMul``'s activations with one scale per tensor (per call), and rows scaled to the same
    largest magnitude turn that into one scale per row, so a token with large activations no
    longer costs the others their precision (module docstring). Five cheap element-wise nodes per
    ``MatMul`` (``Abs``, ``ReduceMax``, ``Max``, ``Div``, ``Mul``)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    nodes = list(graph.node)
    graph.ClearField("node")
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{ROW_SCALE}.axes"),
            numpy_helper.from_array(np.array(1e-6, dtype=np.float32), f"{ROW_SCALE}.floor"),
        ]
    )
    wanted = set(names)
    for node in nodes:
        if node.name not in wanted:
            graph.node.append(node)
            continue
        x, y, p = node.input[0], node.output[0], f"{ROW_SCALE}_{node.name}"
        graph.node.extend(
            [
                helper.make_node("Abs", [x], [f"{p}.abs"], name=f"{p}_Abs"),
                helper.make_node(
                    "ReduceMax", [f"{p}.abs", f"{ROW_SCALE}.axes"], [f"{p}.max"], name=f"{p}_ReduceMax", keepdims=1
                ),
                helper.make_node("Max", [f"{p}.max", f"{ROW_SCALE}.floor"], [f"{p}.r"], name=f"{p}_Max"),
                helper.make_node("Div", [x, f"{p}.r"], [f"{p}.x"], name=f"{p}_Div"),
            ]
        )
        node.input[0], node.output[0] = f"{p}.x", f"{p}.y"
        graph.node.append(node)
        graph.node.append(helper.make_node("Mul", [f"{p}.y", f"{p}.r"], [y], name=f"{p}_Mul"))
    if len(graph.node) != len(nodes) + 5 * len(wanted):
        raise DataError(f"row scaling: {sorted(wanted - {n.name for n in nodes})} are not in the graph")
    return model


def quantize_matmuls(
    model_file: Path, dynamic: list[str], nbits: list[str], block: int, row_scaled: Sequence[str] = ()
) -> Any:
    """The graph of ``model_file`` with the nodes ``dynamic`` quantized dynamically (``MatMul``:
    int8 weights per channel, activations per tensor at run time; ``Attention``: the same as
    ``QAttention``), those of them in ``row_scaled`` first row-scaled (:func:`_row_scale`: the
    activations' scale becomes one per row), and the ``MatMul`` nodes ``nbits`` as 8-bit
    symmetric ``MatMulNBits`` (blocks of ``block``, accuracy level 4: int8 arithmetic,
    activations quantized per block of a row). :data:`INT8_RECIPE` is ``dynamic`` = all,
    ``row_scaled`` = the feed-forward ones; ``bench/encoder_backends.py --int8-recipes`` compares
    the others."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quant_logger = logging.getLogger()
    level = quant_logger.level
    quant_logger.setLevel(logging.ERROR)  # it logs a "consider pre-processing" warning on every call
    try:
        with tempfile.TemporaryDirectory(prefix="rr-int8-") as tmp:
            source, step = Path(tmp) / "row-scaled.onnx", Path(tmp) / "dynamic.onnx"
            if row_scaled:
                onnx.save(_row_scale(onnx.load(str(model_file)), row_scaled), str(source))
            else:
                source = Path(model_file)
            if dynamic:
                quantize_dynamic(
                    str(source),
                    str(step),
                    nodes_to_quantize=dynamic,
                    op_types_to_quantize=["MatMul", "Attention"],
                    per_channel=True,
                    weight_type=QuantType.QInt8,
                    # a tensor whose type shape inference cannot tell (after a com.microsoft node) is float
                    extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                )
            graph = onnx.load(str(step if dynamic else source))
            if nbits:
                q = MatMulNBitsQuantizer(
                    graph,
                    bits=8,
                    block_size=block,
                    is_symmetric=True,
                    accuracy_level=4,
                    nodes_to_include=nbits,
                    op_types_to_quantize=("MatMul",),
                )
                q.process()
                graph = q.model.model
    finally:
        quant_logger.setLevel(level)
    return graph


def _quantize_int8(source: Path, out: Path) -> dict[str, Any]:
    """The int8 export of the float32 one (:data:`INT8_RECIPE`; the module docstring says why)."""
    import onnx

    fp32 = onnx.load(str(source / MODEL_FILE))
    attention, ffn = int8_plan(fp32)
    fused = sum(n.op_type == "Attention" for n in fp32.graph.node)
    if not attention or not ffn:
        raise DataError(f"{source}: no attention ({len(attention)}) or feed-forward ({len(ffn)}) node to quantize")
    graph = quantize_matmuls(source / MODEL_FILE, attention + ffn, [], 0, row_scaled=ffn)
    ops = [n.op_type for n in graph.graph.node]
    scaled = sum(n.op_type == "ReduceMax" and n.name.startswith(ROW_SCALE) for n in graph.graph.node)
    got = (ops.count("QAttention"), ops.count("MatMulInteger"), scaled)
    want = (fused, len(attention) - fused + len(ffn), len(ffn))
    if got != want or "Attention" in ops:
        raise DataError(
            f"{source}: the int8 graph has {got[0]} QAttention, {got[1]} MatMulInteger and {got[2]} row-scaled inputs, "
            f"the recipe asks for {want[0]}, {want[1]} and {want[2]}"
        )
    onnx.save(graph, str(out / MODEL_FILE))
    shutil.copy2(source / TOKENIZER_FILE, out / TOKENIZER_FILE)
    meta = json.loads((source / EXPORT_FILE).read_text(encoding="utf-8"))
    keep = ("inputs", "max_seq_length", "do_lower_case", "pad_id", "pad_token", "dim")
    meta = {**{k: meta[k] for k in keep}, "backend": "onnx-int8", "quantization": INT8_RECIPE}
    meta["quantized_nodes"] = {"attention": len(attention), "feed_forward_row_scaled": len(ffn)}
    ref = OnnxModel(source, threads=1).encode(list(_CHECK_TEXTS))
    got_vectors = OnnxModel(out, meta=meta, threads=1).encode(list(_CHECK_TEXTS))
    cosine = float((ref * got_vectors).sum(axis=1).min())
    if not cosine >= INT8_CHECK_MIN_COSINE:
        raise DataError(f"{source}: the int8 export differs from the float32 one (min cosine {cosine:.6f})")
    meta["check_min_cosine"] = cosine
    return meta


def torch_equivalent_threads() -> int:
    """The intra-op thread count the torch path would use in this process (module docstring)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return int(torch.get_num_threads())
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.strip().isdigit() and int(env) > 0:
        return int(env)
    return os.cpu_count() or 1


def _providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device in ("auto", "cpu"):
        return (["CUDAExecutionProvider"] if device == "auto" and "CUDAExecutionProvider" in available else []) + [
            "CPUExecutionProvider"
        ]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise ConfigError(
                f"device {device!r} with an onnx backend needs onnxruntime's CUDA provider "
                f"(this onnxruntime has {available}); use device='auto' or 'cpu'"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ConfigError(f"device {device!r}: the onnx backends run on auto, cpu or cuda")


class OnnxModel:
    """An exported model folder run with onnxruntime: texts -> L2-normalised float32 rows."""

    def __init__(
        self,
        directory: Path,
        meta: dict[str, Any] | None = None,
        threads: int | None = None,
        device: str = "cpu",
        max_seq_length: int | None = None,
        disabled_optimizers: Sequence[str] | None = None,
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.directory = Path(directory)
        self.meta = meta if meta is not None else json.loads((self.directory / EXPORT_FILE).read_text("utf-8"))
        self.inputs: list[str] = list(self.meta["inputs"])
        self.one_text_per_call = self.meta["backend"] == "onnx-int8"  # batch-invariant vectors
        self.threads = int(threads) if threads is not None else torch_equivalent_threads()
        limit = int(max_seq_length) if max_seq_length is not None else int(self.meta["max_seq_length"])
        self.tokenizer = Tokenizer.from_file(str(self.directory / TOKENIZER_FILE))
        self.tokenizer.enable_truncation(max_length=limit)
        self.tokenizer.enable_padding(pad_id=int(self.meta["pad_id"]), pad_token=str(self.meta["pad_token"]))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        providers = _providers(device)
        if disabled_optimizers is None:  # measured on the CPU only; CUDA keeps onnxruntime's defaults
            disabled_optimizers = DISABLED_OPTIMIZERS if providers == ["CPUExecutionProvider"] else ()
        self.session = ort.InferenceSession(
            str(self.directory / MODEL_FILE),
            options,
            providers=providers,
            disabled_optimizers=list(disabled_optimizers),
        )
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    def _run(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        tensors = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
        (out,) = self.session.run(["sentence_embedding"], {k: tensors[k] for k in self.inputs})
        return np.asarray(out, dtype=np.float32)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        texts = [str(t).lower() if self.meta.get("do_lower_case") else str(t) for t in texts]
        if not texts:
            return np.zeros((0, int(self.meta["dim"])), dtype=np.float32)
        step = 1 if self.one_text_per_call else max(1, min(int(batch_size), MAX_ONNX_BATCH))
        order = np.argsort([-len(t) for t in texts], kind="stable")  # similar lengths pad less
        out = np.empty((len(texts), int(self.meta["dim"])), dtype=np.float32)
        for start in range(0, len(texts), step):
            rows = order[start : start + step]
            out[rows] = self._run([texts[i] for i in rows])
        return l2_normalise(out)
