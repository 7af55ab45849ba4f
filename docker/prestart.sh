#!/usr/bin/env bash
# Entrypoint of the web container (docker-compose.yml): wait for the database, bring the
# schema up to date, check it, then `exec` the real command, so the server replaces this
# shell and gets the SIGTERM of `docker stop` itself.
#
# compose's `depends_on: condition: service_healthy` already waits for PostgreSQL on a fresh
# `up`, but not when web restarts on its own or the database is external, hence the loop.
#
# Why the loop retries `prefloop db upgrade` rather than `prefloop db check`: `db check` also
# exits 1 when the schema is behind ("schema is at nothing ... run `prefloop db upgrade`"),
# which is the normal state on a first start or after an image update. Waiting for it to pass
# before upgrading would never end. `db upgrade` connects first and exits 1 with a one-line
# reason when the database does not answer, so it doubles as the wait; on PostgreSQL each
# migration runs in a transaction, so a retry after a failure starts clean.
# Exit codes other than 1 (2 = bad configuration, e.g. PREFLOOP_SECRET_KEY) stop at once.
#
# Knobs: PREFLOOP_DB_WAIT_SECONDS (default 60).
set -euo pipefail

wait_seconds="${PREFLOOP_DB_WAIT_SECONDS:-60}"
deadline=$((SECONDS + wait_seconds))
last_reason=""

while true; do
  rc=0
  output="$(prefloop db upgrade 2>&1)" || rc=$?
  if [[ ${rc} -eq 0 ]]; then
    printf 'prestart: %s\n' "${output}" >&2
    break
  fi
  if [[ ${rc} -ne 1 ]]; then
    printf 'prestart: prefloop db upgrade failed (exit %s):\n%s\n' "${rc}" "${output}" >&2
    exit "${rc}"
  fi
  if ((SECONDS >= deadline)); then
    printf 'prestart: gave up after %ss; last prefloop db upgrade said:\n%s\n' \
      "${wait_seconds}" "${output}" >&2
    exit 1
  fi
  reason="$(printf '%s\n' "${output}" | tail -n 1)"
  if [[ "${reason}" != "${last_reason}" ]]; then # say each new reason once, not every 2 s
    echo "prestart: waiting for the database: ${reason}" >&2
    last_reason="${reason}"
  fi
  sleep 2
done

# Exits 0 only when the database answers and is at the latest revision.
prefloop db check >&2

exec "$@"
