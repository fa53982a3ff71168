#!/usr/bin/env bash
# Fails when a test left a sandboxed systemd host behind: a cgroup, a process in it, or a mount.
set -euo pipefail
status=0
for base in /sys/fs/cgroup/unified /sys/fs/cgroup; do
  dir=$base/gateway-operator-test
  [ -d "$dir" ] || continue
  left=$(find "$dir" -mindepth 1 -maxdepth 1 -type d)
  if [ -n "$left" ]; then
    echo "leftovers: sandbox cgroups remain:" >&2
    echo "$left" >&2
    status=1
  fi
done
if grep -q 'gateway-sandbox' /proc/self/mountinfo; then
  echo "leftovers: sandbox mounts remain:" >&2
  grep 'gateway-sandbox' /proc/self/mountinfo >&2
  status=1
fi
# A tool-run microVM is named toolrun-<id>; none may outlive its test.
if pgrep -f -- '-name toolrun-' >/dev/null; then
  echo "leftovers: microVMs remain:" >&2
  pgrep -a -f -- '-name toolrun-' >&2
  status=1
fi
[ $status -eq 0 ] && echo "leftovers: none"
exit $status
