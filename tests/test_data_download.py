"""download_dataset: fails fast and clearly offline; never touches the internet in tests. The `make run`
step that fetches RouterBench on a machine without the data runs here against a local HTTP server
that answers like the Hub. (How fast the offline failures are: bench/download_offline.py.)"""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ray_router.data import download as dl
from ray_router.data import download_dataset, load_dataset
from ray_router.errors import ConfigError, OfflineError
from tests.data_fixtures import write_routerbench_pickle

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def online_env(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)


def _no_network(*args, **kwargs):
    raise AssertionError("the test tried to open a network connection")


def test_hf_hub_offline_env_fails_without_touching_the_network(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setattr(socket, "create_connection", _no_network)
    with pytest.raises(OfflineError) as err:
        download_dataset("routerbench", tmp_path)
    msg = str(err.value)
    assert "HF_HUB_OFFLINE" in msg and "unset" in msg
    assert "https://huggingface.co/datasets/withmartian/routerbench/resolve/main/routerbench_0shot.pkl" in msg
    assert str(tmp_path) in msg


def test_unreachable_hub_is_an_offline_error_before_any_download(monkeypatch, tmp_path, online_env):
    probes = []

    def refused(address, *args, **kwargs):
        probes.append(address)
        raise ConnectionRefusedError("refused")

    monkeypatch.setattr(socket, "create_connection", refused)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _no_network)
    with pytest.raises(OfflineError) as err:
        download_dataset("mixinstruct", tmp_path, timeout=2.0)
    assert probes == [("huggingface.co", 443)]
    msg = str(err.value)
    assert "huggingface.co:443" in msg and "by hand" in msg
    assert "test_data_prepared.jsonl" in msg and "val_data_prepared.jsonl" in msg
    assert "train_data_prepared.jsonl" not in msg  # default: test + val only


def test_a_hanging_probe_is_abandoned_after_the_timeout(monkeypatch, tmp_path, online_env):
    release = threading.Event()
    entered = threading.Event()

    def hang(*args, **kwargs):
        entered.set()
        release.wait()  # hangs until the test ends (as a DNS lookup that ignores timeouts would)
        raise OSError("too late")

    monkeypatch.setattr(socket, "create_connection", hang)
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            download_dataset("routerbench", tmp_path, timeout=0.2)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            outcome.append(e)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(timeout=60)  # a liveness bound, not a speed target
    try:
        assert not caller.is_alive(), "download_dataset waited for the hanging probe"
        assert entered.is_set() and not release.is_set()  # it returned while the probe still hung
        assert len(outcome) == 1 and isinstance(outcome[0], OfflineError), outcome
    finally:
        release.set()


def test_probe_against_local_ports():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        assert dl.hub_reachable(2.0, host="127.0.0.1", port=port)
    finally:
        server.close()
    assert not dl.hub_reachable(2.0, host="127.0.0.1", port=port)


def test_the_probe_follows_hf_endpoint(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example:8080/")
    seen = []
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: seen.append(address) or _Closing())
    assert dl.hub_reachable(1.0) and seen == [("mirror.example", 8080)]
    assert (
        dl.file_url("withmartian/routerbench", "x.pkl")
        == "http://mirror.example:8080/datasets/withmartian/routerbench/resolve/main/x.pkl"
    )


class _Closing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_unknown_name_and_split(tmp_path):
    with pytest.raises(ConfigError, match="routerdc"):
        download_dataset("routerdc", tmp_path)
    with pytest.raises(ConfigError, match="dev"):
        download_dataset("mixinstruct", tmp_path, splits=["dev"])


def test_download_calls_hub_with_dataset_repo(monkeypatch, tmp_path, online_env):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, repo_type, local_dir, endpoint, tqdm_class):
        calls.append((repo_id, filename, repo_type, local_dir, endpoint))
        out = local_dir / filename
        out.write_text("x")
        return str(out)

    monkeypatch.setattr(dl, "hub_reachable", lambda timeout: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    paths = download_dataset("mixinstruct", tmp_path / "d", splits=["validation", "train"])
    assert calls == [
        ("llm-blender/mix-instruct", "val_data_prepared.jsonl", "dataset", tmp_path / "d", "https://huggingface.co"),
        ("llm-blender/mix-instruct", "train_data_prepared.jsonl", "dataset", tmp_path / "d", "https://huggingface.co"),
    ]
    assert [p.name for p in paths] == ["val_data_prepared.jsonl", "train_data_prepared.jsonl"]
    calls.clear()
    download_dataset("routerbench", tmp_path / "d")
    assert [c[1] for c in calls] == ["routerbench_0shot.pkl", "routerbench_5shot.pkl"]
    assert {c[0] for c in calls} == {"withmartian/routerbench"}


def test_midway_network_loss_is_offline_error(monkeypatch, tmp_path, online_env):
    import huggingface_hub

    def lost(**kwargs):
        raise ConnectionError("connection reset")

    monkeypatch.setattr(dl, "hub_reachable", lambda timeout: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lost)
    with pytest.raises(OfflineError, match=re.escape("routerbench_0shot.pkl")):
        download_dataset("routerbench", tmp_path)


# ------------------------------------------------------------------- `make run` on a machine without data
class FakeHub(http.server.ThreadingHTTPServer):
    """Answers ``/datasets/<repo>/resolve/main/<file>`` like the Hub (HEAD with commit and ETag, then GET)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[tuple[str, str]] = []
        super().__init__(("127.0.0.1", 0), _HubHandler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(http.server.BaseHTTPRequestHandler):
    server: FakeHub

    def _answer(self, body: bool) -> None:
        self.server.requests.append((self.command, self.path))
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", "0" * 40)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_hub(tmp_path):
    pkl = tmp_path / "served" / "routerbench_0shot.pkl"
    pkl.parent.mkdir()
    write_routerbench_pickle(pkl)  # the real release layout, 6 rows
    hub = FakeHub({"/datasets/withmartian/routerbench/resolve/main/routerbench_0shot.pkl": pkl.read_bytes()})
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    yield hub, pkl
    hub.shutdown()
    hub.server_close()


def _make_run_download_step() -> str:
    """The download line of the Makefile's ``run`` recipe, with the clone's CLI."""
    recipe = re.search(r"^run:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M)
    assert recipe, "the Makefile has no run target"
    lines = [line.strip() for line in recipe.group(1).splitlines() if "data download" in line]
    assert len(lines) == 1, recipe.group(1)
    return lines[0].replace("$(BIN)/ray-router", f"{shlex.quote(sys.executable)} -m ray_router.cli")


def _run_step(step: str, data: Path, hub_endpoint: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "RAY_ROUTER_DATA_DIR": str(data),
        "HF_ENDPOINT": hub_endpoint,
        "HF_HOME": str(tmp_path / "hf-home"),
        "PYTHONPATH": str(REPO),
    }  # HF_HUB_OFFLINE as the Makefile exports it
    return subprocess.run(["bash", "-c", step], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_make_run_downloads_routerbench_when_the_data_dir_is_empty(tmp_path, fake_hub):
    hub, served = fake_hub
    data = tmp_path / "data"
    step = _make_run_download_step()
    res = _run_step(step, data, hub.endpoint, tmp_path)
    assert res.returncode == 0, res.stderr
    got = data / "routerbench_0shot.pkl"
    assert got.read_bytes() == served.read_bytes()
    assert ("GET", "/datasets/withmartian/routerbench/resolve/main/routerbench_0shot.pkl") in hub.requests
    assert "100%" in res.stderr and "routerbench_0shot.pkl" in res.stderr  # the progress bar
    table = load_dataset("routerbench", data_dir=data)  # what `make run` reads next
    assert table.meta["variant"] == "0shot" and table.n_queries == 4 and table.n_arms == 11

    hub.requests.clear()  # a second `make run` finds the file and asks the Hub nothing
    again = _run_step(step, data, hub.endpoint, tmp_path)
    assert again.returncode == 0 and "nothing to download" in again.stderr and hub.requests == []


def test_make_run_does_not_download_when_the_data_dir_has_routerbench(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "routerbench_5shot_arc_mbpp_winogrande.parquet").write_bytes(b"present")  # the shared subset's name
    res = _run_step(_make_run_download_step(), data, "http://127.0.0.1:9", tmp_path)  # nothing listens there
    assert res.returncode == 0, res.stderr
    assert "nothing to download" in res.stderr and sorted(p.name for p in data.iterdir()) == [
        "routerbench_5shot_arc_mbpp_winogrande.parquet"
    ]


def test_make_run_without_internet_says_how_to_get_the_data(tmp_path):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = _run_step(_make_run_download_step(), tmp_path / "data", f"http://127.0.0.1:{port}", tmp_path)
    assert res.returncode == 2
    assert f"error: cannot reach 127.0.0.1:{port}" in res.stderr and "by hand" in res.stderr
