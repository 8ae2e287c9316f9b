"""Fetch the benchmark release files from the Hugging Face Hub into a data directory.

Offline machines fail at once: before touching ``huggingface_hub`` (imported lazily here), the
function checks ``HF_HUB_OFFLINE`` and probes the Hub (``huggingface.co:443``, or the host of
``$HF_ENDPOINT``, e.g. a mirror) with a short timeout, and raises
:class:`~ray_router.errors.OfflineError` with the URLs to fetch by hand. Downloads show a progress
bar on stderr, in a terminal and in a log alike (``HF_HUB_DISABLE_PROGRESS_BARS=1`` hides it).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ray_router.errors import ConfigError, DataError, OfflineError

HF_HOST = "huggingface.co"
HF_PORT = 443
HF_ENDPOINT_ENV = "HF_ENDPOINT"  # huggingface_hub's own variable: a mirror, or a local server in tests


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


def hub_endpoint() -> str:
    """The Hub's base URL: ``$HF_ENDPOINT``, else ``https://huggingface.co``."""
    return (os.environ.get(HF_ENDPOINT_ENV) or f"https://{HF_HOST}").rstrip("/")


def _host_port(endpoint: str) -> tuple[str, int]:
    url = urlsplit(endpoint)
    return url.hostname or HF_HOST, url.port or (443 if url.scheme == "https" else 80)


def file_url(repo_id: str, filename: str) -> str:
    return f"{hub_endpoint()}/datasets/{repo_id}/resolve/main/{filename}"


def present_release(name: str, data_dir: str | Path) -> Path | None:
    """The file of ``name`` that :func:`~ray_router.data.load_dataset` would read from ``data_dir``
    (for MixInstruct: its default test split), or None when there is none."""
    from ray_router.data.mixinstruct import split_file
    from ray_router.data.registry import ROUTERBENCH_FILES

    names = {
        "routerbench": list(ROUTERBENCH_FILES.values()),
        "mixinstruct": [split_file("test"), split_file("test").removesuffix("l")],
    }.get(name)
    if names is None:
        raise ConfigError(f"unknown dataset {name!r} for download; choose one of {sorted(HUB_DATASETS)}")
    return next((Path(data_dir) / f for f in names if (Path(data_dir) / f).is_file()), None)


def _manual_hint(entry: HubDataset, files: Sequence[str], dest: Path) -> str:
    urls = "\n".join(f"  {file_url(entry.repo_id, f)}" for f in files)
    return (
        f"To get the files by hand, download on a machine with internet access:\n{urls}\n"
        f"and put them in {dest} (or the directory named by --data-dir / RAY_ROUTER_DATA_DIR)."
    )


def hub_reachable(timeout: float, host: str | None = None, port: int | None = None) -> bool:
    """True if a TCP connection to ``host:port`` (default: the Hub endpoint's; DNS included) opens
    within ``timeout`` seconds."""
    if host is None or port is None:
        host, port = _host_port(hub_endpoint())
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


def _progress_bar() -> type:
    """A tqdm bar shown whether or not stderr is a terminal (``huggingface_hub``'s own shows only on a
    terminal; a multi-GB download in a CI log deserves one too), unless progress bars are disabled."""
    from huggingface_hub.utils import are_progress_bars_disabled
    from tqdm.auto import tqdm

    class DownloadBar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs["disable"] = are_progress_bars_disabled()
            super().__init__(*args, **kwargs)

    return DownloadBar


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

    endpoint = hub_endpoint()
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise OfflineError(
            f"cannot download {name} from {endpoint}/datasets/{entry.repo_id}: HF_HUB_OFFLINE is set; "
            f"unset it (e.g. `unset HF_HUB_OFFLINE`) to allow downloads.\n{hint}"
        )
    if not hub_reachable(timeout):
        host, port = _host_port(endpoint)
        raise OfflineError(
            f"cannot reach {host}:{port} within {timeout:g}s to download {name} from "
            f"{endpoint}/datasets/{entry.repo_id}; this machine looks offline.\n{hint}"
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
            local = hf_hub_download(
                repo_id=entry.repo_id,
                filename=filename,
                repo_type="dataset",
                local_dir=dest,
                endpoint=endpoint,
                tqdm_class=_progress_bar(),
            )
        except network_errors as exc:  # lost the network midway
            raise OfflineError(f"download of {url} failed: {exc}\n{hint}") from exc
        except Exception as exc:  # HTTP errors (404, gated repo, ...) and disk errors
            raise DataError(f"download of {url} failed: {exc}\n{hint}") from exc
        paths.append(Path(local))
    return paths
