"""Fetch the benchmark release files from the Hugging Face Hub into a data directory.

Offline machines fail at once: before touching ``huggingface_hub`` (imported lazily here), the
function checks ``HF_HUB_OFFLINE`` and probes ``huggingface.co:443`` with a short timeout, and
raises :class:`~ray_router.errors.OfflineError` with the URLs to fetch by hand.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ray_router.errors import ConfigError, DataError, OfflineError

HF_HOST = "huggingface.co"
HF_PORT = 443


@dataclass(frozen=True)
class HubDataset:
    repo_id: str
    files: dict[str, str]  # split/variant -> file name
    default: tuple[str, ...]


HUB_DATASETS: dict[str, HubDataset] = {
    "routerbench": HubDataset(
        repo_id="withmartian/routerbench",
        files={"0shot": "routerbench_0shot.pkl", "5shot": "routerbench_5shot.pkl"},
        default=("0shot", "5shot"),
    ),
    "mixinstruct": HubDataset(
        repo_id="llm-blender/mix-instruct",
        files={
            "train": "train_data_prepared.jsonl",
            "val": "val_data_prepared.jsonl",
            "test": "test_data_prepared.jsonl",
        },
        default=("test", "val"),
    ),
}


def file_url(repo_id: str, filename: str) -> str:
    return f"https://{HF_HOST}/datasets/{repo_id}/resolve/main/{filename}"


def _manual_hint(entry: HubDataset, files: Sequence[str], dest: Path) -> str:
    urls = "\n".join(f"  {file_url(entry.repo_id, f)}" for f in files)
    return (
        f"To get the files by hand, download on a machine with internet access:\n{urls}\n"
        f"and put them in {dest} (or the directory named by --data-dir / RAY_ROUTER_DATA_DIR)."
    )


def hub_reachable(timeout: float, host: str = HF_HOST, port: int = HF_PORT) -> bool:
    """True if a TCP connection to ``host:port`` (DNS included) opens within ``timeout`` seconds."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # bounds DNS lookups, which ignore timeouts
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def download_dataset(
    name: str, dest_dir: str | Path, timeout: float = 5.0, splits: Sequence[str] | None = None
) -> list[Path]:
    """Download ``name``'s release files into ``dest_dir``; return their local paths.

    ``splits``: for ``routerbench`` ``0shot``/``5shot`` (default both), for ``mixinstruct``
    ``train``/``val``/``test`` (default test and val; the train file is 1.4 GB)."""
    entry = HUB_DATASETS.get(name)
    if entry is None:
        raise ConfigError(f"unknown dataset {name!r} for download; choose one of {sorted(HUB_DATASETS)}")
    chosen = list(entry.default if splits is None else splits)
    chosen = ["val" if s == "validation" else s for s in chosen]
    bad = [s for s in chosen if s not in entry.files]
    if bad or not chosen:
        raise ConfigError(f"unknown {name} splits {bad or chosen}; choose from {list(entry.files)}")
    files = [entry.files[s] for s in chosen]
    dest = Path(dest_dir).expanduser()
    hint = _manual_hint(entry, files, dest)

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise OfflineError(
            f"cannot download {name} from https://{HF_HOST}/datasets/{entry.repo_id}: HF_HUB_OFFLINE is set; "
            f"unset it (e.g. `unset HF_HUB_OFFLINE`) to allow downloads.\n{hint}"
        )
    if not hub_reachable(timeout):
        raise OfflineError(
            f"cannot reach {HF_HOST}:{HF_PORT} within {timeout:g}s to download {name} from "
            f"https://{HF_HOST}/datasets/{entry.repo_id}; this machine looks offline.\n{hint}"
        )

    import httpx
    from huggingface_hub import hf_hub_download  # lazy: only needed for a real download
    from huggingface_hub.errors import LocalEntryNotFoundError

    network_errors = (LocalEntryNotFoundError, ConnectionError, TimeoutError, httpx.TransportError)

    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for filename in files:
        url = file_url(entry.repo_id, filename)
        try:
            local = hf_hub_download(repo_id=entry.repo_id, filename=filename, repo_type="dataset", local_dir=dest)
        except network_errors as exc:  # lost the network midway
            raise OfflineError(f"download of {url} failed: {exc}\n{hint}") from exc
        except Exception as exc:  # HTTP errors (404, gated repo, ...) and disk errors
            raise DataError(f"download of {url} failed: {exc}\n{hint}") from exc
        paths.append(Path(local))
    return paths
