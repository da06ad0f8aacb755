"""`neurond install-system-files` for pip users, into a temporary root: every file where systemd and journalctl
look for it, the unit's ExecStart= naming this installation, valid sysusers/tmpfiles/catalog syntax (checked by
the systemd tools themselves, offline), the default configuration generated from Config, an operator's
configuration never overwritten, nothing activated outside the live root, and the wheel carrying the files.
(Activation on a live root runs in tests/packaging/test_deb.py, inside a copy-on-write view of the machine.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from neurond.config import Config, load_config
from neurond.config_template import render_default_toml
from neurond.observe.catalog import render_catalog
from neurond.sysfiles import INSTALLED_SETTINGS, Layout, source_dir
from tests.conftest import REPO

EXE = shutil.which("true") or "/bin/true"  # verify needs ExecStart= to name an existing executable


def install(root: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neurond", "install-system-files", "--root", str(root), "--exec", EXE,
                           *extra], capture_output=True, text=True, timeout=60)


def test_installs_every_file_into_a_root(tmp_path):
    proc = install(tmp_path)
    assert proc.returncode == 0, proc.stderr
    layout = Layout(tmp_path, "/usr/local")
    unit = layout.unit.read_text()
    assert layout.unit == tmp_path / "usr/local/lib/systemd/system/neurond.service"
    assert [line for line in unit.splitlines() if line.startswith("ExecStart=")] == [f"ExecStart={EXE} serve"]
    assert unit.replace(f"ExecStart={EXE}", "ExecStart=/opt/neurond/venv/bin/neurond") == \
        (REPO / "systemd" / "neurond.service").read_text()
    assert layout.catalog.read_text() == render_catalog()
    queries = sorted(p.name for p in layout.queries.iterdir())
    assert queries == sorted(p.name for p in (REPO / "journal-queries").glob("*.sh"))
    assert all(os.access(layout.queries / q, os.X_OK) for q in queries)
    assert "installed " + str(layout.config) in proc.stdout
    assert "staged under" in proc.stdout and not layout.token.exists()  # not the live root: nothing activated


def test_the_configuration_is_every_default_plus_the_admin_socket(tmp_path):
    assert install(tmp_path).returncode == 0
    config_file = Layout(tmp_path).config
    text = config_file.read_text()
    for name in Config.__dataclass_fields__:
        assert f"\n#{name} = " in text or f"\n{name} = " in text, name
    assert load_config(config_file, env={}) == Config(**INSTALLED_SETTINGS)
    # uncommenting every line gives the defaults back: the commented values are the real ones
    everything = tomllib.loads(re.sub(r"^#([a-z_]+ = )", r"\1", text, flags=re.M))
    assert {k: v for k, v in everything.items() if k not in INSTALLED_SETTINGS} == \
        {k: getattr(Config(), k) for k in Config.__dataclass_fields__ if k not in INSTALLED_SETTINGS}
    assert render_default_toml().count("\n#") > len(Config.__dataclass_fields__)


def test_an_existing_configuration_is_kept(tmp_path):
    config_file = Layout(tmp_path).config
    config_file.parent.mkdir(parents=True)
    config_file.write_text('model = "/models/mine"\n')
    assert install(tmp_path).returncode == 0
    assert config_file.read_text() == 'model = "/models/mine"\n'


def test_systemd_tools_accept_the_files(tmp_path):
    for tool in ("systemd-analyze", "systemd-sysusers", "systemd-tmpfiles", "journalctl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    assert install(tmp_path, "--prefix", "/usr").returncode == 0
    layout = Layout(tmp_path, "/usr")
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", str(layout.unit)], capture_output=True, text=True)
    assert verify.returncode == 0 and verify.stderr == "" and verify.stdout == "", verify.stderr
    # sysusers and tmpfiles act on the temporary root only (--root)
    (tmp_path / "etc").mkdir(exist_ok=True)
    for name in ("passwd", "group", "shadow", "gshadow"):
        (tmp_path / "etc" / name).touch()
    users = subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(layout.sysusers)], capture_output=True,
                           text=True)
    assert users.returncode == 0, users.stderr
    assert (tmp_path / "etc/passwd").read_text().startswith("neurond:x:")
    dirs = subprocess.run(["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(layout.tmpfiles)],
                          capture_output=True, text=True)
    assert dirs.returncode == 0, dirs.stderr
    assert oct((tmp_path / "var/lib/neurond").stat().st_mode)[-3:] == "750"
    catalog = subprocess.run(["journalctl", f"--root={tmp_path}", "--update-catalog"], capture_output=True, text=True)
    assert catalog.returncode == 0 and catalog.stderr == "", catalog.stderr
    assert (tmp_path / "var/lib/systemd/catalog/database").exists()


def test_the_wheel_carries_what_install_system_files_reads():
    """pyproject's data-files name every static file neurond/sysfiles.py reads from source_dir()."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    shipped = {Path(dest).relative_to("share/neurond") / Path(src).name
               for dest, sources in data.items() for pattern in sources for src in
               (str(p.relative_to(REPO)) for p in REPO.glob(pattern))}
    read = {p.relative_to(source_dir()) for p in (source_dir() / "systemd").iterdir() if p.suffix != ".catalog"}
    read |= {p.relative_to(source_dir()) for p in (source_dir() / "journal-queries").glob("*.sh")}
    assert shipped == read


def test_unit_user_and_directories_match_sysusers_and_tmpfiles():
    unit = (REPO / "systemd" / "neurond.service").read_text()
    setting = lambda key: re.search(rf"^{key}=(.*)$", unit, re.M).group(1)  # noqa: E731
    user = (REPO / "systemd" / "neurond.sysusers").read_text().split("\nu ")[1].split()[0]
    assert setting("User") == setting("Group") == user == "neurond"
    tmpfiles = (REPO / "systemd" / "neurond.tmpfiles").read_text().splitlines()
    made = {line.split()[1]: line.split()[3:5] for line in tmpfiles if line.startswith("d ")}
    assert made[f"/var/lib/{setting('StateDirectory')}"] == [user, user]
    assert made[f"/var/cache/{setting('CacheDirectory')}"] == [user, user]
    assert Config().cache_dir == f"/var/cache/{setting('CacheDirectory')}"


def test_the_admin_token_is_written_once_and_its_mode_repaired(tmp_path):
    """write_token (install-system-files on a live root, like postinst): a new token is 0640 root:<group>; one
    kept from before keeps its text and gets that owner and mode back, for neurond refuses a token file others
    can read (server.token_file_problem accepts the result); a symlink is the operator's and left alone."""
    import grp
    import stat as st

    from neurond.server import token_file_problem
    from neurond.sysfiles import write_token

    if os.geteuid() != 0:
        pytest.skip("giving a file to root needs root")
    group = grp.getgrgid(0).gr_name  # the neurond group may not exist here: the mechanism is the same
    token = tmp_path / "etc/neurond/admin.token"
    assert write_token(token, group) is True
    text = token.read_text()
    assert len(text) == 65 and text.endswith("\n")
    info = token.stat()
    assert (st.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o640, 0, 0)
    token.chmod(0o666)  # an operator's slip, or an older installation
    assert write_token(token, group) is False
    info = token.stat()
    assert token.read_text() == text and st.S_IMODE(info.st_mode) == 0o640
    assert token_file_problem(info.st_mode, info.st_uid, 1000) is None  # the service user reads it via its group
    elsewhere = tmp_path / "elsewhere.token"
    elsewhere.write_text("mine\n")
    elsewhere.chmod(0o600)
    link = tmp_path / "link.token"
    link.symlink_to(elsewhere)
    assert write_token(link, group) is False
    assert st.S_IMODE(elsewhere.stat().st_mode) == 0o600 and elsewhere.read_text() == "mine\n"

