#!/usr/bin/env bash
# Builds the guest of the host-local microVM (Tier-2 tool runs) and prints the folder that holds
# it: vmlinuz (Debian's cloud kernel, which boots fastest under software emulation) and
# initramfs.cpio.gz (a static busybox and /init, which runs the job the agent appends as a second
# cpio archive, frames its output on the serial line and powers off).
# Everything comes from Debian packages; cached outside the repo, keyed by kernel version and
# guest layout; idempotent and safe to run concurrently. Needs busybox-static and cpio
# (hack/host-deps.sh installs them) and, on the first run only, the Debian mirror.
set -euo pipefail

cache=${XDG_CACHE_HOME:-$HOME/.cache}/gateway-operator/microvm
layout=3 # bump when the guest's content (the init script below) changes
mkdir -p "$cache"

# An already built guest of this layout needs no mirror at all.
newest() { find "$cache" -mindepth 2 -maxdepth 2 -name .complete -path "*/g$layout-*" -printf '%h\n' | sort -V | tail -n 1; }
if [ -n "${GATEWAY_MICROVM_KERNEL:-}" ]; then
  dest=$cache/g$layout-$GATEWAY_MICROVM_KERNEL
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
dest=$cache/g$layout-$kernel
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
echo "microvm-guest: fetching linux-image-$kernel-cloud-amd64" >&2
(cd "$work" && apt-get download -qq "linux-image-$kernel-cloud-amd64" >&2 2>/dev/null) ||
  (apt-get update -qq >&2 && cd "$work" && apt-get download -qq "linux-image-$kernel-cloud-amd64" >&2)
dpkg -x "$work"/linux-image-*.deb "$work/pkg"
mkdir -p "$work/out"
install -m 0444 "$work/pkg/boot/vmlinuz-$kernel-cloud-amd64" "$work/out/vmlinuz"

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

# /init: the only program the guest runs as root. The job archive (appended by the agent, or
# sent on the serial line to a warm guest that booted without one) holds
# /job/cmd (the command, quoted by the agent), /job/stdin, /job/cap (bytes kept per stream) and
# /job/nonce. The command runs as an unprivileged guest user with the serial line out of its
# reach; its stdout and stderr are drained to the end but only the first cap+1 bytes are kept.
# Frames, each line on the serial line starting with the nonce:
#   <nonce> out <n> / base64 lines / <nonce> err <n> / base64 lines / <nonce> exit <code> / <nonce> end
cat >"$root/init" <<'EOF'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs -o mode=0755,nosuid devtmpfs /dev
mount -t tmpfs -o mode=0700 tmpfs /run
chmod 0600 /dev/console /dev/ttyS0 2>/dev/null
ip link set lo up
# What does not depend on the job comes first: a warm guest has it done before its job arrives.
mkdir -m 1777 -p /tmp/work
mkfifo -m 0622 /run/o /run/e
chmod 0711 /run
if [ ! -e /job/nonce ]; then
  # Warm: no job was appended. Say so once, before any job exists (nothing else runs yet, so
  # nothing can forge it), then take the job from the host on the serial line: "job <bytes>"
  # and that many bytes of the same cpio archive, raw (no echo, no line editing, 8-bit clean).
  stty -F /dev/ttyS0 raw -echo 115200
  echo "gwvm ready" >/dev/ttyS0
  read -r word size </dev/ttyS0
  case $word:$size in job:[1-9]*) ;; *) poweroff -f ;; esac
  # /init runs in /, where the archive's paths start.
  head -c "$size" </dev/ttyS0 | cpio -i -d -m -u 2>/dev/null
  [ -e /job/nonce ] || poweroff -f
fi
# Builtins where they do: every process costs milliseconds under software emulation.
read -r nonce </job/nonce
rm -f /job/nonce
read -r cap </job/cap
chmod -R a+rX /job
(head -c "$((cap + 1))" >/run/out; cat >/dev/null) </run/o &
(head -c "$((cap + 1))" >/run/err; cat >/dev/null) </run/e &
cd /tmp/work
setpriv --nnp su -s /bin/sh -c 'exec sh /job/cmd' tool </job/stdin >/run/o 2>/run/e
code=$?
# Nothing the command left behind keeps running or keeps a stream open.
su -s /bin/sh -c 'kill -9 -1' tool 2>/dev/null
exec 5<>/run/o 6<>/run/e
exec 5>&- 6>&-
wait
{
  echo "$nonce out $(wc -c </run/out)"
  base64 </run/out
  echo "$nonce err $(wc -c </run/err)"
  base64 </run/err
  echo "$nonce exit $code"
  echo "$nonce end"
} >/dev/ttyS0
sync
poweroff -f
EOF
chmod 0755 "$root/init"

(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -9n >"$work/out/initramfs.cpio.gz"
echo "$kernel" >"$work/out/KERNEL"
touch "$work/out/.complete"
rm -rf "$dest"
mv "$work/out" "$dest"
chmod 0755 "$dest"
echo "$dest"
