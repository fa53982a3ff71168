#!/usr/bin/env bash
# Copies what the Helm chart shares with config/ into the chart (config/ is the one source):
# the CRDs, the manager, agent and user RBAC, and the admission policies.
#
#   hack/sync-chart.sh           copy
#   hack/sync-chart.sh --check   fail if the chart's copies differ from config/
set -euo pipefail
cd "$(dirname "$0")/.."
chart=charts/gateway-operator
pairs=()
for f in config/crd/bases/*.yaml; do pairs+=("$f:$chart/crds/$(basename "$f")"); done
for f in config/rbac/role.yaml config/rbac/agent_role.yaml config/rbac/user_roles.yaml config/policies/agent_policy.yaml \
  config/policies/toolrun_policy.yaml config/policies/manager_policy.yaml config/policies/instance_policy.yaml; do
  pairs+=("$f:$chart/files/$(basename "$f")")
done
status=0
for p in "${pairs[@]}"; do
  src=${p%%:*} dst=${p#*:}
  if [ "${1:-}" = --check ]; then
    cmp -s "$src" "$dst" || { echo "sync-chart: $dst differs from $src; run make manifests" >&2; status=1; }
  else
    mkdir -p "$(dirname "$dst")"
    cp "$src" "$dst"
  fi
done
exit $status
