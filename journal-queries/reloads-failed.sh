#!/bin/sh
# Question: which reloads failed -- a fault while the pool was reloading, during a full_reload repair or an
#   operator reload (SIGHUP, systemctl reload, POST /admin/reload)? One lifecycle transition
#   reloading -> poisoned per failed reload.
# A bad result: any line means a freshly started pool failed; the same cause again and again is what trips the
#   breaker (gave-up.sh). Check the checkpoint, free GPU memory and the rank named in the line.
# Usage:  sh journal-queries/reloads-failed.sh [SOURCE] [journalctl options, e.g. --since=-7d]
#   SOURCE: -u neurond (the default: this host)
#           --directory=DIR   journals gathered from many hosts by systemd-journal-remote (_HOSTNAME tells them apart)
#           --file=GLOB       journal files (quote the glob; may repeat)
[ $# -gt 0 ] || set -- -u neurond
# Each entry once: a copy resent by systemd-journal-upload prints the same line (time to the microsecond, host,
#   pid, MESSAGE), so a repeated line is dropped (docs/journal.md, "Each entry counted once").
lines=$(journalctl --no-pager -q -o short-iso-precise "$@" MESSAGE_ID=15cc44d225bb459aae88a9247eeaf6d2 \
    NEUROND_LIFECYCLE_EVENT=fault NEUROND_STATE_FROM=reloading) || exit
[ -z "$lines" ] || printf '%s\n' "$lines" | awk '/^[^ \t]/ { copy = seen[$0]++ } !copy'
