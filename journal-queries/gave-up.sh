#!/bin/sh
# Question: when was the model unloaded -- by the crash-loop breaker (cause breaker_open: neurond gave up and
#   exits with code 4 after unloaded_exit_s) or by an operator (cause operator_unload)?
# A bad result: any breaker_open line: that host served 503 and systemd restarted neurond; if its start limit
#   was hit too, `systemctl status neurond` shows failed. It needs an operator before it serves again.
# Usage:  sh journal-queries/gave-up.sh [SOURCE] [journalctl options, e.g. --since=-7d]
#   SOURCE: -u neurond (the default: this host)
#           --directory=DIR   journals gathered from many hosts by systemd-journal-remote (_HOSTNAME tells them apart)
#           --file=GLOB       journal files (quote the glob; may repeat)
[ $# -gt 0 ] || set -- -u neurond
# Each entry once: a copy resent by systemd-journal-upload prints the same line (time to the microsecond, host,
#   pid, MESSAGE), so a repeated line is dropped (docs/journal.md, "Each entry counted once").
lines=$(journalctl --no-pager -q -o short-iso-precise "$@" MESSAGE_ID=15cc44d225bb459aae88a9247eeaf6d2 \
    NEUROND_STATE_TO=unloaded) || exit
[ -z "$lines" ] || printf '%s\n' "$lines" | awk '/^[^ \t]/ { copy = seen[$0]++ } !copy'
