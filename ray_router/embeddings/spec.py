"""Which encoder to use: one spec shared by the Serve app's arguments and the sweep files."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EncoderSpec(BaseModel):
    """The base encoder: ``minilm`` (the packaged all-MiniLM-L6-v2), ``hash`` (a stand-in with no
    model), or a sentence-transformers model folder; ``device``: ``auto`` uses CUDA when the process
    sees a GPU, else the CPU; ``backend``: ``torch`` (sentence-transformers as is), ``onnx`` (the model
    exported to ONNX, run by onnxruntime with graph optimisations) or ``onnx-int8`` (that graph with
    int8 weights: attention projections dynamic per channel, feed-forward 8-bit MatMulNBits); see
    :mod:`ray_router.embeddings.onnx_backend`.

    ``get_encoder(spec.name, cache_dir=..., device=spec.device, **spec.encoder_options())`` builds it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        "minilm", min_length=1, description="minilm (packaged all-MiniLM-L6-v2), hash (stand-in), or a model folder"
    )
    device: str = Field("auto", description="auto: CUDA when the process sees a GPU, else CPU")
    max_seq_length: int | None = Field(None, ge=1)
    backend: Literal["torch", "onnx", "onnx-int8"] = Field(
        "torch",
        description="torch, onnx (onnxruntime, graph-optimised) or onnx-int8 (int8 weights, min cosine to torch >= 0.99)",
    )

    @model_validator(mode="after")
    def _backend_needs_a_model(self) -> EncoderSpec:
        if self.backend != "torch" and self.name in ("hash", "lookup"):
            raise ValueError(f"backend {self.backend!r} needs a sentence-transformers model, not {self.name!r}")
        return self

    def encoder_options(self) -> dict[str, Any]:
        """The keyword arguments of ``get_encoder`` besides name, cache and device."""
        out: dict[str, Any] = {"backend": self.backend}
        if self.max_seq_length is not None:
            out["max_seq_length"] = self.max_seq_length
        return out
