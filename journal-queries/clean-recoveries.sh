#!/bin/sh
# Question: which incidents did neurond recover from cleanly -- the cheapest ladder rung that fits the fault,
#   on the first attempt, with the communicator abort confirmed, healthy within 900 s of the fault
#   (NEUROND_OUTCOME=clean on recovery_finished; docs/journal.md, "Clean")?
# A bad result: fewer lines than incidents (incidents-per-host.sh). The others were degraded (see
#   NEUROND_OUTCOME=degraded and its NEUROND_OUTCOME_WHY), stuck, or given up: run `neurond audit` with the
#   same SOURCE to have them named.
# Usage:  sh journal-queries/clean-recoveries.sh [SOURCE] [journalctl options, e.g. --since=-7d]
#   SOURCE: -u neurond (the default: this host)
#           --directory=DIR   journals gathered from many hosts by systemd-journal-remote (_HOSTNAME tells them apart)
#           --file=GLOB       journal files (quote the glob; may repeat)
[ $# -gt 0 ] || set -- -u neurond
# Each entry once: a copy resent by systemd-journal-upload prints the same line (time to the microsecond, host,
#   pid, MESSAGE), so a repeated line is dropped (docs/journal.md, "Each entry counted once").
# Older daemons judged NEUROND_OUTCOME without the time bound: a line whose MESSAGE says
#   "healthy after N ms" with N over 900000 is degraded, not clean, and is left out (CLEAN_WITHIN_S).
lines=$(journalctl --no-pager -q -o short-iso-precise "$@" MESSAGE_ID=3e00fbab0cd245b9a899a1fffc06fcab \
    NEUROND_OUTCOME=clean) || exit
[ -z "$lines" ] || printf '%s\n' "$lines" |
  awk -v within_ms=900000 '
    /^[^ \t]/ { copy = seen[$0]++; slow = 0
                if (match($0, /: healthy after [0-9]+ ms/))
                  slow = substr($0, RSTART + 16, RLENGTH - 19) + 0 > within_ms }
    !copy && !slow'
