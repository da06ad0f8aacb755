"""The Debian package as an operator meets it: built by `packaging/build-deb` (twice, two versions), then
installed, run, upgraded, removed and purged with dpkg on this machine's Debian. All of it happens in a
copy-on-write view of the machine (tests/packaging/overlay-root.sh: / overlaid in a private mount namespace),
so the machine is never changed and two runs of this test cannot collide. Root only; skipped elsewhere (failed
in CI, CI=true).

It shows: the packaged venv runs from /opt/neurond (nothing of the build directory left in it, no bytecode
written at run time), the unit passes `systemd-analyze verify`, postinst makes the user, directories, catalog
and admin token, the daemon starts with the packaged configuration and `neurond status` reads it, the wheel
inside carries the files `neurond install-system-files` needs, an edited conffile survives the upgrade, and
remove/purge leave what Debian's rules say and nothing more."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from neurond.observe.catalog import MESSAGES
from neurond.sysfiles import installed_config
from tests.conftest import REPO, free_port, need_root

OVERLAY = Path(__file__).with_name("overlay-root.sh")
BUILD = REPO / "packaging" / "build-deb"
UNIT = "/usr/lib/systemd/system/neurond.service"
AN_ID = next(iter(MESSAGES.values())).message_id
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def need_dpkg_and_overlay(tmp_path: Path) -> None:
    need_root("installing a package needs root")
    for tool in ("dpkg", "dpkg-deb", "unshare", "chroot", "systemd-analyze"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (not a Debian machine?)")
    if subprocess.run(["/usr/bin/python3.11", "-m", "pip", "--version"], capture_output=True).returncode != 0:
        pytest.skip("build-deb needs Debian's python3.11 with pip (apt-get install python3-pip)")
    probe = tmp_path / "probe"
    for d in ("upper", "work", "root"):
        (probe / d).mkdir(parents=True)
    mount = (f"mount -t overlay overlay -o lowerdir=/,upperdir={probe}/upper,workdir={probe}/work {probe}/root")
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", mount], capture_output=True)
    shutil.rmtree(probe)
    if proc.returncode != 0:
        pytest.skip(f"no overlay mounts in a private namespace here: {proc.stderr.decode().strip()}")


class View:
    """The machine as seen through the overlay in STATE; each run() is a fresh namespace on the same state."""

    def __init__(self, state: Path, share: Path) -> None:
        self.state, self.share = state, share

    def run(self, script: str, check: bool = True, timeout: float = 300) -> str:
        proc = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", str(OVERLAY), str(self.state),
                               str(self.share), "sh", "-ec", script], capture_output=True, text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, \
                f"{script}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
        return proc.stdout

    def exists(self, *paths: str) -> dict[str, bool]:
        out = self.run("".join(f'[ -e "{p}" ] || [ -L "{p}" ] && echo "{p} yes" || echo "{p} no"\n' for p in paths))
        return {line.rsplit(" ", 1)[0]: line.endswith(" yes") for line in out.splitlines()}


def build(version: str, out: Path, cache: Path) -> Path:
    proc = subprocess.run(["bash", str(BUILD), "--version", version, "--out", str(out), "--venv-cache", str(cache),
                           "--compress", "none"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    deb = Path(proc.stdout.strip().splitlines()[-1])
    assert deb == out / f"neurond_{version}_amd64.deb" and deb.is_file()
    return deb


def test_build_install_run_upgrade_remove_purge(tmp_path, builtin_model):
    need_dpkg_and_overlay(tmp_path)
    share = tmp_path / "share"
    try:
        first = build(f"{VERSION}-1", share, tmp_path / "venv-cache")
        second = build(f"{VERSION}-2", share, tmp_path / "venv-cache")  # reuses the dependencies' venv
        shutil.copytree(builtin_model, share / "cache" / builtin_model.name)
        view = View(tmp_path / "view", share)
        installed(view, first)
        runs(view)
        upgraded(view, second)
        removed(view)
        purged(view)
    finally:  # gigabytes: never leave them to pytest's retention of old temporary directories
        for name in ("view", "share", "venv-cache"):
            shutil.rmtree(tmp_path / name, ignore_errors=True)


def installed(view: View, deb: Path) -> None:
    view.run(f"dpkg --force-unsafe-io -i /share/{deb.name}")
    version = deb.name.split("_")[1]
    assert view.run("dpkg-query -W -f '${Status} ${Version}' neurond") == f"install ok installed {version}"
    # the unit, as installed, passes verify (ExecStart= names the packaged neurond, which exists): not a word
    out = view.run(f"grep '^ExecStart=' {UNIT}; systemd-analyze verify --man=no {UNIT} 2>&1")
    assert out == "ExecStart=/opt/neurond/venv/bin/neurond serve\n", out
    # postinst: user, directories, admin token, catalog database, enabled for boot
    facts = view.run("id -un neurond; stat -c '%U:%G %a' /var/lib/neurond /var/cache/neurond /etc/neurond/admin.token;"
                     "wc -c < /etc/neurond/admin.token; journalctl --list-catalog | grep -c ' neurond: ';"
                     "readlink /etc/systemd/system/multi-user.target.wants/neurond.service").split("\n")
    assert facts[:5] == ["neurond", "neurond:neurond 750", "neurond:neurond 750", "root:neurond 640", "65"], facts
    assert int(facts[5]) == len(MESSAGES) and facts[6].endswith("/systemd/system/neurond.service")
    assert view.run("cat /etc/neurond/neurond.toml") == installed_config()
    assert view.run("neurond --version") == f"neurond {VERSION}\n"
    # nothing of the build's paths in the venv, and the interpreter is Debian's
    assert view.run("readlink -f /opt/neurond/venv/bin/python").strip() == "/usr/bin/python3.11"
    assert view.run("head -1 /opt/neurond/venv/bin/neurond") == "#!/opt/neurond/venv/bin/python\n"


def runs(view: View) -> None:
    """The daemon from the package, with the packaged configuration, as root (no systemd in the view, so the
    runtime directory the unit would make is made by hand); `neurond status` reads it via the admin socket."""
    port = free_port()
    out = view.run(f"""
        mkdir -p /run/neurond
        neurond serve --device cpu --port {port} --cache-dir /share/cache > /tmp/daemon.log 2>&1 &
        pid=$!
        i=0
        until neurond status > /tmp/status.txt 2>&1; do
            i=$((i + 1))
            if [ $i -gt 600 ] || ! kill -0 $pid; then cat /tmp/status.txt /tmp/daemon.log; kill $pid; exit 1; fi
            sleep 0.2
        done
        cat /tmp/status.txt
        kill -TERM $pid
        wait $pid
        # every file under /opt/neurond is the package's: no bytecode was written at run time
        echo "--- not from the package:"
        dpkg -L neurond | sort > /tmp/packaged
        find /opt/neurond | sort | comm -13 /tmp/packaged -
        """, timeout=240)
    status, strays = out.split("--- not from the package:\n")
    assert status.startswith("neurond: healthy for ") and "  model      neurond-builtin  tp_size=1" in status, out
    assert strays == "", strays


def upgraded(view: View, deb: Path) -> None:
    token = view.run("cat /etc/neurond/admin.token")
    view.run("echo 'port = 8123  # the operator was here' >> /etc/neurond/neurond.toml")
    # A token others can read (an operator's slip, an older installation): neurond would refuse to start with it,
    # so postinst gives it back its owner and mode.
    view.run("chmod 0666 /etc/neurond/admin.token && chown root:root /etc/neurond/admin.token")
    view.run(f"dpkg --force-unsafe-io -i /share/{deb.name}")
    assert view.run("dpkg-query -W -f '${Version}' neurond") == deb.name.split("_")[1]
    assert view.run("tail -1 /etc/neurond/neurond.toml") == "port = 8123  # the operator was here\n"
    assert view.run("cat /etc/neurond/admin.token") == token
    assert view.run("stat -c '%U:%G %a' /etc/neurond/admin.token") == "root:neurond 640\n"
    assert view.run("ls /etc/neurond") == "admin.token\nneurond.toml\n"  # no .dpkg-dist: the conffile was kept
    # the pip way, from the installed wheel's data files, into the live (viewed) system: files and activation
    out = view.run(f"neurond install-system-files --prefix /usr/local; grep '^ExecStart=' /usr/local{UNIT[4:]};"
                   f"systemd-analyze verify --man=no /usr/local{UNIT[4:]} 2>&1")
    assert "ran journalctl --update-catalog" in out
    assert "installed /usr/local/share/neurond/journal-queries/mttr.sh" in out
    assert "ExecStart=/opt/neurond/venv/bin/neurond serve\n" in out and "neurond.service:" not in out, out
    view.run("rm -r /usr/local/lib/systemd/system/neurond.service /usr/local/lib/systemd/catalog/neurond.catalog "
             "/usr/local/lib/sysusers.d/neurond.conf /usr/local/lib/tmpfiles.d/neurond.conf /usr/local/share/neurond")


def removed(view: View) -> None:
    view.run("dpkg -r neurond")
    assert view.run("dpkg-query -W -f '${Status}' neurond") == "deinstall ok config-files"
    there = view.exists(UNIT, "/opt/neurond", "/usr/bin/neurond", "/etc/neurond/neurond.toml",
                        "/etc/neurond/admin.token", "/var/lib/neurond")
    assert there == {UNIT: False, "/opt/neurond": False, "/usr/bin/neurond": False, "/etc/neurond/neurond.toml": True,
                     "/etc/neurond/admin.token": True, "/var/lib/neurond": True}
    assert view.run("readlink /etc/systemd/system/neurond.service") == "/dev/null\n"  # masked until purge
    assert AN_ID not in view.run("journalctl --list-catalog")


def purged(view: View) -> None:
    view.run("dpkg -P neurond")
    assert view.run("dpkg-query -W -f '${Status}' neurond 2>&1 || true").startswith("dpkg-query: no packages found")
    gone = ("/etc/neurond", "/var/lib/neurond", "/var/cache/neurond", "/opt/neurond",
            "/etc/systemd/system/neurond.service", "/etc/systemd/system/multi-user.target.wants/neurond.service")
    assert view.exists(*gone) == dict.fromkeys(gone, False)
    assert view.run("id -un neurond") == "neurond\n"  # system users stay, as in Debian's own packages
