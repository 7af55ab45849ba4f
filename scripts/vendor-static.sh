#!/usr/bin/env bash
# Vendor third-party browser files into static/vendor/ from the npm registry.
#
# Why vendor at all: prefloop is self-hosted and must work offline / behind a
# firewall, so pages never load scripts from a CDN. The files are committed;
# this script only exists to reproduce (or bump) them.
#
# Usage:  scripts/vendor-static.sh          (from anywhere; needs node + npm)
#
# To add a library: pin its version in a variable below and add one line to
# VENDORED. To bump: change the version, rerun, review `git diff static/vendor`.
# The script is idempotent: rerunning it with the same table changes nothing.
# static/vendor/README.md is regenerated from the table on every run.
set -euo pipefail

HTMX_VERSION="2.0.11"
SORTABLE_VERSION="1.15.7"
CHARTJS_VERSION="4.6.1"

# One entry per vendored file:  npm-package@version:path-inside-package:destination
# (destination is relative to static/vendor/; scoped packages such as
#  @scope/name@1.2.3 work too, as their names contain no colon)
VENDORED=(
  "htmx.org@${HTMX_VERSION}:dist/htmx.min.js:htmx.min.js"
  "sortablejs@${SORTABLE_VERSION}:Sortable.min.js:Sortable.min.js"
  "chart.js@${CHARTJS_VERSION}:dist/chart.umd.min.js:chart.umd.min.js"
)

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
vendor_dir="${repo_root}/static/vendor"
work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT

command -v npm >/dev/null || { echo "vendor-static: npm is required" >&2; exit 1; }
command -v node >/dev/null || { echo "vendor-static: node is required" >&2; exit 1; }
mkdir -p "${vendor_dir}"

readme_rows=()
for entry in "${VENDORED[@]}"; do
  IFS=':' read -r spec src dest <<<"${entry}"
  pkg="${spec%@*}"
  version="${spec##*@}"
  [[ -n "${pkg}" && -n "${version}" && "${pkg}" != "${spec}" ]] \
    || { echo "vendor-static: '${spec}' must be package@version" >&2; exit 1; }

  # `npm pack` downloads the exact published tarball and checks it against the
  # registry's integrity hash. A fresh folder per package keeps npm away from
  # any package.json/.npmrc of ours.
  pack_dir="${work}/$(printf '%s' "${spec}" | tr '/@' '__')"
  mkdir -p "${pack_dir}"
  tarball="$(cd "${pack_dir}" && npm pack --silent "${spec}" | tail -n 1)"
  tar -xzf "${pack_dir}/${tarball}" -C "${pack_dir}"
  unpacked="${pack_dir}/package"
  [[ -f "${unpacked}/${src}" ]] \
    || { echo "vendor-static: ${spec} has no ${src}" >&2; exit 1; }

  # Trust the tarball's own metadata, not our table, for name/version/licence.
  read -r real_version licence < <(node -e '
    const p = require(process.argv[1]);
    console.log(p.version, p.license || "UNKNOWN");' "${unpacked}/package.json")
  [[ "${real_version}" == "${version}" ]] \
    || { echo "vendor-static: asked for ${spec}, got ${real_version}" >&2; exit 1; }

  target="${vendor_dir}/${dest}"
  mkdir -p "$(dirname "${target}")"
  if [[ -f "${target}" ]] && cmp -s "${unpacked}/${src}" "${target}"; then
    echo "unchanged  ${dest}  (${spec})"
  else
    install -m 0644 "${unpacked}/${src}" "${target}"
    echo "vendored   ${dest}  (${spec}:${src})"
  fi
  sha="$(sha256sum "${target}" | cut -d' ' -f1)"
  readme_rows+=("| \`${dest}\` | [\`${pkg}\`](https://www.npmjs.com/package/${pkg}) | ${version} | \`${src}\` | ${licence} | \`${sha}\` |")
done

# Regenerated each run so the listing and checksums can never drift from the files.
{
  echo "# static/vendor"
  echo
  echo "Third-party browser files, served by prefloop itself (no CDN: the app must work"
  echo "offline). Do not edit these files or this README by hand: change the table in"
  echo "\`scripts/vendor-static.sh\` and rerun it. Each file is copied unmodified out of"
  echo "the named npm package's published tarball (\`npm pack <package>@<version>\`)."
  echo
  echo "| File | npm package | Version | Path in package | Licence | sha256 |"
  echo "| --- | --- | --- | --- | --- | --- |"
  printf '%s\n' "${readme_rows[@]}"
  echo
  echo "Check: \`cd static/vendor && sha256sum <file>\` must print the sha256 above."
} >"${work}/README.md"
if cmp -s "${work}/README.md" "${vendor_dir}/README.md"; then
  echo "unchanged  README.md"
else
  install -m 0644 "${work}/README.md" "${vendor_dir}/README.md"
  echo "wrote      README.md"
fi
