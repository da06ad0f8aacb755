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
exec journalctl --no-pager -q -o short-iso "$@" MESSAGE_ID=eb777724fa2f4a8db8f6236ac94fd434
