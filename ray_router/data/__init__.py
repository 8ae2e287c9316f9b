"""Benchmark data: the one table type, loaders, splits and downloads (pure numpy/pandas, no Ray).

``download_dataset`` is imported lazily so that importing this package never pulls in
``huggingface_hub``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray_router.data.generic import load_generic
from ray_router.data.mixinstruct import load_mixinstruct
from ray_router.data.registry import DATASET_NAMES, load_dataset, resolve_data_dir
from ray_router.data.routerbench import load_routerbench
from ray_router.data.splits import Split, hold_out_category, k_per_category, stratified_split
from ray_router.data.table import PairwiseJudgments, RoutingTable, make_table

if TYPE_CHECKING:
    from ray_router.data.download import download_dataset

__all__ = [
    "DATASET_NAMES",
    "PairwiseJudgments",
    "RoutingTable",
    "Split",
    "download_dataset",
    "hold_out_category",
    "k_per_category",
    "load_dataset",
    "load_generic",
    "load_mixinstruct",
    "load_routerbench",
    "make_table",
    "resolve_data_dir",
    "stratified_split",
]


def __getattr__(name: str) -> Any:
    if name == "download_dataset":
        from ray_router.data.download import download_dataset

        return download_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
