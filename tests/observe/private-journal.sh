#!/bin/bash
# Run a command with a journald of its own, inside a private mount namespace (run me under
# `unshare -m --propagation private`): the host's journal is never touched.
#   private-journal.sh live JOURNAL_DIR CGROUP CMD...   a private journald writing to JOURNAL_DIR/journal/<machine-id>/
#   private-journal.sh dead - CGROUP CMD...             a stale journald socket (journald died): sends are refused
# CGROUP (or -): a cgroup2 directory to run CMD in; named .../system.slice/neurond.service it makes journald
# record _SYSTEMD_UNIT=neurond.service, so `journalctl -u neurond` works on the result.
# SIGTERM/SIGINT are passed on to CMD; journald is stopped (and so flushes) after CMD exits.
set -eu
mode=$1 dir=$2 cgroup=$3
shift 3
mkdir -p /run/systemd /run/log
mount -t tmpfs tmpfs /run/systemd
[ -d /var/log/journal ] && mount -t tmpfs tmpfs /var/log/journal
jpid=
if [ "$mode" = live ]; then
  mount --bind "$dir" /run/log
  /lib/systemd/systemd-journald &
  jpid=$!
  for _ in $(seq 200); do [ -S /run/systemd/journal/socket ] && break; sleep 0.025; done
  [ -S /run/systemd/journal/socket ] || { echo "private journald did not start" >&2; exit 90; }
else
  mkdir -p /run/systemd/journal
  "${PYTHON:-python3}" -c 'import socket; socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).bind("/run/systemd/journal/socket")'
fi
if [ "$cgroup" != - ]; then
  sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$cgroup" "$@" &
else
  "$@" &
fi
child=$!
trap 'kill -TERM $child 2>/dev/null || true' TERM INT
set +e
while kill -0 $child 2>/dev/null; do wait $child; done  # a trapped signal cuts wait short: wait again
wait $child
rc=$?
if [ -n "$jpid" ]; then kill -TERM $jpid; wait $jpid || true; fi
exit $rc
