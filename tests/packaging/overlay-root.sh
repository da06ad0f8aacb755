#!/bin/bash
# Run a command as root of a copy-on-write view of this machine, so that a package can be installed, upgraded
# and purged for real without touching the machine: / is overlaid with STATE/upper (every change lands there)
# in a private mount namespace. Run as
#   unshare -m --propagation private bash overlay-root.sh STATE SHARE COMMAND...
# Keep STATE between calls to go on where the last call left off. SHARE appears as /share (the packages).
# /run and /tmp are fresh tmpfs: no systemd runs as PID 1 in the view, as in a container.
set -eu
state=$1 share=$2
shift 2
mkdir -p "$state/upper" "$state/work" "$state/root"
root=$state/root
mount -t overlay overlay -o "lowerdir=/,upperdir=$state/upper,workdir=$state/work" "$root"
mount --rbind /dev "$root/dev"
mount -t proc proc "$root/proc"
mount -t tmpfs tmpfs "$root/run"
mount -t tmpfs tmpfs "$root/tmp"
mkdir -p "$root/share"
mount --bind "$share" "$root/share"
exec chroot "$root" "$@"
