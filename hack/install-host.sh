#!/usr/bin/env bash
# Installs the node agent on a bare-metal host: gateway-nodeagent and gateway-launch into
# /usr/local/bin, the unit gateway-agent.service into /etc/systemd/system, and
# /etc/gateway-operator/ (0700) with agent.env (extra flags, never overwritten) and, with
# --kubeconfig, the agent's kubeconfig (0600). Idempotent: a file already in place with the
# same content is left alone, and a second run changes nothing.
#
#   hack/install-host.sh [--root DIR] [--bin DIR] [--kubeconfig FILE]
#
# --root installs under another root (a host image, a test); --bin is where make build put the
# binaries (default: bin/ of this tree). It enables and starts nothing: see docs/install.md.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
root=/
bin=$src/bin
kubeconfig=
while [ $# -gt 0 ]; do
  case $1 in
    --root) root=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    --kubeconfig) kubeconfig=$2; shift 2 ;;
    *) echo "install-host: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -d "$root" ] || { echo "install-host: --root $root is not a folder" >&2; exit 2; }
root=${root%/}

owner=()
[ "$(id -u)" -eq 0 ] && owner=(-o 0 -g 0)
changed=0

# place SRC DEST MODE copies SRC unless DEST already has its content, and sets the mode either
# way. install unlinks DEST before writing, so a symlink planted there is replaced, not followed.
place() {
  if [ -f "$2" ] && [ ! -L "$2" ] && cmp -s "$1" "$2"; then
    chmod "$3" "$2"
    return
  fi
  install "${owner[@]}" -m "$3" "$1" "$2"
  echo "install-host: installed ${2#"$root"}" >&2
  changed=1
}

for f in gateway-nodeagent gateway-launch; do
  [ -f "$bin/$f" ] || { echo "install-host: $bin/$f is missing (run make build)" >&2; exit 1; }
done
[ -z "$kubeconfig" ] || [ -f "$kubeconfig" ] || { echo "install-host: --kubeconfig $kubeconfig is not a file" >&2; exit 2; }

install -d "${owner[@]}" -m 0755 "$root/usr/local/bin" "$root/etc/systemd/system"
install -d "${owner[@]}" -m 0700 "$root/etc/gateway-operator"
place "$bin/gateway-nodeagent" "$root/usr/local/bin/gateway-nodeagent" 0755
place "$bin/gateway-launch" "$root/usr/local/bin/gateway-launch" 0755
place "$src/config/nodeagent/gateway-agent.service" "$root/etc/systemd/system/gateway-agent.service" 0644
if [ -n "$kubeconfig" ]; then
  place "$kubeconfig" "$root/etc/gateway-operator/kubeconfig" 0600
fi
env_file=$root/etc/gateway-operator/agent.env
if [ ! -e "$env_file" ] && [ ! -L "$env_file" ]; then
  tmp=$(mktemp "$root/etc/gateway-operator/.agent.env.XXXXXX")
  printf '%s\n' '# Extra flags of gateway-nodeagent (docs/node-agent.md), e.g.' \
    '# GATEWAY_AGENT_FLAGS=--host-labels=reported.gateway.agent.dev/rack=r1' >"$tmp"
  chmod 0644 "$tmp"
  mv "$tmp" "$env_file"
  echo "install-host: installed /etc/gateway-operator/agent.env" >&2
  changed=1
fi
if [ "$changed" -eq 0 ]; then
  echo "install-host: everything already in place under $root/" >&2
fi
