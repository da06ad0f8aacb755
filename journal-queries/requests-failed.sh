#!/bin/sh
# Question: which client requests were ended by a rank fault (HTTP status, error code, rank, incident)?
# A bad result: each incident fails the one request in flight (the rest got a retriable 503 and
#   Retry-After). Many lines per incident, or lines without a matching incident, mean requests are failing
#   beyond what the recovery explains.
# Usage:  sh journal-queries/requests-failed.sh [SOURCE] [journalctl options, e.g. --since=-7d]
#   SOURCE: -u neurond (the default: this host)
#           --directory=DIR   journals gathered from many hosts by systemd-journal-remote (_HOSTNAME tells them apart)
#           --file=GLOB       journal files (quote the glob; may repeat)
[ $# -gt 0 ] || set -- -u neurond
# Each entry once: a copy resent by systemd-journal-upload prints the same line (time to the microsecond, host,
#   pid, MESSAGE), so a repeated line is dropped (docs/journal.md, "Each entry counted once").
lines=$(journalctl --no-pager -q -o short-iso-precise "$@" MESSAGE_ID=e9a6c5d53c724cb7be80f40cce586eee) || exit
[ -z "$lines" ] || printf '%s\n' "$lines" | awk '/^[^ \t]/ { copy = seen[$0]++ } !copy'
