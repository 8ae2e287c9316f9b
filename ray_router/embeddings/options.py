"""Typed options of the encoders and the numeric field types the embedding configs share.

The fields are strict (``ray_router.config``): ``"3"`` and ``True`` are not integers, ``2.0`` is not
an integer, NaN and inf are not numbers; numpy scalars (a sweep grid, an array element) count as
the Python number they hold. The encoders build their options with ``ray_router.config.parse``, so
a bad value is a :class:`~ray_router.errors.ConfigError` that names the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

import numpy as np
from pydantic import BeforeValidator, Field

from ray_router.config import StrictModel, config_dataclass


def _python_scalar(value: Any) -> Any:
    """A numpy scalar as the Python value it holds (``np.int64(5)`` -> ``5``); anything else as is."""
    return value.item() if isinstance(value, np.generic) else value


Int = Annotated[int, BeforeValidator(_python_scalar)]
Real = Annotated[float, BeforeValidator(_python_scalar), Field(allow_inf_nan=False)]
PositiveInt = Annotated[Int, Field(ge=1)]
PositiveReal = Annotated[Real, Field(gt=0)]

# how a sentence-transformers encoder runs (ray_router.embeddings.onnx_backend)
EncoderBackend = Literal["torch", "onnx", "onnx-int8"]
ENCODER_BACKENDS: tuple[str, ...] = get_args(EncoderBackend)


@config_dataclass
class SentenceTransformerOptions:
    """``max_seq_length``: token limit (None = the model's own); ``batch_size``: texts per forward pass;
    ``backend``: ``torch`` (the model as sentence-transformers runs it), ``onnx`` (exported, run with
    onnxruntime) or ``onnx-int8`` (that export with int8 weights); see
    :mod:`ray_router.embeddings.onnx_backend`."""

    max_seq_length: PositiveInt | None = None
    batch_size: PositiveInt = 64
    backend: EncoderBackend = "torch"


@config_dataclass
class HashEncoderOptions:
    """``dim``: vector length; ``seed``: which pseudo-random vectors."""

    dim: PositiveInt = 32
    seed: Int = 0


@config_dataclass
class CategoryLookupOptions:
    """:meth:`~ray_router.embeddings.lookup.LookupEncoder.from_categories`: vector length, the weight
    of each text's own jitter around its category direction, and the seed."""

    dim: PositiveInt = 16
    noise: Annotated[Real, Field(ge=0)] = 0.3
    seed: Int = 0


class OpenAIEncoderOptions(StrictModel):
    """Options of an encoder served by an OpenAI-compatible ``POST {base_url}/embeddings``
    (:mod:`ray_router.embeddings.openai_encoder`).

    ``api_key_env``: the environment variable holding the API key, sent as ``Authorization: Bearer``
    (None: ``RAY_ROUTER_EMBEDDINGS_API_KEY``, and no header when that is unset; a variable named here
    must be set); ``dim``: the vector length the server must return (None: learnt from the first
    response); ``dimensions``: sent to the server (OpenAI's text-embedding-3 models shorten their
    vectors to it) and part of the identity; ``max_batch_size``: texts per request; ``timeout_s``:
    per request; ``max_retries``: retries after the first attempt (429, 5xx, timeouts, connection
    errors); ``backoff_s``: the first retry's base wait, doubled each retry; ``max_backoff_s``: the
    cap of one wait, a server's ``Retry-After`` included."""

    api_key_env: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    dim: PositiveInt | None = None
    dimensions: PositiveInt | None = None
    max_batch_size: PositiveInt = 128
    timeout_s: PositiveReal = 30.0
    max_retries: Annotated[Int, Field(ge=0, le=20)] = 5
    backoff_s: Annotated[Real, Field(ge=0)] = 0.5
    max_backoff_s: Annotated[Real, Field(ge=0)] = 30.0
