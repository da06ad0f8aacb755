"""Shared fixtures: the built-in model, real daemons (`neurond serve` subprocesses) on free ports, and one rank's
shard of the built-in model.

The daemon and the rank bootstrap live in tests/harness (shared with scripts/); the names tests have always
imported from here are re-exported below."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.harness.daemon import (  # noqa: F401 - re-exported: tests import these from tests.conftest
    MODEL,
    REPO,
    TEST_ENV,
    Daemon,
    alive,
    chat_body,
    describe,
    free_port,
    http,
    is_zygote,
    proc_stat,
    wait_until,
)

# The longest tests go first: scripts/test spreads the modules over workers (pytest-xdist, --dist loadfile) in
# collection order, and the Debian package test alone is a quarter of the suite; started last, it is its tail.
FIRST = ("tests/packaging/",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(FIRST))  # stable: the rest keep their order
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu-check on a GPU machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("neurond-cache")


@pytest.fixture(scope="session")
def builtin_model(cache_dir) -> Path:
    from neurond.models.builtin import ensure_builtin_model

    return ensure_builtin_model(cache_dir)


@pytest.fixture(scope="session")
def start_daemon(cache_dir, builtin_model):
    started: list[Daemon] = []

    def start(tp_size: int = 1, extra: list[str] | None = None, env: dict | None = None, ready: bool = True) -> Daemon:
        d = Daemon(cache_dir, tp_size, extra, env)
        started.append(d)
        if ready:
            d.wait_ready()
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.stop()


@pytest.fixture(scope="session")
def daemon_tp1(start_daemon) -> Daemon:
    return start_daemon(1)


@pytest.fixture(scope="session")
def daemon_tp2(start_daemon) -> Daemon:
    return start_daemon(2)


@pytest.fixture(scope="module")
def shard_placement() -> tuple[str, str]:
    """(dtype, device) the `shard` fixture loads the built-in model with; a module overrides it (tests/gpu)."""
    return "float32", "cpu"


@pytest.fixture(scope="module")
def shard(builtin_model, shard_placement):
    """The built-in model as one rank's loaded shard (TP=1), once per module: runners are built on it
    (tests.harness.ranks.runner)."""
    from tests.harness import ranks

    dtype, device = shard_placement
    return ranks.tp1_shard(builtin_model, device, dtype)


# CI sets CI=true. There every test must run: a tool, a package or a privilege that CI lacks is a broken setup,
# which a skip would hide behind a green run.
def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def skip_or_fail(reason: str) -> None:
    """Skip the test for `reason`; in CI (CI=true) fail it instead. Never returns."""
    if in_ci():
        pytest.fail(f"{reason}; CI (CI=true) must run this test", pytrace=False)
    pytest.skip(reason)


def need_root(reason: str) -> None:
    """Skip (in CI: fail) unless running as root, which CI does."""
    if os.geteuid() != 0:
        skip_or_fail(reason)
