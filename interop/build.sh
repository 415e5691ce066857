#!/usr/bin/env bash
# Builds the test peers from Istio's own module into DIR (default ../target):
#   DIR/istiod-harness  istiod's server (./istiod), stamped with the module's revision as
#                       istiod reports its version (`istioctl proxy-status`);
#   DIR/istioctl        Istio's istioctl, from the same module (a `tool` of go.mod);
#   DIR/hbone-peer      the two ends of an ambient double-HBONE tunnel (./hbone): a source
#                       ztunnel on Istio's pkg/hbone dialer, and a destination ztunnel;
#   DIR/xdsdump         an ADS client that prints what an xDS server sends one node (./xdsdump).
# Go's module and build caches (GOMODCACHE, GOCACHE) make a warm build take seconds.
set -euo pipefail
cd "$(dirname "$0")"
out=${1:-../target}
mkdir -p "$out"
version=$(go list -m -f '{{.Version}}' istio.io/istio)
rev=${version##*-}
pkg=istio.io/istio/pkg/version
ldflags="-X $pkg.buildVersion=1.32-alpha.$rev -X $pkg.buildGitRevision=$rev -X $pkg.buildStatus=Clean -X $pkg.buildTag=$version"
go build -buildvcs=false -ldflags "$ldflags" -o "$out/istiod-harness" ./istiod
go build -buildvcs=false -ldflags "$ldflags" -o "$out/istioctl" istio.io/istio/istioctl/cmd/istioctl
go build -buildvcs=false -o "$out/hbone-peer" ./hbone
go build -buildvcs=false -o "$out/xdsdump" ./xdsdump
