"""The `neurond` command line."""

from __future__ import annotations

import argparse
import os
import sys

from neurond.config import DEFAULT_CONFIG_PATH, ENV_PREFIX, ConfigError, describe_settings, load_config

DESCRIPTION = f"""\
neurond serves a chat model with tensor parallelism (one worker process per GPU rank) behind an
OpenAI-compatible HTTP API, and repairs its rank pool by itself when a rank fails.

Configuration is read in one place, lowest precedence first: built-in defaults, the TOML file
(default {DEFAULT_CONFIG_PATH}, or --config), NEUROND_* environment variables (e.g. NEUROND_TP_SIZE=2), then flags.
"""


def _parser() -> argparse.ArgumentParser:
    from neurond import version

    parser = argparse.ArgumentParser(prog="neurond", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"neurond {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)

    audit = sub.add_parser(
        "audit",
        help="audit recovery from the journal (this host, or a fleet's gathered journals)",
        description="Rebuild every incident per host from neurond's journal entries, classify it (clean, "
        "degraded, stuck, gave_up; interrupted and open are informational) and print a fleet table. Exit code: 0 "
        "nothing needs an operator, 1 a degraded recovery, 2 an incident stuck or given up, 3 journal unreadable.",
    )
    from neurond.observe.audit import add_arguments

    add_arguments(audit)

    status = sub.add_parser(
        "status",
        help="the running daemon at a glance: state, model, uptime, incidents, last transition, load progress",
        description="Ask the running daemon over its admin socket (admin_socket and admin_token_file in the "
        "configuration). Exit code: 0 healthy, 1 not serving (loading, repairing, unloaded), 2 cannot ask (not "
        "configured, token unreadable or refused), 3 no daemon answers on the socket.",
    )
    from neurond.status import add_arguments as status_arguments

    status_arguments(status)

    system = sub.add_parser(
        "install-system-files",
        help="install the systemd unit, journal catalog, saved queries, sysusers/tmpfiles entries and a default "
        "configuration (for pip installs; the Debian package ships them)",
        description="Install the files that make neurond a system service. Into / (the default) it also creates "
        "the neurond user and directories, rebuilds the journal catalog, writes a random admin token to "
        "/etc/neurond/admin.token once and runs systemctl daemon-reload. An existing /etc/neurond/neurond.toml is "
        "never overwritten.",
    )
    from neurond.sysfiles import add_arguments as system_arguments

    system_arguments(system)
    sub.add_parser("default-config", help="print the commented default configuration (every setting)")

    model = sub.add_parser("builtin-model", help="write the built-in model and print its directory")
    model.add_argument("--cache-dir", dest="cache_dir", help="where to write it")
    model.add_argument("--config", help="TOML file")
    return parser


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`neurond serve`: its help lists every setting; its flags but --config, each the setting of the same name
    (dashes for underscores), override the configuration file and the environment."""
    serve = sub.add_parser(
        "serve",
        help="run the daemon: HTTP API + rank pool",
        description="Run the daemon. Without --model it serves the built-in model (seeded random weights: "
        "its output is random text), written to the cache directory on first use.\n\nSettings (TOML key = "
        "default; env NEUROND_<KEY>):\n" + describe_settings(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--config", help=f"TOML file (default {DEFAULT_CONFIG_PATH} if it exists)")
    serve.add_argument("--model", help="Hugging Face checkpoint directory (default: the built-in model)")
    serve.add_argument("--served-model-name", dest="served_model_name", help="model name clients use")
    serve.add_argument("--tp-size", dest="tp_size", type=int, help="rank worker processes (one per GPU)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000)")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the ranks run")
    serve.add_argument("--backend", choices=["auto", "nccl", "gloo"], help="collective backend")
    serve.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], help="weight dtype")
    serve.add_argument("--cache-dir", dest="cache_dir", help="where the built-in model is written")
    serve.add_argument("--log-level", dest="log_level", choices=["debug", "info", "warning", "error"])


def _overrides(args: argparse.Namespace) -> dict:
    skip = {"command", "config"}
    return {k: v for k, v in vars(args).items() if k not in skip}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "audit":  # reads journals only: no neurond configuration needed on the auditing box
        from neurond.observe.audit import main as audit

        return audit(args)
    if args.command == "status":  # reads the configuration itself, to find the admin socket
        from neurond.status import main as status

        return status(args)
    if args.command == "install-system-files":
        from neurond.sysfiles import main as install_system_files

        return install_system_files(args)
    if args.command == "default-config":
        from neurond.sysfiles import installed_config

        print(installed_config(), end="")
        return 0
    try:
        config = load_config(args.config, overrides=_overrides(args))
    except ConfigError as exc:
        if args.command != "serve":
            print(f"neurond: configuration error: {exc}", file=sys.stderr)
            return 2
        from neurond.server import named_file, startup_failed

        files = (args.config, os.environ.get(ENV_PREFIX + "CONFIG"), str(DEFAULT_CONFIG_PATH))
        return startup_failed("config", str(exc), named_file(str(exc), *(f for f in files if f)))
    from neurond.observe.journal import setup_logging

    setup_logging(config.log_level)  # journald entries (with CODE_* of the caller) and/or stderr lines
    if args.command == "builtin-model":
        from pathlib import Path

        from neurond.models.builtin import ensure_builtin_model

        print(ensure_builtin_model(Path(config.cache_dir)))
        return 0
    from neurond.server import serve

    return serve(config)  # start-up errors about the configuration or the model: EXIT_CONFIG (2), journaled


if __name__ == "__main__":
    sys.exit(main())
