#!/bin/bash
# Boot a real systemd as PID 1 of private namespaces, for the unit test. Run as
#   unshare --pid --fork --mount --uts --cgroup --propagation private --mount-proc \
#       bash private-systemd.sh WORK CACHE TARGET
# from a process already moved into a cgroup of its own (the cgroup namespace is rooted there).
# WORK/units/* are installed into /etc/systemd/system; WORK appears as /run/neurond-test, CACHE as
# /run/neurond-cache.
# WARNING (../../../shared/README.md): without DefaultDependencies=no on the target and the service, and tmpfs
# over /tmp and /var/tmp, systemd pulls in sysinit.target whose tmpfiles rule wipes the real /tmp. Both are
# enforced here: the tmpfs mounts below, and a refusal to boot a unit lacking DefaultDependencies=no.
set -eu
work=$1 cache=$2 target=$3
for unit in "$work"/units/*.target "$work"/units/*.service; do
  grep -qsx 'DefaultDependencies=no' "$unit" "$unit.d"/*.conf ||
    { echo "refusing: $unit lacks DefaultDependencies=no" >&2; exit 91; }
done
mount -t tmpfs tmpfs /run
mkdir -p /run/neurond-test /run/neurond-cache
mount --bind "$work" /run/neurond-test
mount --bind "$cache" /run/neurond-cache
for d in /tmp /var/tmp /var/log/journal /etc/systemd/system /var/lib /var/cache; do
  if [ -d "$d" ]; then mount -t tmpfs tmpfs "$d"; fi
done
mountpoint -q /tmp && mountpoint -q /var/tmp || { echo "refusing: /tmp and /var/tmp must be tmpfs" >&2; exit 92; }
mkdir -p /var/lib/systemd /var/log/journal
cp -r /run/neurond-test/units/. /etc/systemd/system/
mount -t cgroup2 cgroup2 /sys/fs/cgroup
exec env container=neurond-test /lib/systemd/systemd --system --unit="$target"
