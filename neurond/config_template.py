"""The default /etc/neurond/neurond.toml, generated from Config (neurond/config.py): every setting, commented
out at its default, under the comment written above it there. The Debian package ships it as a conffile and
`neurond install-system-files` installs it when none exists; `neurond default-config` prints it."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping
from typing import Any

from neurond.config import DEFAULT_CONFIG_PATH, ENV_PREFIX, settings

HEADER = f"""\
# {DEFAULT_CONFIG_PATH}: neurond's configuration.
#
# Every setting is listed below, commented out at its built-in default, with what it means. Uncomment and
# change what you need, then `systemctl restart neurond` (model settings) or `systemctl reload neurond`
# (reloads the model from its checkpoint with the settings the daemon started with).
# Precedence, lowest first: built-in defaults, this file, {ENV_PREFIX}<NAME> environment variables (e.g. in a
# drop-in from `systemctl edit neurond`), command-line flags. An unknown setting is an error (exit code 2).
# Generated from neurond/config.py (`neurond default-config`); docs/operator-guide.md explains the settings.
"""


def toml_value(value: object) -> str:
    """A TOML literal for a default: booleans, integers, floats and strings are all Config holds."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for everything Config's defaults contain
    raise TypeError(f"no TOML form for {value!r}")


def render_default_toml(installed: Mapping[str, Any] | None = None) -> str:
    """Every setting commented out at its default; those in `installed` set (uncommented) to that value."""
    installed = installed or {}
    out, section = [HEADER], None
    for s in settings():
        if s.section != section:
            section = s.section
            out.append(f"\n# --- {section} ---\n")
        out.append("\n" + "".join(f"# {line}\n" for line in textwrap.wrap(s.comment, 108)))
        if s.name in installed:
            out.append(f"# Set by the installer (default {toml_value(s.default)}).\n"
                       f"{s.name} = {toml_value(installed[s.name])}\n")
        else:
            out.append(f"#{s.name} = {toml_value(s.default)}\n")
    return "".join(out)
