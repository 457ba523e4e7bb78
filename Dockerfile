# syntax=docker/dockerfile:1
# style.py for a CUDA host: the torch engine on the GPU, models in a volume at /models.
#
#   docker build -t style-transfer .                            # torch engine (PyTorch's CUDA runtime image)
#   docker build -t style-transfer:caffe --build-arg WITH_CAFFE=1 .   # also pycaffe built with CUDA
#   docker run --gpus all -v "$PWD/models:/models" -v "$PWD/images:/images" style-transfer \
#       -s /images/style.jpg -c /images/content.jpg -o /images/out.jpg
#
# WITH_CAFFE picks the base stage below; BuildKit (Docker's default builder since 23.0) builds only that one.

ARG WITH_CAFFE=0
ARG TORCH_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:12.8.1-devel-ubuntu24.04
# The PyPI wheel of this version is built for CUDA 12.8, the toolkit of CUDA_DEVEL_IMAGE: torch and Caffe then load
# the same libcudart and cuBLAS into one process.
ARG TORCH_VERSION=2.8.0

# Without Caffe: PyTorch's image, whose Python already has CUDA torch.
FROM ${TORCH_IMAGE} AS base-0

# With Caffe: scripts/install_caffe.sh needs nvcc, and a Boost.Python and protoc that match the Python running
# pycaffe. PyTorch's images are Ubuntu 22.04 with conda's Python 3.11, for which Ubuntu 22.04 has neither (its
# Boost.Python is for 3.10, its protoc 3.12 is older than protobuf 4.21 accepts). NVIDIA's CUDA devel image on
# Ubuntu 24.04 has nvcc, Python 3.12 with a matching Boost.Python, and protoc 3.21; torch comes from PyPI.
FROM ${CUDA_DEVEL_IMAGE} AS base-1
ARG TORCH_VERSION
# The Ubuntu release is pinned by the base image's tag; its python3 packages follow it.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-dev python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}"
ENV PATH=/opt/venv/bin:$PATH

# A stage of this file, not an image: the tags are on the two FROM lines above.
# hadolint ignore=DL3006
FROM base-${WITH_CAFFE}
ARG WITH_CAFFE
WORKDIR /app

# The constraint keeps the base image's CUDA build of torch: nothing here may replace it with another build.
COPY requirements.txt ./
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/keep-torch.txt \
 && pip install --no-cache-dir -c /tmp/keep-torch.txt -r requirements.txt \
 && rm /tmp/keep-torch.txt

COPY scripts/install_caffe.sh scripts/caffe_patches.py scripts/
# The build tree is dropped afterwards; the cache folder keeps the built package the .pth file points to.
RUN if [ "$WITH_CAFFE" = 1 ]; then \
      PYTHON="$(command -v python)" STYLE_TRANSFER_CACHE=/opt/caffe bash scripts/install_caffe.sh --cuda \
        --jobs "$(nproc)" \
      && rm -rf /opt/caffe/caffe-*/src /opt/caffe/caffe-*/build /opt/caffe/downloads; \
    fi

COPY style.py ./
COPY style_transfer/ style_transfer/
COPY scripts/ scripts/

# PYTHONPATH lets `dask worker` (same image, --entrypoint dask) import style_transfer for style.py batch jobs.
ENV STYLE_TRANSFER_MODELS=/models \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1
VOLUME ["/models"]
ENTRYPOINT ["python", "/app/style.py"]
CMD ["--help"]
