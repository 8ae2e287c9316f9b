"""Which encoder to use: one spec shared by the Serve app's arguments and the sweep files."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EncoderSpec(BaseModel):
    """The base encoder: ``minilm`` (the packaged all-MiniLM-L6-v2), ``hash`` (a stand-in with no
    model), or a sentence-transformers model folder; ``device``: ``auto`` uses CUDA when the process
    sees a GPU, else the CPU."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        "minilm", min_length=1, description="minilm (packaged all-MiniLM-L6-v2), hash (stand-in), or a model folder"
    )
    device: str = Field("auto", description="auto: CUDA when the process sees a GPU, else CPU")
    max_seq_length: int | None = Field(None, ge=1)
