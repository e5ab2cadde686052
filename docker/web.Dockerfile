# syntax=docker/dockerfile:1
# The web and jobs image: `sdapi web`, `sdapi jobs`, `sdapi migrate` (and the
# operator commands). No torch: the package without its `gpu` extra.
#
#   docker build -f docker/web.Dockerfile -t sdapi/web .

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
RUN python -m venv /opt/sdapi
COPY pyproject.toml README.md ./
COPY sdapi ./sdapi
COPY web ./web
COPY jobs ./jobs
COPY gpu_node ./gpu_node
# The package alone: everything it reads at run time is package data.
RUN /opt/sdapi/bin/pip install --no-cache-dir --disable-pip-version-check .

FROM ${PYTHON_IMAGE}
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/sdapi sdapi
COPY --from=build /opt/sdapi /opt/sdapi
COPY docker/healthcheck.py /opt/sdapi/healthcheck.py
ENV PATH=/opt/sdapi/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SDAPI_DATA_DIR=/home/sdapi/.sdapi \
    SDAPI_HOST=0.0.0.0 \
    SDAPI_PORT=8080
USER sdapi
WORKDIR /home/sdapi
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/opt/sdapi/healthcheck.py"]
ENTRYPOINT ["sdapi"]
CMD ["web"]
