#!/bin/sh
# Question: when did a rank hang -- a step that missed its deadline (a wedged rank, a hung kernel, peers
#   blocked in a collective)? One line per detected hang: host, rank, incident.
# A bad result: any line is an incident; several on one host, or on one rank, point at that GPU (nvidia-smi -q,
#   kernel log for Xid errors). Hangs across many hosts at once point at the model, the driver or a deploy.
# Usage:  sh journal-queries/hangs-detected.sh [SOURCE] [journalctl options, e.g. --since=-7d]
#   SOURCE: -u neurond (the default: this host)
#           --directory=DIR   journals gathered from many hosts by systemd-journal-remote (_HOSTNAME tells them apart)
#           --file=GLOB       journal files (quote the glob; may repeat)
[ $# -gt 0 ] || set -- -u neurond
# Each entry once: a copy resent by systemd-journal-upload prints the same line (time to the microsecond, host,
#   pid, MESSAGE), so a repeated line is dropped (docs/journal.md, "Each entry counted once").
lines=$(journalctl --no-pager -q -o short-iso-precise "$@" MESSAGE_ID=18a07326dabb4639935b64abb8614104 \
    NEUROND_CAUSE=rank_timeout) || exit
[ -z "$lines" ] || printf '%s\n' "$lines" | awk '/^[^ \t]/ { copy = seen[$0]++ } !copy'
