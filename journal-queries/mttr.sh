#!/bin/sh
# Question: how long does recovery take -- fault detected to serving again (NEUROND_DURATION_MS of
#   recovery_finished)? Prints "recoveries N p50 Xms p95 Yms max Zms" (nearest-rank percentiles).
# A bad result: p50 above a few seconds at TP=1 means recoveries are not using comm_rebuild; p95 or max near
#   load_timeout_s means loads are timing out; compare hosts by adding _HOSTNAME=NAME.
# Usage:  sh journal-queries/mttr.sh [SOURCE] [journalctl options, e.g. --since=-7d]
#   SOURCE: -u neurond (the default: this host)
#           --directory=DIR   journals gathered from many hosts by systemd-journal-remote (_HOSTNAME tells them apart)
#           --file=GLOB       journal files (quote the glob; may repeat)
[ $# -gt 0 ] || set -- -u neurond
# Each sample once: a copy of an entry resent by systemd-journal-upload has the same boot id, timestamps (both
#   clocks), host, pid and MESSAGE as the original (docs/journal.md, "Each entry counted once").
journalctl --no-pager -q -o export --output-fields=_HOSTNAME,_PID,MESSAGE,NEUROND_DURATION_MS "$@" \
    MESSAGE_ID=3e00fbab0cd245b9a899a1fffc06fcab |
  awk 'BEGIN { RS = ""; FS = "\n" }
       { key = ""; ms = ""
         for (i = 1; i <= NF; i++) {
           if ($i ~ /^NEUROND_DURATION_MS=/) ms = substr($i, 21)
           else if ($i ~ /^(_BOOT_ID|__MONOTONIC_TIMESTAMP|__REALTIME_TIMESTAMP|_HOSTNAME|_PID|MESSAGE)=/)
             key = key SUBSEP $i
         }
         if (ms != "" && !seen[key]++) print ms }' | sort -n |
  awk '{ v[NR] = $1 }
       END { if (NR == 0) { print "recoveries 0"; exit }
             p50 = int(NR * 0.50); if (p50 < NR * 0.50) p50++
             p95 = int(NR * 0.95); if (p95 < NR * 0.95) p95++
             printf "recoveries %d p50 %dms p95 %dms max %dms\n", NR, v[p50], v[p95], v[NR] }'
