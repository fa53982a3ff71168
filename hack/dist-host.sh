#!/usr/bin/env bash
# Packs what a bare-metal host needs into one archive: bin/gateway-nodeagent, bin/gateway-launch,
# config/nodeagent/gateway-agent.service and hack/install-host.sh, laid out as in this tree, so
# that hack/install-host.sh runs as is from the unpacked archive. Reproducible: entries sorted,
# owned by root, dated at the commit's time (or SOURCE_DATE_EPOCH), gzip without a name or time.
#
#   hack/dist-host.sh OUT.tar.gz [BIN_DIR]
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: hack/dist-host.sh OUT.tar.gz [BIN_DIR]" >&2; exit 2; }
out=$1
src=$(cd "$(dirname "$0")/.." && pwd)
bin=${2:-$src/bin}
epoch=${SOURCE_DATE_EPOCH:-$(git -C "$src" log -1 --format=%ct 2>/dev/null || echo 0)}

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/config/nodeagent" "$stage/hack"
for f in gateway-nodeagent gateway-launch; do
  [ -f "$bin/$f" ] || { echo "dist-host: $bin/$f is missing (run make build)" >&2; exit 1; }
  install -m 0755 "$bin/$f" "$stage/bin/$f"
done
install -m 0644 "$src/config/nodeagent/gateway-agent.service" "$stage/config/nodeagent/"
install -m 0755 "$src/hack/install-host.sh" "$stage/hack/"
chmod 0755 "$stage" "$stage/bin" "$stage/config" "$stage/config/nodeagent" "$stage/hack"
tar -C "$stage" --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner \
  --format=posix --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
  -cf - bin config hack | gzip -9 -n >"$out.tmp"
mv "$out.tmp" "$out"
echo "$out"
