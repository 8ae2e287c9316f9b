"""The container image the manifests reference (``Dockerfile``, ``.dockerignore``), checked without a
Docker engine: parsed by Docker's own Dockerfile parser (the ``dockerfile`` wheel wraps the Go
parser of moby/buildkit), pinned to the project's Ray, and copying only what exists and is not
ignored."""

from __future__ import annotations

import fnmatch
import re

import dockerfile  # the [test] extra installs it

from tests.k8s.kube import REPO


def commands():
    return dockerfile.parse_file(str(REPO / "Dockerfile"))


def args() -> dict[str, str]:
    out = {}
    for c in commands():
        if c.cmd == "ARG" and "=" in c.value[0]:
            k, _, v = c.value[0].partition("=")
            out[k] = v
    return out


def test_base_image_and_constraint_pin_the_projects_ray():
    import ray

    a = args()
    image = a["RAY_IMAGE"]
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-cpu", image)
    assert m, image
    assert m.group(1) == a["RAY_VERSION"] == ray.__version__
    assert (int(m.group(2)), int(m.group(3))) >= (3, 10)  # pyproject: requires-python >= 3.10
    froms = [c.value for c in commands() if c.cmd == "FROM"]
    assert froms == [("scratch", "AS", "data"), ("${RAY_IMAGE}",)]
    runs = " ".join(" ".join(c.value) for c in commands() if c.cmd == "RUN")
    assert "ray==${RAY_VERSION}" in runs and "ray.__version__ == '${RAY_VERSION}'" in runs
    (pin,) = re.findall(r"^TORCH_PIN \?= (\S+)$", (REPO / "Makefile").read_text(), flags=re.M)
    assert a["TORCH_SPEC"] == pin, "the image and `make install` must install the same torch"


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics (last matching pattern wins; ``!`` re-includes)."""
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        pat = pat.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) for p in prefixes) or fnmatch.fnmatch(path, pat.replace("**/", "*")):
            ignored = not neg
    return ignored


def test_copied_sources_exist_and_are_in_the_build_context():
    patterns = [
        ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    copied = []
    for c in commands():
        if c.cmd == "COPY" and not any(f.startswith("--from=") for f in c.flags):
            copied += list(c.value[:-1])
    assert set(copied) == {"pyproject.toml", "README.md", "ray_router", "serve_configs", "tune_jobs"}
    for src in copied:
        assert (REPO / src).exists(), src
        assert not _ignored(src, patterns), f"{src} is excluded by .dockerignore"
    for excluded in (".venv", ".git", "runs", "data", "tests", ".cache"):
        assert _ignored(excluded, patterns), f"{excluded} would be sent to the Docker daemon"
    # what the RayJob's entrypoint and the tune report read from the working directory
    assert (REPO / "tune_jobs" / "paper_sweep.yaml").is_file()
    assert (REPO / "serve_configs" / "local.yaml").is_file()


def test_image_working_directory_and_data_dir_match_the_manifests():
    from tests.k8s.test_manifests import one

    workdir = [c.value[0] for c in commands() if c.cmd == "WORKDIR"]
    assert workdir == ["/home/ray/app"]
    assert one("sweep", "RayJob")["spec"]["entrypoint"].startswith(f"cd {workdir[0]} &&")
    env = {}
    for c in commands():
        if c.cmd == "ENV":
            env.update(dict(zip(c.value[::2], c.value[1::2])))
    assert env["RAY_ROUTER_DATA_DIR"] == "/home/ray/data" and env["HF_HUB_OFFLINE"] == "1"
    data_copy = [c for c in commands() if c.cmd == "COPY" and "--from=data" in c.flags]
    assert data_copy and data_copy[0].value[-1].rstrip("/") == env["RAY_ROUTER_DATA_DIR"]
    users = [c.value[0] for c in commands() if c.cmd == "USER"]
    assert users[-1] == "ray", "KubeRay pods run Ray as the image's `ray` user"
