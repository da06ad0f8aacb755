"""The chaos soak: many concurrent clients against a real TP=2 daemon while rank faults of every kind are
injected through the admin API, then a verdict on what every request, the daemon, its processes and its
journal went through.

    workload.py  what each request asks for (seeded)       client.py    one request sent, its ending judged
    volleys.py   which faults are armed together, and what they must cause
    injector.py  arms volleys one after another through the admin API, waits for each to be repaired
    probes.py    the leader's fds, RSS and child processes  story.py     incidents rebuilt from the stderr journal
    soak.py      the run itself, the request bound, the report and its summary table

Used by tests/test_chaos.py (a short form in CI) and scripts/chaos-soak (the long form, with a table);
tests/test_chaos_verdicts.py checks that the judges can fail.
"""
