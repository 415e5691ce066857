#!/usr/bin/env bash
# Builds the istiod harness (./istiod) into ../target/istiod-harness, stamped with the
# Istio module's revision as istiod reports its version (`istioctl proxy-status`). Go's
# module and build caches (GOMODCACHE, GOCACHE) make a warm build take seconds.
set -euo pipefail
cd "$(dirname "$0")"
out=${1:-../target/istiod-harness}
version=$(go list -m -f '{{.Version}}' istio.io/istio)
rev=${version##*-}
pkg=istio.io/istio/pkg/version
go build -buildvcs=false \
  -ldflags "-X $pkg.buildVersion=1.32-alpha.$rev -X $pkg.buildGitRevision=$rev -X $pkg.buildStatus=Clean -X $pkg.buildTag=$version" \
  -o "$out" ./istiod
