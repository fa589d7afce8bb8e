# tandem's cluster image: the GPU install (`make install` on a GPU machine) in a container, with
# the checkout baked in, for cluster/rayjob.yaml (KubeRay) or any node that runs Ray from an
# image. Build it from the repository root and push it where your nodes pull from:
#
#   docker build -t REGISTRY/tandem:$(git rev-parse --short HEAD) .
#   docker push REGISTRY/tandem:$(git rev-parse --short HEAD)
#
# What it holds (README, "Versions"): Python 3.11; vllm 0.32.0 with the torch 2.13.0 it pins,
# built for CUDA 13 (the torch wheels carry their own CUDA libraries: the nodes need an NVIDIA
# driver >= 580, nothing else); Ray with the dashboard, at the version KubeRay is told about
# (rayjob.yaml's rayVersion); flash-attn only where a prebuilt wheel matches (PyPI has only its
# source, which compiles for an hour); without it the learner's attention uses SDPA.
#
# The devel base, not runtime: flashinfer (vLLM's sampler) compiles some kernels on first use.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG RAY_VERSION=2.60.0
# A flash-attn wheel built for torch 2.13 / CUDA 13 / cp311 (e.g. from the flash-attention
# GitHub releases); empty: take one from the package index if it has a binary, else go without.
ARG FLASH_ATTN_WHEEL=""

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev git ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && pip install --upgrade pip

WORKDIR /opt/tandem
# Dependencies first (this layer is rebuilt only when pyproject.toml changes): the package
# skeleton lets pip read the metadata without the rest of the checkout.
COPY pyproject.toml README.md ./
RUN mkdir -p tandem bench && touch tandem/__init__.py bench/__init__.py \
    && pip install ".[gpu,wandb]" "ray[default]==${RAY_VERSION}" \
    && pip uninstall -y tandem \
    && if [ -n "${FLASH_ATTN_WHEEL}" ]; then pip install --no-deps "${FLASH_ATTN_WHEEL}"; \
       else pip install --no-deps --only-binary=:all: flash-attn \
            || echo "tandem: no prebuilt flash-attn wheel; the learner uses SDPA"; fi \
    && pip install --no-deps $(python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["tool"]["tandem"]["no-deps"])')

# The checkout, installed editable so conf/ is found next to the package.
COPY . .
RUN pip install --no-deps -e . \
    && python -c "import tandem.engine.version as v; v.check_vllm(); print('vllm ok')"
