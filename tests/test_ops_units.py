"""``systemd-analyze verify`` on every unit in systemd/: it must print nothing at all.

verify exits 0 even for unknown keys and unparsable values (it only warns), so any output is
a failure. It also checks that ExecStart= binaries exist: the units name the installed
/usr/local/bin/vcfs, which is rewritten to this checkout's console script (the same program)
so the check runs against a real executable. The template is verified through an instance,
next to the example recorder that binds to that instance.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNITS = sorted(p.name for p in SYSTEMD_DIR.iterdir() if p.suffix in (".service", ".mount", ".socket", ".timer"))
INSTALLED_VCFS = "/usr/local/bin/vcfs"


@pytest.fixture(scope="module")
def unit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require(shutil.which("systemd-analyze") is not None, "systemd (systemd-analyze)")
    here = tmp_path_factory.mktemp("units")
    vcfs = Path(sys.prefix) / "bin" / "vcfs"
    assert vcfs.exists(), f"console script missing: {vcfs}"
    for name in UNITS:
        text = (SYSTEMD_DIR / name).read_text().replace(INSTALLED_VCFS, str(vcfs))
        (here / name).write_text(text)
    (here / "vcfs@srv-recordings.service").symlink_to("vcfs@.service")
    return here


def test_every_unit_is_checked() -> None:
    assert {"vcfs@.service", "recorder-example.service", "srv-recordings.mount"} <= set(UNITS)


@pytest.mark.parametrize("unit", [u if u != "vcfs@.service" else "vcfs@srv-recordings.service" for u in UNITS])
def test_systemd_analyze_verify_prints_nothing(unit_dir: Path, unit: str) -> None:
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:", "SYSTEMD_LOG_COLOR": "0"}
    res = subprocess.run(
        ["systemd-analyze", "verify", str(unit_dir / unit)], capture_output=True, text=True, env=env, timeout=120
    )
    out = (res.stdout + res.stderr).strip()
    assert res.returncode == 0 and out == "", f"systemd-analyze verify {unit}:\n{out}"


def test_the_daemon_unit_keeps_the_mount_visible_and_stops_cleanly() -> None:
    """The options the issue rules out (mount namespaces, ExecStop=, KillMode=none) stay out."""
    active = [
        line.split("=", 1)[0].strip()
        for line in (SYSTEMD_DIR / "vcfs@.service").read_text().splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    ]
    for key in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ReadOnlyPaths", "PrivateMounts"):
        assert key not in active, f"{key}= would hide the FUSE mount from the host"
    assert "ExecStop" not in active
    text = (SYSTEMD_DIR / "vcfs@.service").read_text()
    assert "KillMode=mixed" in text and "Type=notify" in text and "LoadCredential=hsm-pin:" in text
