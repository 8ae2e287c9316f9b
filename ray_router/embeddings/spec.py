"""Which encoder to use: one spec shared by the Serve app's arguments and the sweep files."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ray_router.embeddings.openai_encoder import is_openai_name, openai_options
from ray_router.embeddings.options import OpenAIEncoderOptions


class EncoderSpec(BaseModel):
    """The base encoder: ``minilm`` (the packaged all-MiniLM-L6-v2), ``hash`` (a stand-in with no
    model), or a sentence-transformers model folder; ``device``: ``auto`` uses CUDA when the process
    sees a GPU, else the CPU; ``backend``: ``torch`` (sentence-transformers as is), ``onnx`` (the model
    exported to ONNX, run by onnxruntime with graph optimisations) or ``onnx-int8`` (that graph with
    int8 weights and arithmetic: dynamic quantization, feed-forward inputs row-scaled); see
    :mod:`ray_router.embeddings.onnx_backend`.

    ``name: openai:MODEL@URL`` is a remote OpenAI-compatible embeddings server
    (:mod:`ray_router.embeddings.openai_encoder`): no local model, so ``device``, ``backend`` and
    ``max_seq_length`` do not apply; its options (API key variable, batch size, timeouts, retries)
    go in the ``openai`` block or after ``#`` in the name (the block's fields win).

    ``get_encoder(spec.name, cache_dir=..., device=spec.device, **spec.encoder_options())`` builds it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        "minilm",
        min_length=1,
        description="minilm (packaged all-MiniLM-L6-v2), hash (stand-in), a model folder, or openai:MODEL@URL (remote)",
    )
    device: str = Field("auto", description="auto: CUDA when the process sees a GPU, else CPU")
    max_seq_length: int | None = Field(None, ge=1)
    backend: Literal["torch", "onnx", "onnx-int8"] = Field(
        "torch",
        description="torch, onnx (onnxruntime, graph-optimised) or onnx-int8 (int8 weights, min cosine to torch >= 0.99)",
    )

    openai: OpenAIEncoderOptions | None = Field(
        None,
        description="options of an openai:MODEL@URL encoder: api_key_env (default RAY_ROUTER_EMBEDDINGS_API_KEY), "
        "dim, dimensions, max_batch_size, timeout_s, max_retries, backoff_s, max_backoff_s",
    )

    @property
    def remote(self) -> bool:
        """Whether the encoder is a remote OpenAI-compatible server (nothing to load or fine-tune here)."""
        return is_openai_name(self.name)

    @model_validator(mode="after")
    def _backend_needs_a_model(self) -> EncoderSpec:
        if self.backend != "torch" and self.name in ("hash", "lookup"):
            raise ValueError(f"backend {self.backend!r} needs a sentence-transformers model, not {self.name!r}")
        if self.remote:
            if self.backend != "torch" or self.max_seq_length is not None:
                raise ValueError(
                    "backend and max_seq_length are options of a local model; an openai:MODEL@URL encoder is remote"
                )
            openai_options(self.name, **self._openai_fields())  # the name's syntax and options, checked now
        elif self.openai is not None:
            raise ValueError(f"the openai block needs name: openai:MODEL@URL, not {self.name!r}")
        return self

    def _openai_fields(self) -> dict[str, Any]:
        """The ``openai`` block's fields that differ from the defaults (so the name's own options stay)."""
        if self.openai is None:
            return {}
        return self.openai.model_dump(exclude_defaults=True)

    def encoder_options(self) -> dict[str, Any]:
        """The keyword arguments of ``get_encoder`` besides name, cache and device."""
        if self.remote:
            return self._openai_fields()
        out: dict[str, Any] = {"backend": self.backend}
        if self.max_seq_length is not None:
            out["max_seq_length"] = self.max_seq_length
        return out
