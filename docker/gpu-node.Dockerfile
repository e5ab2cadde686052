# syntax=docker/dockerfile:1
# The GPU node image: `sdapi gpu-node`, with CUDA torch. The torch wheels
# carry the CUDA runtime; the machine provides the NVIDIA driver (through the
# NVIDIA container toolkit that Nomad's docker driver uses for
# `device "nvidia/gpu"`).
#
#   docker build -f docker/gpu-node.Dockerfile -t sdapi/gpu-node .

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
# A CUDA build of torch, installed first: the `gpu` extra's torch range is
# then satisfied and pip installs no other torch.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
WORKDIR /src
RUN python -m venv /opt/sdapi
RUN /opt/sdapi/bin/pip install --no-cache-dir --disable-pip-version-check \
    --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY sdapi ./sdapi
COPY web ./web
COPY jobs ./jobs
COPY gpu_node ./gpu_node
RUN /opt/sdapi/bin/pip install --no-cache-dir --disable-pip-version-check ".[gpu]"

FROM ${PYTHON_IMAGE}
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/sdapi sdapi \
    && mkdir /models && chown sdapi:sdapi /models
COPY --from=build /opt/sdapi /opt/sdapi
COPY docker/healthcheck.py /opt/sdapi/healthcheck.py
ENV PATH=/opt/sdapi/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HF_HOME=/models/.huggingface \
    SDAPI_DATA_DIR=/home/sdapi/.sdapi \
    SDAPI_MODEL_DIR=/models \
    SDAPI_GPU_DEVICE=cuda \
    SDAPI_GPU_HEALTH_HOST=0.0.0.0 \
    SDAPI_GPU_HEALTH_PORT=9090
# Weights: a host volume in production, so each machine downloads once.
VOLUME /models
USER sdapi
WORKDIR /home/sdapi
EXPOSE 9090
# Loading a model's weights comes before healthy.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "/opt/sdapi/healthcheck.py"]
ENTRYPOINT ["sdapi"]
CMD ["gpu-node"]
