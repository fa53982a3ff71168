#!/usr/bin/env bash
# Fails when the generated deepcopy code, CRDs or RBAC differ from what the pinned controller-gen
# produces from the current sources. Generates into a scratch copy; the tree is never touched.
#
#   hack/verify-generated.sh [TREE]     TREE defaults to this repository
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
gen=${CONTROLLER_GEN:-$(make -s -C "$repo" controller-gen)}
cd "${1:-$repo}"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

cp go.mod go.sum "$scratch/"
mkdir -p "$scratch/hack" "$scratch/config/crd/bases" "$scratch/config/rbac"
cp hack/boilerplate.go.txt "$scratch/hack/"
cp -r api controllers "$scratch/"
rm -f "$scratch"/api/*/zz_generated.deepcopy.go

(
  cd "$scratch"
  "$gen" object:headerFile=hack/boilerplate.go.txt paths=./api/...
  "$gen" crd rbac:roleName=gateway-operator-manager paths=./api/... paths=./controllers/... \
    output:crd:artifacts:config=config/crd/bases output:rbac:artifacts:config=config/rbac
)

stale=0
for f in api/v1alpha1/zz_generated.deepcopy.go config/rbac/role.yaml; do
  diff -u "$f" "$scratch/$f" || stale=1
done
diff -ru config/crd/bases "$scratch/config/crd/bases" || stale=1
if [ $stale -ne 0 ]; then
  echo "verify-generated: generated files are stale; run 'make generate manifests' and commit the result" >&2
  exit 1
fi
echo "verify-generated: up to date"
