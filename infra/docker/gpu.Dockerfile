# GPU image of elite: Ray workers that run generate (and GPU encode) batches, and Prefect workers of a GPU pool
# (elite-gpu) that run whole flow runs on their host's GPUs. Build from the repository root:
#
#   docker build -f infra/docker/gpu.Dockerfile -t elite-gpu:0.1.0 .
#
# CUDA 13.0 throughout: torch 2.13.0's Linux wheels and onnxruntime-gpu 1.31 are built against CUDA 13.0 and cuDNN 9
# (their package metadata names the cu13 libraries), and the base image is CUDA 13.0 with cuDNN 9. Hosts need an NVIDIA
# driver for CUDA 13 (580 or newer) and the NVIDIA container toolkit.
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# Ray nodes of one cluster must run the same Python patch version (`ray start` refuses a mismatch), and the head and
# CPU nodes run python:3.11.14 (cpu.Dockerfile); Ubuntu 24.04 ships 3.12, so uv installs this exact CPython build.
ARG PYTHON_VERSION=3.11.14
ARG TORCH_VERSION=2.13.0
# PyTorch's CUDA 13.0 index; PyPI's torch 2.13.0 wheel for Linux is the same CUDA 13.0 build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ARG RAY_VERSION=2.60.0
ARG PREFECT_VERSION=3.9.1
ARG PREFECT_RAY_VERSION=0.6.0

COPY --from=ghcr.io/astral-sh/uv:0.11.32 /uv /usr/local/bin/uv

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/huggingface

# wget: KubeRay's liveness and readiness probes call it on every Ray node; ca-certificates: uv's Python download and
# HTTPS to S3. The base tag is pinned; Ubuntu's package versions within it are not, so that a rebuild gets security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A venv with pip in it, so that `pip install` inside the image and in runtime_env work as in the CPU image. KubeRay
# starts Ray through `bash -l`: /etc/profile.d puts the venv on PATH there too ($PATH expanded by that shell).
# hadolint ignore=SC2016
RUN uv python install "${PYTHON_VERSION}" \
    && uv venv --seed --python "${PYTHON_VERSION}" /opt/venv \
    && echo 'export PATH=/opt/venv/bin:$PATH' > /etc/profile.d/elite-venv.sh \
    && python -c "import sys; assert sys.version.startswith('${PYTHON_VERSION} '), sys.version"

# torch first, in a layer of its own: it is most of the image and changes least often
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

# /opt/elite is the checkout that infra/prefect.yaml's pull step moves into; its entrypoints are relative to it
WORKDIR /opt/elite
COPY pyproject.toml README.md ./
COPY elite ./elite
COPY elite_cli ./elite_cli
COPY flows ./flows
# onnx-gpu, never onnx as well: both provide the module `onnxruntime`. ray[default]: the dashboard and the per-node
# agent, which KubeRay and `ray job` need. Ray, Prefect and prefect-ray pinned to the versions the flows are tested
# with; the rest keeps pyproject's ranges.
# hadolint ignore=DL3013
RUN pip install ".[flows,onnx-gpu,ray]" "ray[default,client]==${RAY_VERSION}" "prefect==${PREFECT_VERSION}" \
        "prefect-ray==${PREFECT_RAY_VERSION}" \
    && python -c "import torch, sys; sys.exit(torch.version.cuda is None)" \
    && ! pip show --quiet onnxruntime 2>/dev/null

# A fixed uid, so that files on shared volumes (the Hugging Face cache) have the same owner on every node. Models are
# mounted read-only at /models (a volume or PVC, never baked in); S3 credentials come from the environment, ~/.aws or
# the cloud role at run time, never from the image. Ubuntu 24.04 images have a user `ubuntu` with uid 1000: removed.
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --create-home --uid 1000 --shell /bin/bash elite \
    && mkdir -p /models "${HF_HOME}" \
    && chown elite:elite "${HF_HOME}"
# numeric, so that Kubernetes can verify runAsNonRoot
USER 1000:1000

CMD ["ray", "start", "--address=ray-head:6379", "--block"]
