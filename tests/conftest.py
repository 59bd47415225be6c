"""Shared fixtures: a real SoftHSM2 token under a throwaway VCFS_HOME, real stores, real mounts.

Nothing here is mocked. Under CI=true a missing prerequisite (no /dev/fuse, no softhsm2,
no ffmpeg) fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vcfs.config import load_config
from vcfs.errors import UsageError
from vcfs.keys.setup import HostKeyOptions, forget_tokens
from vcfs.offline import OfflineStore, open_store

VCFS = [sys.executable, "-m", "vcfs"]


def require(condition: bool, what: str) -> None:
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"prerequisite missing under CI: {what}")
    pytest.skip(f"prerequisite missing: {what}")


@pytest.fixture(scope="session")
def vcfs_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One embedded token for the whole session (token creation is the slow part)."""
    home = tmp_path_factory.mktemp("vcfs-home")
    os.environ["VCFS_HOME"] = str(home)
    os.environ.pop("SOFTHSM2_CONF", None)
    require(shutil.which("softhsm2-util") is not None, "softhsm2 (apt-get install softhsm2)")
    return home


def run_vcfs(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess, as a user would."""
    res = subprocess.run([*VCFS, *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    if check and res.returncode != 0:
        raise AssertionError(f"vcfs {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


@dataclass
class Mounted:
    backing: Path
    mnt: Path

    @property
    def tree(self) -> Path:
        return self.backing / "files"

    def _store(self) -> OfflineStore:
        # The test process outlives tokens made by CLI subprocesses (keys domain add): look again.
        forget_tokens(load_config(self.backing), HostKeyOptions())
        return open_store(self.backing, HostKeyOptions())

    def backing_of(self, rel: str) -> Path:
        """The backing path of plaintext path ``rel`` (stores encrypt names by default)."""
        store = self._store()
        try:
            return store.backing_of(rel)
        finally:
            store.close()

    def backing_if_exists(self, rel: str) -> Path | None:
        try:
            return self.backing_of(rel)
        except UsageError:
            return None

    def backing_names(self, rel_dir: str = "/") -> list[str]:
        """The plaintext names the backing directory of ``rel_dir`` holds, read offline (not through the mount)."""
        store = self._store()
        try:
            path = os.fsencode(store.backing_of(rel_dir))
            good, bad = store.names.list_dir(path, store.names.dir_key(path, os.fsencode("/" + rel_dir.strip("/"))))
            assert not bad, bad
            return sorted(os.fsdecode(item.name) for item in good)
        finally:
            store.close()

    def backing_target(self, rel: str) -> str:
        """The stored target of the symlink at ``rel``, decrypted offline."""
        store = self._store()
        try:
            path = os.fsencode(store.backing_of(rel))
            parent = os.path.dirname(path)
            dk = store.names.dir_key(parent, os.fsencode(os.path.dirname("/" + rel.strip("/"))))
            return os.fsdecode(store.names.load_target(dk, os.readlink(path)))
        finally:
            store.close()

    def umount(self) -> None:
        run_vcfs("umount", str(self.mnt))

    def cleanup(self) -> None:
        """End of a fixture: unmount if still mounted; a failed unmount is forced, then re-raised."""
        if is_mounted(self.mnt):
            try:
                self.umount()
            except AssertionError:
                force_unmount(self.mnt)
                raise

    def mount(self) -> None:
        run_vcfs("mount", str(self.backing), str(self.mnt))


def open_to_other_users(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Let other uids traverse to tmp_path: pytest makes its directories 0700, and the default base
    (/tmp/pytest-of-<user>) sits one level above the run's own directory. Only directories that
    lack the bits are touched, so a --basetemp under /tmp leaves /tmp alone."""
    top = tmp_path_factory.getbasetemp().parent
    for d in (tmp_path, *tmp_path.parents):
        mode = os.stat(d).st_mode
        if mode & 0o055 != 0o055:
            os.chmod(d, (mode | 0o755) & 0o7777)
        if d == top:
            break


def force_unmount(mnt: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def is_mounted(mnt: Path) -> bool:
    real = os.path.realpath(mnt)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == real for line in f)


@pytest.fixture
def store(vcfs_home: Path, tmp_path: Path) -> Path:
    backing = tmp_path / "backing"
    run_vcfs("init", str(backing))
    return backing


@pytest.fixture
def mounted(store: Path, tmp_path: Path) -> Iterator[Mounted]:
    require(os.path.exists("/dev/fuse"), "/dev/fuse")
    require(shutil.which("fusermount3") is not None, "fuse3 (apt-get install fuse3)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = Mounted(store, mnt)
    m.mount()
    try:
        yield m
    finally:
        m.cleanup()


@pytest.fixture
def token(vcfs_home: Path) -> Iterator[Any]:
    """A logged-in session on the embedded SoftHSM2 token (the audit tests' HSM)."""
    from vcfs.keys import embedded
    from vcfs.keys.pin import read_pin_file
    from vcfs.keys.pkcs11 import _LOCK, open_session

    embedded.ensure_token(vcfs_home)
    session = open_session(embedded.softhsm_module(), embedded.TOKEN_LABEL, read_pin_file(embedded.pin_path(vcfs_home)))
    try:
        yield session
    finally:
        with _LOCK:
            session.close()
