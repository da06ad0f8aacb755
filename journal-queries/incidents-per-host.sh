#!/bin/sh
# Question: how many incidents did each host have, and of which causes? Prints "HOST INCIDENTS cause=N ...".
# A bad result: one host far above the others has a bad GPU, driver or cabling; all hosts alike point at the
#   model, the driver version or the load.
# Usage:  sh journal-queries/incidents-per-host.sh [SOURCE] [journalctl options, e.g. --since=-7d]
#   SOURCE: -u neurond (the default: this host)
#           --directory=DIR   journals gathered from many hosts by systemd-journal-remote (_HOSTNAME tells them apart)
#           --file=GLOB       journal files (quote the glob; may repeat)
[ $# -gt 0 ] || set -- -u neurond
journalctl --no-pager -q -o export --output-fields=_HOSTNAME,NEUROND_INCIDENT,NEUROND_CAUSE "$@" \
    MESSAGE_ID=18a07326dabb4639935b64abb8614104 |
  awk 'BEGIN { RS = ""; FS = "\n" }
       { host = "?"; inc = ""; cause = "?"
         for (i = 1; i <= NF; i++) {
           if ($i ~ /^_HOSTNAME=/) host = substr($i, 11)
           else if ($i ~ /^NEUROND_INCIDENT=/) inc = substr($i, 18)
           else if ($i ~ /^NEUROND_CAUSE=/) cause = substr($i, 15)
         }
         if (seen[host SUBSEP inc]++) next
         n[host]++
         if (!((host SUBSEP cause) in c)) order[host] = order[host] " " cause
         c[host SUBSEP cause]++ }
       END { for (h in n) { line = h " " n[h]; k = split(order[h], cs, " ")
                            for (i = 1; i <= k; i++) line = line " " cs[i] "=" c[h SUBSEP cs[i]]
                            print line } }' | sort
