"""download_dataset: fails fast and clearly offline; never touches the network in tests."""

from __future__ import annotations

import socket
import time

import pytest

from ray_router.data import download as dl
from ray_router.data import download_dataset
from ray_router.errors import ConfigError, OfflineError


@pytest.fixture
def online_env(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def _no_network(*args, **kwargs):
    raise AssertionError("the test tried to open a network connection")


def test_hf_hub_offline_env_fails_at_once(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", _no_network)
    start = time.monotonic()
    with pytest.raises(OfflineError) as err:
        download_dataset("routerbench", tmp_path)
    assert time.monotonic() - start < 1.0
    msg = str(err.value)
    assert "HF_HUB_OFFLINE" in msg and "unset" in msg
    assert "https://huggingface.co/datasets/withmartian/routerbench/resolve/main/routerbench_0shot.pkl" in msg
    assert str(tmp_path) in msg


def test_unreachable_hub_fails_fast(monkeypatch, tmp_path, online_env):
    def refused(*args, **kwargs):
        raise ConnectionRefusedError("refused")

    monkeypatch.setattr(socket, "create_connection", refused)
    start = time.monotonic()
    with pytest.raises(OfflineError) as err:
        download_dataset("mixinstruct", tmp_path, timeout=2.0)
    assert time.monotonic() - start < 1.0
    msg = str(err.value)
    assert "huggingface.co:443" in msg and "by hand" in msg
    assert "test_data_prepared.jsonl" in msg and "val_data_prepared.jsonl" in msg
    assert "train_data_prepared.jsonl" not in msg  # default: test + val only


def test_hanging_probe_is_bounded_by_timeout(monkeypatch, tmp_path, online_env):
    def hang(*args, **kwargs):
        time.sleep(5)
        raise OSError("too late")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.monotonic()
    with pytest.raises(OfflineError):
        download_dataset("routerbench", tmp_path, timeout=0.2)
    assert time.monotonic() - start < 2.0


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


def test_unknown_name_and_split(tmp_path):
    with pytest.raises(ConfigError, match="routerdc"):
        download_dataset("routerdc", tmp_path)
    with pytest.raises(ConfigError, match="dev"):
        download_dataset("mixinstruct", tmp_path, splits=["dev"])


def test_download_calls_hub_with_dataset_repo(monkeypatch, tmp_path, online_env):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, repo_type, local_dir):
        calls.append((repo_id, filename, repo_type, local_dir))
        out = local_dir / filename
        out.write_text("x")
        return str(out)

    monkeypatch.setattr(dl, "hub_reachable", lambda timeout: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    paths = download_dataset("mixinstruct", tmp_path / "d", splits=["validation", "train"])
    assert calls == [
        ("llm-blender/mix-instruct", "val_data_prepared.jsonl", "dataset", tmp_path / "d"),
        ("llm-blender/mix-instruct", "train_data_prepared.jsonl", "dataset", tmp_path / "d"),
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
    with pytest.raises(OfflineError, match="routerbench_0shot.pkl"):
        download_dataset("routerbench", tmp_path)
