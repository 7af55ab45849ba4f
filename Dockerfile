# prefloop images. Two targets from one file:
#   web      the FastAPI app (also the image the CLI runs in)     docker build --target web .
#   trainer  web + torch/transformers for the GPU training worker  docker build --target trainer .
# docker-compose.yml builds both. Needs BuildKit (the default since Docker 23) for the pip
# cache mounts, which keep multi-GB wheels such as torch out of the layers and out of
# repeated downloads.

FROM python:3.11-slim AS web

# Writable state lives only in /data (a volume in compose); the code under /app stays
# root-owned and read-only for the app user.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PREFLOOP_DATA_DIR=/data

# A fixed uid/gid (and a numeric USER below, which runAsNonRoot-style checks can verify) so
# bind-mounted data dirs can be chowned on the host predictably.
# /data is created owned by that user: Docker copies this ownership into a *named* volume the
# first time it is mounted, so the app can write there without running as root.
RUN groupadd --system --gid 10001 prefloop \
 && useradd --system --uid 10001 --gid prefloop --create-home --home-dir /home/prefloop \
            --shell /usr/sbin/nologin prefloop \
 && install -d -o prefloop -g prefloop -m 0750 /data

WORKDIR /app

# The source tree lives at /app, read-only for the app user.
COPY pyproject.toml README.md alembic.ini ./
COPY app/ app/
COPY trainer/ trainer/
COPY migrations/ migrations/
COPY templates/ templates/
COPY static/ static/
COPY docker/prestart.sh docker/prestart.sh

# Editable on purpose: the app finds templates/, static/, alembic.ini and migrations/ next to
# its package (app/web.py: ROOT = Path(__file__).parent.parent). A plain `pip install .` puts
# the package in site-packages, where none of those are, and `prefloop db upgrade` then fails
# with "No 'script_location' key found". Editable also keeps a single copy of the code.
# The egg-info/build leftovers are not needed at run time.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -e . \
 && rm -rf build ./*.egg-info \
 && chmod 0755 docker/prestart.sh

USER 10001:10001
EXPOSE 8000

# /healthz must answer 2xx without a login; urlopen raises (exit 1) on errors and non-2xx.
# start-period covers docker/prestart.sh: up to 60 s waiting for the database, then migrations.
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# No ENTRYPOINT here: compose puts docker/prestart.sh (wait for the DB, migrate) in front of
# the web service only; the trainer and a bare `docker run` of the image run their command as is.
CMD ["prefloop", "serve", "--host", "0.0.0.0", "--port", "8000"]


FROM web AS trainer

USER root
# torch from PyPI is the CUDA build (with its nvidia-* wheels): what a GPU host wants. The
# container needs only the host's NVIDIA driver plus the NVIDIA Container Toolkit, no CUDA image.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -e '.[trainer]' \
 && rm -rf build ./*.egg-info

# Downloaded model weights land in the data volume and survive container rebuilds.
ENV HF_HOME=/data/huggingface

USER 10001:10001
# The worker serves no HTTP, so the web healthcheck inherited from the web stage must go.
HEALTHCHECK NONE
CMD ["prefloop", "worker"]
