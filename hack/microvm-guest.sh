#!/usr/bin/env bash
# Builds the guest of the host-local microVM (Tier-2 tool runs) and prints the folder that holds
# it: vmlinuz (Debian's cloud kernel, which boots fastest under software emulation) and
# initramfs.cpio.gz (our static init, cmd/gateway-guest-init, which runs the job the agent
# appends as a second cpio archive or sends on the serial line, frames its output on the serial
# line and powers off; and a static busybox for the commands users run).
# The kernel comes from Debian packages, the init is built with the project's Go (GO, else go on
# PATH). Cached outside the repo, keyed by kernel version, guest layout and a hash of the init's
# source and Go version; idempotent, deterministic and safe to run concurrently. Needs
# busybox-static and cpio (hack/host-deps.sh installs them) and, the first time a kernel version
# is used, the Debian mirror.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
go=${GO:-go}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/gateway-operator/microvm
layout=4 # bump when the guest's content (the layout below, the init's build flags) changes
mkdir -p "$cache"
command -v "$go" >/dev/null || { echo "microvm-guest: $go is missing (the guest's init is built with Go)" >&2; exit 1; }

# The init's key: its source (the module's x/sys version included) and the Go that builds it.
init_src=(cmd/gateway-guest-init nodeagent/microvm/guest)
init_key=$(
  cd "$repo"
  "$go" env GOVERSION
  grep -E '^[[:space:]]*golang.org/x/sys ' go.mod
  find "${init_src[@]}" -maxdepth 1 -name '*.go' ! -name '*_test.go' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
)
init_key=$(sha256sum <<<"$init_key" | cut -c1-12)
key=g$layout-$init_key

# An already built guest of this key needs no mirror at all.
newest() { find "$cache" -mindepth 2 -maxdepth 2 -name .complete -path "*/$key-*" -printf '%h\n' | sort -V | tail -n 1; }
if [ -n "${GATEWAY_MICROVM_KERNEL:-}" ]; then
  dest=$cache/$key-$GATEWAY_MICROVM_KERNEL
else
  dest=$(newest)
fi
if [ -n "$dest" ] && [ -f "$dest/.complete" ]; then echo "$dest"; exit 0; fi

exec 9>"$cache/.lock"
flock 9

kernel=${GATEWAY_MICROVM_KERNEL:-}
if [ -z "$kernel" ]; then
  dest=$(newest)
  if [ -n "$dest" ]; then echo "$dest"; exit 0; fi
  # awk reads to the end (no early exit): apt-cache must never meet a closed pipe under pipefail.
  resolve() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '!found && /Depends: linux-image-/ {sub("linux-image-", "", $2); sub("-cloud-amd64", "", $2); print $2; found = 1}'; }
  kernel=$(resolve)
  if [ -z "$kernel" ]; then
    apt-get update -qq >&2
    kernel=$(resolve)
  fi
  [ -n "$kernel" ] || { echo "microvm-guest: cannot resolve the cloud kernel from linux-image-cloud-amd64" >&2; exit 1; }
fi
dest=$cache/$key-$kernel
if [ -f "$dest/.complete" ]; then echo "$dest"; exit 0; fi

for tool in busybox cpio; do
  command -v "$tool" >/dev/null || { echo "microvm-guest: $tool is missing (run hack/host-deps.sh)" >&2; exit 1; }
done
busybox=$(command -v busybox)
if [[ $(LC_ALL=C ldd "$busybox" 2>&1 || true) != *"not a dynamic executable"* ]]; then
  echo "microvm-guest: $busybox is not static (install busybox-static)" >&2
  exit 1
fi

work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/out"
# A guest of another key built from the same kernel spares the mirror.
cached_kernel=$(find "$cache" -mindepth 2 -maxdepth 2 -name .complete -path "*/g*-$kernel/.complete" -printf '%h\n' | sort | tail -n 1)
if [ -n "$cached_kernel" ] && [ "$(cat "$cached_kernel/KERNEL")" = "$kernel" ]; then
  install -m 0444 "$cached_kernel/vmlinuz" "$work/out/vmlinuz"
else
  echo "microvm-guest: fetching linux-image-$kernel-cloud-amd64" >&2
  (cd "$work" && apt-get download -qq "linux-image-$kernel-cloud-amd64" >&2 2>/dev/null) ||
    (apt-get update -qq >&2 && cd "$work" && apt-get download -qq "linux-image-$kernel-cloud-amd64" >&2)
  dpkg -x "$work"/linux-image-*.deb "$work/pkg"
  install -m 0444 "$work/pkg/boot/vmlinuz-$kernel-cloud-amd64" "$work/out/vmlinuz"
fi

root=$work/root
mkdir -p "$root"/{bin,dev,etc,proc,sys,tmp,run,job}
# The one unprivileged guest user the command runs as; no password, so nothing can su back.
echo 'root:x:0:0::/root:/bin/sh' >"$root/etc/passwd"
echo 'tool:x:1000:1000::/tmp/work:/bin/sh' >>"$root/etc/passwd"
printf 'root:x:0:\ntool:x:1000:\n' >"$root/etc/group"
install -m 0755 "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
# The kernel needs a console before /init runs.
mknod -m 0600 "$root/dev/console" c 5 1

# /init: the only program the guest runs as root (cmd/gateway-guest-init; its package
# nodeagent/microvm/guest describes the job and the frames). Static, with no build path or ID
# in it, so the same source and Go give the same bytes.
(cd "$repo" && CGO_ENABLED=0 GOOS=linux GOARCH=amd64 GOFLAGS=-mod=readonly "$go" build -trimpath -buildvcs=false \
  -ldflags='-s -w -buildid=' -o "$root/init" ./cmd/gateway-guest-init)
chmod 0755 "$root/init"

# The same content gives the same archive: no build times in it.
find "$root" -exec touch -h -d @0 {} +

(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -9n >"$work/out/initramfs.cpio.gz"
echo "$kernel" >"$work/out/KERNEL"
touch "$work/out/.complete"
rm -rf "$dest"
mv "$work/out" "$dest"
chmod 0755 "$dest"
echo "$dest"
