"""Load a benchmark by name (``routerbench``, ``routerdc``, ``mixinstruct``) or by file path."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray_router.data.generic import load_generic
from ray_router.data.mixinstruct import load_mixinstruct, split_file
from ray_router.data.routerbench import load_routerbench
from ray_router.data.table import RoutingTable
from ray_router.errors import ConfigError, DataError

DATASET_NAMES = ("routerbench", "routerdc", "mixinstruct")
DATA_DIR_ENV = "RAY_ROUTER_DATA_DIR"

# RouterBench files in order of preference: variant -> file name.
ROUTERBENCH_FILES = {
    "0shot": "routerbench_0shot.pkl",
    "5shot": "routerbench_5shot.pkl",
    "5shot_arc_mbpp_winogrande": "routerbench_5shot_arc_mbpp_winogrande.parquet",
}
ROUTERDC_FILE = "routerdc_7model_in_distribution.parquet"
ROUTERDC_COLUMNS = {"text_col": "question", "category_col": "task", "id_col": "row_id"}
GENERIC_SUFFIXES = (".parquet", ".csv")  # files that load_generic reads


def uses_generic_loader(name_or_path: str | Path) -> bool:
    """Whether :func:`load_dataset` reads this dataset with :func:`load_generic`, so that the column
    options ``text_col``, ``category_col`` and ``id_col`` apply (``routerdc`` and ``.parquet``/``.csv``)."""
    if isinstance(name_or_path, str) and name_or_path in DATASET_NAMES:
        return name_or_path == "routerdc"
    return Path(name_or_path).suffix.lower() in GENERIC_SUFFIXES


def resolve_data_dir(arg: str | Path | None = None) -> Path:
    """The data directory: ``arg``, else ``$RAY_ROUTER_DATA_DIR``, else ``./data``."""
    chosen = arg if arg not in (None, "") else os.environ.get(DATA_DIR_ENV) or "data"
    return Path(chosen).expanduser()


def _missing(name: str, data_dir: Path, looked_for: list[str], downloadable: bool = True) -> DataError:
    how = (
        f"run `ray-router data download {name}` (needs internet) or copy the files there by hand"
        if downloadable
        else f"{name} is not on the Hugging Face Hub, so `ray-router data download {name}` cannot fetch it; "
        "copy the file there by hand"
    )
    return DataError(
        f"{name}: none of {looked_for} found in {data_dir}; {how}. "
        f"The data directory is --data-dir, else ${DATA_DIR_ENV}, else ./data."
    )


def _check_options(loader: Callable[..., RoutingTable], options: dict[str, Any], extra: tuple[str, ...] = ()) -> None:
    """An unknown option is a ConfigError that lists the valid ones."""
    params = inspect.signature(loader).parameters
    valid = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = [k for k in options if k not in valid and k not in extra]
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for {loader.__name__}; valid: {sorted({*valid, *extra})}")


def _call(loader: Callable[..., RoutingTable], *args: Any, **options: Any) -> RoutingTable:
    _check_options(loader, options)
    return loader(*args, **options)


def _load_routerbench(data_dir: Path, variant: str | None = None, **options: Any) -> RoutingTable:
    _check_options(load_routerbench, options)
    if variant is not None:
        if variant not in ROUTERBENCH_FILES:
            raise ConfigError(f"unknown routerbench variant {variant!r}; choose one of {list(ROUTERBENCH_FILES)}")
        candidates = {variant: ROUTERBENCH_FILES[variant]}
    else:
        candidates = ROUTERBENCH_FILES
    for var, filename in candidates.items():
        if (data_dir / filename).is_file():
            return _call(load_routerbench, data_dir / filename, variant=var, **options)
    raise _missing("routerbench", data_dir, list(candidates.values()))


def _load_mixinstruct(data_dir: Path, split: str = "test", **options: Any) -> RoutingTable:
    _check_options(load_mixinstruct, options)
    filename = split_file(split)
    looked_for = [filename, filename.removesuffix("l")]  # .jsonl, or a .json array
    for candidate in looked_for:
        if (data_dir / candidate).is_file():
            return _call(load_mixinstruct, data_dir / candidate, split=split, **options)
    raise _missing("mixinstruct", data_dir, looked_for)


def _load_path(path: Path, **options: Any) -> RoutingTable:
    suffix = path.suffix.lower()
    if suffix in (".pkl", ".pickle"):
        return _call(load_routerbench, path, **options)
    if suffix in (".jsonl", ".json"):
        return _call(load_mixinstruct, path, **options)
    if suffix in GENERIC_SUFFIXES:
        return _call(load_generic, path, **options)
    raise ConfigError(f"{path}: unsupported file type {suffix!r} (use .parquet, .csv, .pkl or .jsonl)")


def load_dataset(name_or_path: str | Path, data_dir: str | Path | None = None, **options: Any) -> RoutingTable:
    """Load a named benchmark from the data directory, or a file.

    - ``routerbench``: ``routerbench_0shot.pkl``, else ``routerbench_5shot.pkl``, else the Parquet
      subset (``variant=`` picks one; ``table.meta["variant"]`` says which was read);
    - ``routerdc``: ``routerdc_7model_in_distribution.parquet`` via :func:`load_generic`;
    - ``mixinstruct``: ``<split>_data_prepared.jsonl``, ``split="test"`` by default;
    - a path: ``.pkl`` -> :func:`load_routerbench`, ``.jsonl``/``.json`` -> :func:`load_mixinstruct`,
      ``.parquet``/``.csv`` -> :func:`load_generic` (a relative path is also tried under the data dir).

    Other keyword options go to the loader (e.g. ``nan``, ``prices``, ``arms``, ``metric``)."""
    directory = resolve_data_dir(data_dir)
    if isinstance(name_or_path, str) and name_or_path in DATASET_NAMES:
        if name_or_path == "routerbench":
            return _load_routerbench(directory, **options)
        if name_or_path == "mixinstruct":
            return _load_mixinstruct(directory, **options)
        _check_options(load_generic, options)
        if not (directory / ROUTERDC_FILE).is_file():
            raise _missing("routerdc", directory, [ROUTERDC_FILE], downloadable=False)
        return _call(load_generic, directory / ROUTERDC_FILE, **{**ROUTERDC_COLUMNS, "name": "routerdc", **options})
    path = Path(name_or_path).expanduser()
    if not path.suffix:
        raise ConfigError(f"unknown dataset {str(name_or_path)!r}; use one of {list(DATASET_NAMES)} or a file path")
    if not path.is_file() and not path.is_absolute() and (directory / path).is_file():
        path = directory / path
    if not path.is_file():
        raise DataError(f"{path}: no such file (also looked in {directory})")
    return _load_path(path, **options)
