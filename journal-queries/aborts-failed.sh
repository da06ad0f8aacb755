#!/bin/sh
# Question: which communicator aborts failed or timed out (a rank did not confirm the abort within
#   abort_timeout_s; the detail says which ranks and whether it was a timeout)?
# A bad result: any line means that incident needed a full reload instead of a communicator rebuild. Repeated
#   on one host: the collective library cannot unblock that GPU -- drain it for a GPU reset or a reboot.
# Usage:  sh journal-queries/aborts-failed.sh [SOURCE] [journalctl options, e.g. --since=-7d]
#   SOURCE: -u neurond (the default: this host)
#           --directory=DIR   journals gathered from many hosts by systemd-journal-remote (_HOSTNAME tells them apart)
#           --file=GLOB       journal files (quote the glob; may repeat)
[ $# -gt 0 ] || set -- -u neurond
# Each entry once: a copy resent by systemd-journal-upload prints the same line (time to the microsecond, host,
#   pid, MESSAGE), so a repeated line is dropped (docs/journal.md, "Each entry counted once").
lines=$(journalctl --no-pager -q -o short-iso-precise "$@" MESSAGE_ID=eb777724fa2f4a8db8f6236ac94fd434) || exit
[ -z "$lines" ] || printf '%s\n' "$lines" | awk '/^[^ \t]/ { copy = seen[$0]++ } !copy'
