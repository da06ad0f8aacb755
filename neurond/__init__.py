"""neurond: a tensor-parallel chat-model server that never hangs when a rank fails."""


def version() -> str:
    """The installed distribution's version (the wheel's, also inside the Debian package)."""
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("neurond")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"
