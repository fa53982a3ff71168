#!/usr/bin/env bash
# Prepares the template root folder from which each sandboxed systemd test host is copied, and
# prints its path. No download: the host's /usr is bind-mounted read-only into every sandbox, and
# /etc is a copy of the host's with every enabled unit removed and the units that make no sense in
# a container masked. Cached outside the repo, keyed by systemd version; idempotent and safe to
# run concurrently.
set -euo pipefail

cache=${XDG_CACHE_HOME:-$HOME/.cache}/gateway-operator
version=$(/lib/systemd/systemd --version | awk 'NR==1 {print $2}')
layout=3 # bump when the template's content changes
dest=$cache/systemd-rootfs/v$layout-systemd-$version

if [ -f "$dest/.complete" ]; then echo "$dest"; exit 0; fi
mkdir -p "$cache/systemd-rootfs"
exec 9>"$cache/systemd-rootfs/.lock"
flock 9
if [ -f "$dest/.complete" ]; then echo "$dest"; exit 0; fi

work=$(mktemp -d "$cache/systemd-rootfs/build.XXXXXX")
trap 'rm -rf "$work"' EXIT

chmod 0755 "$work"
mkdir -p "$work"/{usr,proc,sys,dev,run,tmp,root,home,opt,srv,mnt,var/lib,var/log,var/tmp,var/cache}
chmod 1777 "$work/tmp" "$work/var/tmp"
chmod 0700 "$work/root"
# merged /usr: the top-level links point into the bind-mounted /usr.
for d in bin sbin lib lib32 lib64 libx32; do
  if [ -L "/$d" ]; then ln -s "$(readlink "/$d")" "$work/$d"; fi
done

cp -a /etc "$work/etc"
etc=$work/etc
# Nothing the host enabled runs in a sandbox; the sandbox boots to multi-user.target only.
find "$etc/systemd/system" -mindepth 1 -maxdepth 1 \( -name '*.wants' -o -name '*.requires' \) -exec rm -rf {} +
find "$etc/systemd/system" -mindepth 1 -maxdepth 1 -type l -exec rm -f {} +
rm -rf "$etc/systemd/system/"*.d "$etc/systemd/user" 2>/dev/null || true
ln -sf /lib/systemd/system/multi-user.target "$etc/systemd/system/default.target"
: >"$etc/fstab"
: >"$etc/machine-id"
rm -f "$etc/hostname" "$etc/resolv.conf"
# Units that have nothing to do in a container, or that would touch the real machine.
for u in getty@.service serial-getty@.service console-getty.service getty.target \
  systemd-udevd.service systemd-udevd-control.socket systemd-udevd-kernel.socket systemd-udev-trigger.service \
  systemd-udev-settle.service systemd-modules-load.service systemd-remount-fs.service \
  sys-kernel-debug.mount sys-kernel-tracing.mount sys-kernel-config.mount sys-fs-fuse-connections.mount \
  dev-hugepages.mount dev-mqueue.mount systemd-firstboot.service systemd-journald-audit.socket \
  systemd-timesyncd.service systemd-pstore.service systemd-random-seed.service \
  systemd-hwdb-update.service systemd-sysusers.service systemd-binfmt.service proc-sys-fs-binfmt_misc.automount \
  apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer dpkg-db-backup.timer \
  logrotate.timer cron.service postgresql.service ssh.service; do
  ln -sf /dev/null "$etc/systemd/system/$u"
done
# Journald keeps its files inside the sandbox's rootfs where a test can read them.
mkdir -p "$work/var/log/journal"

touch "$work/.complete"
rm -rf "$dest"
mv "$work" "$dest"
trap - EXIT
echo "$dest"
