"""What tests/ and scripts/ both need to drive neurond from the outside, kept in one place.

- `tests.harness.daemon`: a neurond daemon under test. `neurond serve` in a process of its own on a free port,
  with settings (a TOML file or NEUROND_* variables), waited for on /ready, asked over HTTP (chat, streamed
  chat, metrics, the admin API on its unix socket), stopped, and checked to leave no worker process behind.
  tests/conftest.py's fixtures and every script that starts a daemon (bench-recovery, bench-long-context,
  gpu-prove, bench-cpu-threads, chaos-soak) use it.
- `tests.harness.ranks`: a rank bootstrap. What a rank worker (neurond/worker/main.py) does before its first
  step (device, CPU threads, process group, Shard, ModelRunner), for code that drives a rank's own loop by hand
  with no leader: the scripts that time that loop (bench-kv, bench-grammar, bench-tp, profile-tp,
  probe-prefill, probe-zygote-cuda, gpu-prove's runner stages) and the tests that build ranks in-process
  (tests/worker, conftest's `shard` fixture).

Why here: scripts import it after `sys.path.insert(0, ROOT)`, as scripts/mutants already imports tests.mutants,
and tests import it as the package it is. It is test code: the wheel ships `neurond*` only (pyproject.toml), so
none of it reaches an installation. Neither module imports pytest (a script may run where it is missing), and
`daemon` imports neither torch nor httpx until asked (a script's `--help` stays quick).
"""
