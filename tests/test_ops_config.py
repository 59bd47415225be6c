"""The host mount config (``vcfs mount --config``): every key parsed, every mistake named with its line."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from conftest import Mounted, is_mounted, require, run_vcfs

from vcfs.errors import ConfigError
from vcfs.mountconfig import FUSE_FLAGS, load_mount_config

EXAMPLE = Path(__file__).resolve().parent.parent / "systemd" / "srv-recordings.toml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.toml"
    path.write_text(text)
    return path


def test_the_shipped_example_parses() -> None:
    cfg = load_mount_config(EXAMPLE)
    assert cfg.mount.mountpoint == Path("/srv/recordings")
    assert cfg.mount.allow_other is True and cfg.mount.options == {"noexec", "noatime"}
    assert cfg.metrics.listen == ("127.0.0.1", 9477)
    assert cfg.control.enabled


def test_every_section(tmp_path: Path) -> None:
    cfg = load_mount_config(
        _write(
            tmp_path,
            '[mount]\nbacking = "/b"\nmountpoint = "/m"\nallow_other = false\noptions = ["ro", "nodev"]\n'
            '[keys]\npkcs11_module = "/usr/lib/x.so"\npin_file = "/etc/vcfs/pin"\n'
            '[metrics]\nlisten = "[::1]:9100"\ntextfile = "/var/lib/t/v.prom"\ninterval = 5\n'
            '[control]\nsocket = "/run/vcfs/x.sock"\n',
        )
    )
    assert (cfg.mount.backing, cfg.mount.mountpoint, cfg.mount.allow_other) == (Path("/b"), Path("/m"), False)
    assert cfg.mount.options == {"ro"}  # nodev is always on, not passed twice
    assert (cfg.keys.pkcs11_module, cfg.keys.pin_file) == ("/usr/lib/x.so", "/etc/vcfs/pin")
    assert cfg.metrics.listen == ("::1", 9100) and cfg.metrics.textfile == Path("/var/lib/t/v.prom")
    assert cfg.metrics.interval == 5.0
    assert cfg.control.socket == Path("/run/vcfs/x.sock")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[mount]\nbacking = "/b"\n\n[metrics]\nlisten = "0.0.0.0:9477"\n', "line 5: metrics.listen: '0.0.0.0:9477'"),
        ('[mount]\nbackng = "/b"\n', "line 2: mount.backng: unknown key"),
        ("[mount]\nallow_other = 1\n", "line 2: mount.allow_other: must be true or false"),
        ('[mount]\nbacking = "relative/dir"\n', "line 2: mount.backing: must be an absolute path"),
        ('[mount]\noptions = ["suid"]\n', "line 2: mount.options: 'suid' is not a mount flag"),
        ('[keys]\npin = "1234"\n', "line 2: keys.pin: a PIN never goes in a config file"),
        ("[metrics]\ninterval = 0\n", "line 2: metrics.interval: must be between 1 and 3600"),
        ('[metrics]\ntextfile = "/tmp/x.txt"\n', "line 2: metrics.textfile: must end in .prom"),
        ("[polcy]\n", "line 1: polcy: unknown table"),
        ("[mount\n", "is not valid TOML"),
    ],
)
def test_bad_values_are_named_with_their_line(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_mount_config(_write(tmp_path, text))
    assert expected in err.value.message


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_mount_config(_write(tmp_path, "[mount]\nallow_other = 1\ndebug = 2\n"))
    assert "line 2" in err.value.message and "line 3" in err.value.message


def test_cli_reports_a_bad_config_with_exit_3(tmp_path: Path, vcfs_home: Path) -> None:
    cfg = _write(tmp_path, '[metrics]\nlisten = "192.0.2.1:9477"\n')
    res = run_vcfs("mount", "--config", str(cfg), str(tmp_path), str(tmp_path), check=False)
    assert res.returncode == 3
    assert "line 2: metrics.listen" in res.stderr and "Traceback" not in res.stderr
    res = run_vcfs("mount", "--config", str(tmp_path / "missing.toml"), check=False)
    assert res.returncode == 3 and "not found" in res.stderr


def test_mount_from_config_alone_and_flags_override_it(store: Path, tmp_path: Path) -> None:
    require(os.path.exists("/dev/fuse"), "/dev/fuse")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cfg = _write(tmp_path, f'[mount]\nbacking = "{store}"\nmountpoint = "{mnt}"\noptions = ["noexec"]\n')
    run_vcfs("mount", "--config", str(cfg))
    try:
        assert is_mounted(mnt)
        (mnt / "f").write_bytes(b"from the config")
        mounts = Path("/proc/self/mounts").read_text().splitlines()
        opts = next(line.split()[3] for line in mounts if line.split()[1] == str(mnt))
        assert "noexec" in opts.split(",") and "nodev" in opts.split(",") and "nosuid" in opts.split(",")
    finally:
        Mounted(store, mnt).umount()
    # Command-line BACKING and MOUNTPOINT win over the file's (here: a second mount point).
    other = tmp_path / "other"
    other.mkdir()
    run_vcfs("mount", "--config", str(cfg), str(store), str(other))
    try:
        assert is_mounted(other) and not is_mounted(mnt)
        assert (other / "f").read_bytes() == b"from the config"
    finally:
        Mounted(store, other).umount()
    res = run_vcfs("mount", "--config", str(cfg), str(store), check=False)
    assert res.returncode == 2 and "give both BACKING and MOUNTPOINT" in res.stderr


def test_every_mount_flag_reaches_the_kernel(store: Path, tmp_path: Path) -> None:
    """FUSE_FLAGS lists only flags libfuse 3 accepts: all of them at once must mount."""
    require(os.path.exists("/dev/fuse"), "/dev/fuse")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    wanted = sorted(FUSE_FLAGS - {"rw", "exec"})  # the defaults do not show up as such
    run_vcfs("mount", "-o", ",".join(wanted), str(store), str(mnt))
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
        opts = set(next(line.split()[3] for line in mounts if line.split()[1] == str(mnt)).split(","))
        assert set(wanted) <= opts
        with pytest.raises(OSError) as err:
            (mnt / "f").write_bytes(b"x")
        assert err.value.errno == errno.EROFS
    finally:
        Mounted(store, mnt).umount()
