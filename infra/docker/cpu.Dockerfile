# CPU image of elite: the Prefect worker that runs flow runs (with runner="ray", the Ray driver), the Ray head, and
# CPU Ray workers (encode batches with encode_device="cpu"). Build from the repository root:
#
#   docker build -f infra/docker/cpu.Dockerfile -t elite-cpu:0.1.0 .
#
# All nodes of one Ray cluster need the same Ray version and the same Python patch version (`ray start` refuses a node
# that differs), and a Ray Client driver the same Ray and Python minor version: the Python tag below, RAY_VERSION and
# PREFECT_VERSION equal those of gpu.Dockerfile, and RAY_VERSION the Ray the tests run (tests/test_infra.py).
FROM python:3.11.14-slim-bookworm

ARG TORCH_VERSION=2.13.0
# PyPI's Linux torch wheel is a CUDA build with several GB of CUDA libraries; this image has no GPU to use them
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG RAY_VERSION=2.60.0
ARG PREFECT_VERSION=3.9.1
ARG PREFECT_RAY_VERSION=0.6.0

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/huggingface

# wget: KubeRay's liveness and readiness probes call it on every Ray node. The base tag is pinned; Debian's package
# versions within it are not, so that a rebuild gets security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

# KubeRay starts Ray through `bash -l`, and Debian's /etc/profile resets PATH for a login shell: put the venv back
# (the single quotes are meant: $PATH is expanded by that shell, not here)
# hadolint ignore=SC2016
RUN python -m venv /opt/venv \
    && echo 'export PATH=/opt/venv/bin:$PATH' > /etc/profile.d/elite-venv.sh

# torch first, in a layer of its own: it is most of the image and changes least often
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

# /opt/elite is the checkout that infra/prefect.yaml's pull step moves into; its entrypoints are relative to it
WORKDIR /opt/elite
COPY pyproject.toml README.md ./
COPY elite ./elite
COPY elite_cli ./elite_cli
COPY flows ./flows
# ray[default]: the dashboard and the per-node agent, which KubeRay and `ray job` need; ray[client]: ray:// addresses.
# Ray, Prefect and prefect-ray pinned to the versions the flows are tested with; the rest keeps pyproject's ranges.
# hadolint ignore=DL3013
RUN pip install ".[flows,onnx,ray]" "ray[default,client]==${RAY_VERSION}" "prefect==${PREFECT_VERSION}" \
        "prefect-ray==${PREFECT_RAY_VERSION}" \
    && python -c "import torch, sys; sys.exit(torch.version.cuda is not None)"

# A fixed uid, so that files on shared volumes (the Hugging Face cache) have the same owner on every node. Models are
# mounted read-only at /models (a volume or PVC, never baked in); S3 credentials come from the environment, ~/.aws or
# the cloud role at run time, never from the image.
RUN useradd --create-home --uid 1000 --shell /bin/bash elite \
    && mkdir -p /models "${HF_HOME}" \
    && chown elite:elite "${HF_HOME}"
# numeric, so that Kubernetes can verify runAsNonRoot
USER 1000:1000

CMD ["prefect", "worker", "start", "--pool", "elite-ray"]
