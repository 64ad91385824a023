# syntax=docker/dockerfile:1
# One image for every InstantID Ray node: KubeRay head and worker pods (k8s/), the launcher's nodes (cluster/aws.yaml)
# and `serve run` on a single GPU box. No weights: the k8s overlays mount them from a shared volume that a Job fills
# (k8s/overlays/gpu/weights-job.yaml); other nodes fetch them at start (cluster/prefetch.py) into /weights.
#
#   docker build --build-arg BASE_IMAGE=python:3.12-slim-bookworm@sha256:<digest> -t instantid-serve:0.1.0 .
#   docker run --rm --gpus all -p 8000:8000 instantid-serve:0.1.0 serve run serve_config.yaml   # tiny preset
#
# One CUDA runtime: torch's own CUDA wheels (the nvidia-* packages in requirements-image.lock) on a plain Python
# base, not a CUDA base image under them (which shipped CUDA twice, ~10 GB). The face stage's ONNX models run on
# onnxruntime's CPU provider: the GPU overlay places FaceAnalysis on CPU pods, and FaceAnalyzer falls back to CPU
# where no CUDA provider exists, so the image carries no onnxruntime-gpu and no second CUDA. The NVIDIA driver comes
# from the node (the GPU operator / device plugin mounts it).
#
# The base image, pinned by digest so a re-pushed tag never changes what is built. THIS DIGEST IS A PLACEHOLDER (all
# zeros, it resolves to nothing and the build fails until it is set): no container registry could be reached where
# this file was written, so no real digest was verified. Set a verified one, here or with --build-arg:
#   docker buildx imagetools inspect python:3.12-slim-bookworm    # "Digest: sha256:..." (the multi-arch index)
#   crane digest python:3.12-slim-bookworm                        # the same, with go-containerregistry's crane
# and refresh it with the base's security updates (docs/deploy.md, "Image"). tests/test_k8s_image.py checks the
# reference is pinned by @sha256.
ARG BASE_IMAGE=python:3.12-slim-bookworm@sha256:0000000000000000000000000000000000000000000000000000000000000000
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    HF_HOME=/weights/hf

# wget: KubeRay's default health probes; procps: the preStop hook's pgrep (k8s/base/rayservice.yaml); rsync and ssh:
# the cluster launcher's file syncing; libglib2.0-0, libgomp1: OpenCV's and onnxruntime's shared libraries.
# uid 1000: what the manifests' securityContext runs as (runAsUser: 1000, runAsNonRoot).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates wget procps rsync openssh-client libglib2.0-0 \
        libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && python -m venv /opt/venv \
    && useradd --create-home --uid 1000 --shell /bin/bash ray \
    && mkdir -p /weights /app && chown ray:ray /weights /app

WORKDIR /app

# Dependencies first, from the lock alone, so a source change does not reinstall torch. --require-hashes: every
# wheel must match a hash in the lock (a re-uploaded or tampered file fails the build); --no-deps: the lock is the
# whole closure (uv pip compile), nothing outside it is resolved. Regenerate it with the command in
# requirements-image.in whenever pyproject.toml's pins change (tests/test_k8s_image.py holds the two together).
COPY requirements-image.lock ./
RUN pip install --require-hashes --no-deps -r requirements-image.lock

COPY --chown=ray:ray . .
# The project itself: no build isolation (setuptools is in the lock, hashed), no dependencies (all installed above).
RUN pip install --no-deps --no-build-isolation . \
    && python -c "import onnxruntime, ray, torch, deployments.app, cluster.prefetch; \
print('providers', onnxruntime.get_available_providers(), 'ray', ray.__version__, 'torch', torch.__version__, \
'cuda', torch.version.cuda)"

USER 1000:1000
EXPOSE 8000 8080 8265 6379 10001
CMD ["bash"]
