# syntax=docker/dockerfile:1
# One image for every InstantID Ray node: KubeRay head and worker pods (k8s/), the launcher's nodes (cluster/aws.yaml)
# and `serve run` on a single GPU box. CUDA runtime + cuDNN for torch and onnxruntime-gpu, Python 3.12, Ray and
# this package with the `gpu` extra. No weights: nodes fetch them at start (cluster/prefetch.py) into a cache
# volume mounted at /weights.
#
#   docker build -t instantid-serve:0.1.0 .
#   docker run --rm --gpus all -p 8000:8000 instantid-serve:0.1.0 serve run serve_config.yaml   # tiny preset
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    HF_HOME=/weights/hf

# wget: KubeRay's default health probes; rsync and ssh: the cluster launcher's file syncing.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates wget curl rsync \
        openssh-client libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 1000 --shell /bin/bash ray \
    && mkdir -p /weights /app && chown ray:ray /weights /app

WORKDIR /app

# Dependencies first, from pyproject.toml alone, so a source change does not reinstall torch. On Linux x86_64 the
# pinned torch wheel is the CUDA build. onnxruntime (CPU, a base dependency) and onnxruntime-gpu (the `gpu` extra)
# install into the same module folder: drop the CPU one and reinstall the GPU one so its CUDA provider is the one
# that remains.
COPY pyproject.toml README.md ./
RUN mkdir -p instantid_core instantid_app instantid_cli deployments batch \
    && touch instantid_core/__init__.py instantid_app/__init__.py instantid_cli/__init__.py deployments/__init__.py \
       batch/__init__.py \
    && pip install --upgrade pip \
    && pip install ".[gpu]" \
    && pip uninstall -y instantid-serve onnxruntime \
    && pip install --force-reinstall --no-deps "$(grep -o 'onnxruntime-gpu==[0-9.]*' pyproject.toml)" \
    && rm -rf instantid_core instantid_app instantid_cli deployments batch

COPY --chown=ray:ray . .
RUN pip install --no-deps . \
    && python -c "import onnxruntime, ray, torch, deployments.app, cluster.prefetch; \
print('providers', onnxruntime.get_available_providers(), 'ray', ray.__version__, 'torch', torch.__version__)"

USER ray
EXPOSE 8000 8080 8265 6379 10001
CMD ["bash"]
