"""Reading a user's YAML file with a clear error (no traceback) for a missing or malformed file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray_router.errors import ConfigError


def load_yaml_file(path: str | os.PathLike[str], what: str) -> Any:
    """Parse ``path``; ConfigError naming ``what`` and the file when it is missing or not YAML."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``extra``, recursively where both hold a mapping (neither is modified)."""
    import copy

    out = copy.deepcopy(dict(base))
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), (Mapping, type(None))):
            out[k] = deep_merge(out.get(k) or {}, v)
        else:
            out[k] = copy.deepcopy(v)
    return out
