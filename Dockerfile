# syntax=docker/dockerfile:1.7
#
# homefeed's images, built for linux/amd64 (every pinned serving package has a wheel there).
#
# serving: the four services and the rollout controller, one image; only
# requirements-serving.lock (no PyTorch, Optuna, LightGBM, scikit-learn, DuckDB), no compiler.
#   docker build --target serving --build-arg SERVICE=gateway -t ghcr.io/homefeed/homefeed:<ver> .
# SERVICE (gateway, retrieval, features, ranking or rollout) is the service the image starts;
# HOMEFEED_SERVICE=<name> at run time, or a Kubernetes `command:`
# (["python", "-m", "services.<name>"]), picks another. The root filesystem may be
# read-only; mount HOME (/home/homefeed), /tmp and the model cache (/var/cache/homefeed/models)
# as volumes, and the datasets at /var/lib/homefeed/data (HOMEFEED_HOME is /var/lib/homefeed):
#   docker run --read-only --tmpfs /tmp --tmpfs /home/homefeed \
#     --tmpfs /var/cache/homefeed/models -e HOMEFEED_SERVICE=ranking ... ghcr.io/homefeed/homefeed:<ver>
#
# training: everything in requirements.lock (plus gcc, which compiling the ranker needs) for
# the daily retrain and the feature materialization jobs:
#   docker build --target training -t ghcr.io/homefeed/homefeed:<ver>-training .
#   docker run ... ghcr.io/homefeed/homefeed:<ver>-training python -m tools.cli train --dataset <name>
#
# <ver> is [project] version in pyproject.toml (the Helm chart's appVersion).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- base: the runtime both images start from ------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --gid 10001 homefeed \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/homefeed \
      --shell /usr/sbin/nologin homefeed

# ---- protos: the gRPC stubs, generated with grpcio-tools (not part of the serving set) -------
FROM base AS protos
WORKDIR /src
# grpcio-tools and the protobuf it brings at requirements.lock's versions, so the stubs match
# the runtime's protobuf (the pip cache is a BuildKit cache mount, never in a layer)
# hadolint ignore=DL3042
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=requirements.lock,target=/tmp/requirements.lock \
    python -m venv /opt/protoc \
 && /opt/protoc/bin/pip install -c /tmp/requirements.lock grpcio-tools==1.85.1
COPY protos/homefeed protos/homefeed
# as `make protos` does (the .pyi files are for type checkers only); the .proto paths have no
# spaces, so the unquoted list is meant
# hadolint ignore=SC2046
RUN mkdir -p protos/gen \
 && /opt/protoc/bin/python -m grpc_tools.protoc -I protos --python_out=protos/gen \
      --grpc_python_out=protos/gen $(find protos/homefeed -name '*.proto') \
 && /opt/protoc/bin/python -m compileall -q protos/gen

# ---- wheel: the homefeed distribution (contract, services, training, tools, feature_repo) ---
FROM base AS wheel
WORKDIR /src
COPY . .
# hadolint ignore=DL3042
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --no-deps --wheel-dir /wheels .

# ---- serving-deps: the serving dependency set and the project, in /opt/venv -----------------
FROM base AS serving-deps
# wheels only: the serving image has no compiler, and nothing may need one
# hadolint ignore=DL3042
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=requirements-serving.lock,target=/tmp/requirements-serving.lock \
    python -m venv /opt/venv \
 && pip install --no-deps --only-binary=:all: -r /tmp/requirements-serving.lock
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-deps /wheels/homefeed-*.whl \
 && pip check
# The Feast configurations the services open (contract/feature_store.py reads them beside the
# installed feature_repo package); pyproject.toml does not ship them as package data yet.
COPY feature_repo/feature_store.yaml feature_repo/feature_store.redis.yaml \
     /opt/venv/lib/python3.11/site-packages/feature_repo/

# ---- serving: the final image of the services ------------------------------------------------
FROM base AS serving
ARG SERVICE=gateway
ENV HOMEFEED_SERVICE=${SERVICE} \
    HOMEFEED_HOME=/var/lib/homefeed \
    HOMEFEED_MODEL_CACHE=/var/cache/homefeed/models \
    HOME=/home/homefeed \
    PYTHONPATH=/opt/homefeed/protos
COPY --from=serving-deps /opt/venv /opt/venv
COPY --from=protos /src/protos/gen /opt/homefeed/protos
# mount points, owned by homefeed for a run without volumes
RUN mkdir -p /var/lib/homefeed/data /var/cache/homefeed/models \
 && chown -R 10001:10001 /var/lib/homefeed /var/cache/homefeed
# fail the build, not the pod: the service exists, every service's modules import, the
# training stack is absent, the Feast configurations are where the services look
RUN case "$SERVICE" in gateway|retrieval|features|ranking|rollout) ;; \
      *) echo "SERVICE must be gateway, retrieval, features, ranking or rollout, got '$SERVICE'" >&2; exit 1 ;; \
    esac \
 && python -c 'import importlib, importlib.util as u; \
from contract.feature_store import FEATURE_REPO; \
[importlib.import_module(f"services.{s}.{m}") for s in ("gateway", "retrieval", "features", "ranking", "rollout") for m in ("server", "settings")]; \
present = [m for m in ("torch", "optuna", "lightgbm", "sklearn", "duckdb") if u.find_spec(m)]; \
assert not present, f"training stack in the serving image: {present}"; \
assert all((FEATURE_REPO / f).is_file() for f in ("feature_store.yaml", "feature_store.redis.yaml")), FEATURE_REPO'
LABEL org.opencontainers.image.title="homefeed" \
      org.opencontainers.image.description="homefeed serving mesh: gateway, retrieval, features, ranking, rollout controller" \
      org.opencontainers.image.source="https://github.com/homefeed/homefeed" \
      org.opencontainers.image.licenses="Apache-2.0"
# a directory nobody writes: `python -m` puts the working directory first on sys.path
WORKDIR /opt/homefeed
USER 10001:10001
# gRPC: gateway 50051, retrieval 50052, features 50053, ranking 50054 (admin 50064),
# rollout 50055 (admin 50065); Prometheus /metrics 9464
EXPOSE 50051 50052 50053 50054 50055 50064 50065 9464
# exec: python is PID 1 and gets SIGTERM itself (lame-duck drain)
ENTRYPOINT ["/bin/sh", "-c", "exec python -m \"services.${HOMEFEED_SERVICE}\""]

# ---- training: retrain and feature materialization (python -m tools.cli ...) ----------------
FROM base AS training
# gcc and libc headers: tl2cgen compiles the ranker to C; libgomp1: LightGBM's OpenMP.
# Bookworm's current versions: its point releases only fix bugs
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libgomp1 \
 && rm -rf /var/lib/apt/lists/*
# PyTorch's CPU build first (PyPI's torch==2.13.0 pulls CUDA); requirements.lock's
# torch==2.13.0 is then satisfied by 2.13.0+cpu
# hadolint ignore=DL3042
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=requirements.lock,target=/tmp/requirements.lock \
    python -m venv /opt/venv \
 && pip install --no-deps --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu" \
 && pip install --no-deps -r /tmp/requirements.lock \
 && pip check
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-deps /wheels/homefeed-*.whl
COPY feature_repo/feature_store.yaml feature_repo/feature_store.redis.yaml \
     /opt/venv/lib/python3.11/site-packages/feature_repo/
COPY --from=protos /src/protos/gen /opt/homefeed/protos
ENV HOMEFEED_HOME=/var/lib/homefeed \
    HOME=/home/homefeed \
    PYTHONPATH=/opt/homefeed/protos
RUN mkdir -p /var/lib/homefeed/data \
 && chown -R 10001:10001 /var/lib/homefeed \
 && python -c 'import torch, lightgbm, optuna, sklearn, duckdb, tools.cli, training.train'
WORKDIR /opt/homefeed
USER 10001:10001
CMD ["python", "-m", "tools.cli", "--help"]
