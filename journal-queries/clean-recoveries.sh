#!/bin/sh
# Question: which incidents did neurond recover from cleanly -- the cheapest ladder rung that fits the fault,
#   on the first attempt, with the communicator abort confirmed (NEUROND_OUTCOME=clean on recovery_finished)?
# A bad result: fewer lines than incidents (incidents-per-host.sh). The others were degraded (see
#   NEUROND_OUTCOME=degraded and its NEUROND_OUTCOME_WHY), stuck, or given up: run `neurond audit` with the
#   same SOURCE to have them named.
# Usage:  sh journal-queries/clean-recoveries.sh [SOURCE] [journalctl options, e.g. --since=-7d]
#   SOURCE: -u neurond (the default: this host)
#           --directory=DIR   journals gathered from many hosts by systemd-journal-remote (_HOSTNAME tells them apart)
#           --file=GLOB       journal files (quote the glob; may repeat)
[ $# -gt 0 ] || set -- -u neurond
exec journalctl --no-pager -q -o short-iso "$@" MESSAGE_ID=3e00fbab0cd245b9a899a1fffc06fcab NEUROND_OUTCOME=clean
