#!/usr/bin/env bash
# Builds the kube-controller-manager binary that the host bootstrap tests run as the signer of
# client certificates, from the Go module proxy alone, and caches it outside the repo in its own
# folder (the control plane cache of hack/control-plane.sh is never touched).
#
#   hack/controller-manager.sh          build if missing, then print the folder holding the binary
#   hack/controller-manager.sh --check  only check: print the folder and exit 0 if the binary is
#                                       there and reports the expected version, else exit 1
#
# Idempotent and safe to run concurrently: a second run finds the binary (checked by the version
# it reports) and returns at once; concurrent runs wait on one lock.
set -euo pipefail

KUBERNETES_VERSION=${KUBERNETES_VERSION:-v1.37.2}

cache=${XDG_CACHE_HOME:-$HOME/.cache}/gateway-operator
dest=$cache/controller-manager/k8s-$KUBERNETES_VERSION
log() { printf 'controller-manager: %s\n' "$*" >&2; }

# The binary's whole output is read before it is matched: piping it into `grep -q` under pipefail
# fails at random, because grep exits at the first match and the binary, still writing, dies of
# SIGPIPE.
ready() {
  [ -x "$dest/kube-controller-manager" ] || return 1
  local out
  out=$("$dest/kube-controller-manager" --version 2>/dev/null) || return 1
  [[ $'\n'$out$'\n' == *$'\n'"Kubernetes $KUBERNETES_VERSION"$'\n'* ]] || return 1
}

if ready; then echo "$dest"; exit 0; fi
if [ "${1:-}" = --check ]; then
  log "no finished kube-controller-manager at $dest"
  exit 1
fi

mkdir -p "$cache/controller-manager"
exec 9>"$cache/controller-manager/.lock"
flock 9
if ready; then echo "$dest"; exit 0; fi

work=$(mktemp -d "$cache/controller-manager/build.XXXXXX")
# A build of many minutes must not look like a hang.
(while sleep 30; do log "still building ($SECONDS s so far)"; done) &
ticker=$!
trap 'kill $ticker 2>/dev/null; rm -rf "$work"' EXIT
export GOFLAGS=-mod=mod CGO_ENABLED=0 GOWORK=off

log "building kube-controller-manager $KUBERNETES_VERSION from the Go module proxy."
log "This happens once per machine and takes about 10-20 minutes on 2 cores; later runs reuse $dest."

# k8s.io/kubernetes requires its staging modules as v0.0.0 and replaces them with local folders.
# Map each one to its published k8s.io/<name> v0.<minor>.<patch>.
staging_version=v0.${KUBERNETES_VERSION#v1.}
mkdir -p "$work/k8s" "$work/bin"
(
  cd "$work/k8s"
  go mod init scratch/k8s >/dev/null 2>&1
  gomod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
  [ -f "$gomod" ] || { log "could not read k8s.io/kubernetes@$KUBERNETES_VERSION's go.mod"; exit 1; }
  staging=$(sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$gomod")
  [ -n "$staging" ] || { log "no staging modules found in $gomod"; exit 1; }
  {
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    for m in $staging; do echo "replace $m => $m $staging_version"; done
  } >>go.mod
  cat >tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
GO
  log "resolving modules"
  go mod tidy >/dev/null 2>&1 || go mod tidy
  commit=unknown
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags="$ldflags -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1"
    ldflags="$ldflags -X $pkg.gitMinor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2)"
    ldflags="$ldflags -X $pkg.gitTreeState=clean -X $pkg.gitCommit=$commit"
    ldflags="$ldflags -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  log "compiling kube-controller-manager $KUBERNETES_VERSION"
  go build -trimpath -ldflags "$ldflags" -o "$work/bin/kube-controller-manager" k8s.io/kubernetes/cmd/kube-controller-manager
)

rm -rf "$dest"
mv "$work/bin" "$dest"
ready || { log "built binary does not report the expected version"; exit 1; }
log "done"
echo "$dest"
