"""The files that make neurond a system service, and `neurond install-system-files`, which installs them.

The same code lays them out for the Debian package (packaging/build-deb, into a staging root) and for a pip
install (into `/` or a chosen root and prefix), so both get the same files:

  PREFIX/lib/systemd/system/neurond.service    the unit, ExecStart= naming this installation's `neurond`
  PREFIX/lib/systemd/catalog/neurond.catalog   the journal message catalog (journalctl -x)
  PREFIX/lib/sysusers.d/neurond.conf           the `neurond` system user
  PREFIX/lib/tmpfiles.d/neurond.conf           /var/lib/neurond, /var/cache/neurond, /etc/neurond
  PREFIX/share/neurond/journal-queries/*.sh    the saved journalctl queries (docs/journal.md)
  /etc/neurond/neurond.toml                    the commented default configuration (never overwritten)

Installed into the live system (root `/`), it also activates them, as the package's postinst does: creates the
user and the directories, rebuilds the catalog database, writes a random admin token (once; one kept from before
gets the owner and mode neurond accepts) and tells systemd.
The static files come from the checkout this module runs from, or from `share/neurond` of the environment
neurond is installed in (the wheel carries them there as data files).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from neurond.config import DEFAULT_CONFIG_PATH
from neurond.config_template import render_default_toml
from neurond.observe.catalog import render_catalog

UNIT_NAME = "neurond.service"
# What the installed configuration sets beyond the defaults: the admin API on the runtime directory the unit
# makes (RuntimeDirectory=neurond), so that `neurond status` works from the start.
ADMIN_SOCKET = "/run/neurond/admin.sock"
ADMIN_TOKEN_FILE = str(DEFAULT_CONFIG_PATH.parent / "admin.token")
INSTALLED_SETTINGS = {"admin_socket": ADMIN_SOCKET, "admin_token_file": ADMIN_TOKEN_FILE}


def source_dir() -> Path:
    """The directory holding systemd/ and journal-queries/ as in the repository: the checkout neurond runs from
    (an editable install, or PYTHONPATH), else share/neurond of the environment the wheel was installed in."""
    candidates = (Path(__file__).resolve().parent.parent, Path(sysconfig.get_path("data")) / "share" / "neurond")
    for candidate in candidates:
        if (candidate / "systemd" / UNIT_NAME).is_file():
            return candidate
    raise FileNotFoundError(f"neurond's system files are in none of {[str(c) for c in candidates]}")


def default_exec() -> str:
    """The `neurond` command of this installation (a virtualenv's bin/, or ~/.local/bin for --user)."""
    beside = Path(sys.executable).parent / "neurond"
    if beside.is_file():
        return str(beside)
    found = shutil.which("neurond")
    if found is None:
        raise FileNotFoundError("no `neurond` command next to this Python or on PATH: pass --exec")
    return found


class Layout:
    """Where each file goes: under `root` (a staging directory, or / itself), below `prefix`; the configuration
    and the admin token below /etc."""

    def __init__(self, root: Path | str = "/", prefix: str = "/usr/local") -> None:
        self.root, self.prefix = Path(root), prefix

        def under(path: str) -> Path:
            return self.root / path.lstrip("/")

        self.unit = under(f"{prefix}/lib/systemd/system/{UNIT_NAME}")
        self.catalog = under(f"{prefix}/lib/systemd/catalog/neurond.catalog")
        self.sysusers = under(f"{prefix}/lib/sysusers.d/neurond.conf")
        self.tmpfiles = under(f"{prefix}/lib/tmpfiles.d/neurond.conf")
        self.queries = under(f"{prefix}/share/neurond/journal-queries")
        self.config = under(str(DEFAULT_CONFIG_PATH))
        self.token = under(ADMIN_TOKEN_FILE)


def unit_text(exec_path: str) -> str:
    """The shipped unit with ExecStart= naming `exec_path` (the rest of the line, `serve`, stays)."""
    text = (source_dir() / "systemd" / UNIT_NAME).read_text()
    text, n = re.subn(r"^ExecStart=\S+", lambda _: f"ExecStart={exec_path}", text, flags=re.M)
    if n != 1:
        raise ValueError(f"expected one ExecStart= in {UNIT_NAME}, found {n}")
    return text


def installed_config() -> str:
    return render_default_toml(INSTALLED_SETTINGS)


def install(layout: Layout, exec_path: str) -> list[Path]:
    """Write every file; returns them. The configuration is written only where none exists yet."""
    src = source_dir()
    written = {
        layout.unit: unit_text(exec_path),
        layout.catalog: render_catalog(),
        layout.sysusers: (src / "systemd" / "neurond.sysusers").read_text(),
        layout.tmpfiles: (src / "systemd" / "neurond.tmpfiles").read_text(),
    }
    for query in sorted((src / "journal-queries").glob("*.sh")):
        written[layout.queries / query.name] = query.read_text()
    if not layout.config.exists():
        written[layout.config] = installed_config()
    for path, text in written.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755 if path.suffix == ".sh" else 0o644)
    return sorted(written)


def activate(layout: Layout) -> list[list[str]]:
    """On the live system: the user, the directories, the catalog database, the admin token, systemd.
    Returns the commands it ran."""
    commands = [["systemd-sysusers", str(layout.sysusers)], ["systemd-tmpfiles", "--create", str(layout.tmpfiles)],
                ["journalctl", "--update-catalog"]]
    for command in commands:
        subprocess.run(command, check=True)
    write_token(layout.token)  # after sysusers: the file belongs to the neurond group
    if Path("/run/systemd/system").is_dir():  # systemd is PID 1 (not a container or a chroot)
        commands.append(["systemctl", "daemon-reload"])
        subprocess.run(commands[-1], check=True)
    return commands


def write_token(path: Path, group: str = "neurond") -> bool:
    """A random admin token readable by root and the neurond group, unless one exists; one kept from before gets
    the same owner and mode (root:neurond 0640: neurond refuses a token file others can read or write), as
    packaging/debian/postinst does, unless it is a symlink (the operator's own arrangement). True when written."""
    if path.is_symlink():
        return False
    if path.exists():
        path.chmod(0o640)
        shutil.chown(path, "root", group)
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.fchmod(fd, 0o640)  # whatever the umask
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    shutil.chown(path, "root", group)
    return True


# ---------------------------------------------------------------------------------------------- the command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default="/", help="install under this directory instead of / (a staging root: "
                        "nothing is activated)")
    parser.add_argument("--prefix", default="/usr/local", help="where unit, catalog, sysusers.d, tmpfiles.d and "
                        "queries go (default /usr/local; the Debian package uses /usr)")
    parser.add_argument("--exec", dest="exec_path", help="the neurond command ExecStart= runs (default: the one "
                        "of this installation)")


def main(args: argparse.Namespace) -> int:
    layout = Layout(Path(args.root), args.prefix)
    try:
        exec_path = args.exec_path or default_exec()
        for path in install(layout, exec_path):
            print(f"installed {path}")
    except (OSError, ValueError) as exc:
        print(f"neurond install-system-files: {exc}", file=sys.stderr)
        return 1
    if layout.root.resolve() != Path("/"):
        print(f"staged under {layout.root}: activate on the target with systemd-sysusers, systemd-tmpfiles "
              "--create, journalctl --update-catalog and systemctl daemon-reload")
        return 0
    try:
        for command in activate(layout):
            print("ran " + " ".join(command))
    except (OSError, subprocess.CalledProcessError, LookupError) as exc:  # LookupError: no neurond group yet
        print(f"neurond install-system-files: activation failed: {exc}", file=sys.stderr)
        return 1
    print(f"next: edit {layout.config}, then systemctl enable --now neurond")
    return 0
