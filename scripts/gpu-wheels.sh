#!/usr/bin/env bash
# Wheels for the GPU check (scripts/gpu-check.sh) on the device machine lent to some
# sessions: its image has torch, transformers, accelerate, peft, numpy, scipy, pandas, pyarrow,
# jinja2, typer, pytest, httpx and uvloop, but no network, so the server's and the tests'
# other dependencies travel as wheels. Run it here (PyPI reachable), then carry .whl:
#
#   scripts/gpu-wheels.sh          # -> .whl/ (ignored by git; ~25 MB)
#
# The versions are this checkout's virtualenv's (make install), for the image's Python 3.12
# on x86-64; gpu-check.sh installs them with --no-deps into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pip ] || { echo "run make install first (the versions come from .venv)"; exit 1; }
MISSING=(
    fastapi starlette sqlalchemy greenlet alembic mako pydantic pydantic-core pydantic-settings
    python-dotenv annotated-types typing-inspection argon2-cffi argon2-cffi-bindings cffi
    pycparser python-multipart nh3 krippendorff psycopg psycopg-binary uvicorn httpx2
    httpcore2 truststore opentelemetry-api pytest-timeout trl datasets dill multiprocess
)
pins=()
freeze=$(.venv/bin/pip freeze)
for name in "${MISSING[@]}"; do
    pin=$(grep -i -E "^${name//-/[-_]}==" <<<"$freeze" || true)
    [ -n "$pin" ] || { echo "not in .venv: $name"; exit 1; }
    pins+=("$pin")
done
rm -rf .whl
.venv/bin/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d .whl "${pins[@]}"
echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl"
