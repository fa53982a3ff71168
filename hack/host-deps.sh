#!/usr/bin/env bash
# Installs the Debian packages the tests run for real: systemd and D-Bus (the sandboxed hosts),
# util-linux (unshare, nsenter), passwd (useradd for profile users), iproute2 (network
# namespaces), python3 (the test runtime), and QEMU, static busybox and cpio (the host-local
# microVM and its guest), shellcheck (the shell-script lint in make test), e2fsprogs
# (ext4 test filesystems) and runc (the OCI runtime the image tests start the images with).
# Idempotent: installs only what is missing.
set -euo pipefail

need=()
have() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = 'install ok installed' ]; }
for pkg in systemd dbus util-linux passwd iproute2 python3 curl ca-certificates \
  qemu-system-x86 busybox-static cpio shellcheck e2fsprogs runc; do
  have "$pkg" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "host-deps: missing packages: ${need[*]} (run as root to install them)" >&2
    exit 1
  fi
  echo "host-deps: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi
