"""Rewrap at scale: 10,000 files (VCFS_REWRAP_FILES), kill -9 midway, resume; every file readable.

The files are made directly with CryptFile in the test process (a real SoftHSM2 wrap each),
which is much faster than creating them through FUSE; the rewrap is the real command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import VCFS, run_vcfs

from vcfs.config import load_config
from vcfs.core.header import parse_header
from vcfs.core.layout import HEADER_LEN
from vcfs.cryptfile import create_cryptfile, open_cryptfile
from vcfs.keyops import usage_by_version
from vcfs.keys.base import KeyRef
from vcfs.keys.setup import HostKeyOptions, open_provider

N = int(os.environ.get("VCFS_REWRAP_FILES", "10000"))
PER_DIR = 1000


def _path(tree: Path, i: int) -> Path:
    return tree / f"d{i // PER_DIR:03}" / f"f{i:06}"


def _content(i: int) -> bytes:
    return f"recording {i};".encode() * (i % 9 + 1)


def _version(path: Path) -> int:
    with open(path, "rb") as f:
        return parse_header(f.read(HEADER_LEN)).candidates()[0][1].kek_version


@pytest.mark.slow
def test_rewrap_many_files_killed_midway_then_resumed(vcfs_home: Path, tmp_path: Path) -> None:
    # Plain names: the 10,000 files are written straight into the backing tree, which is quick;
    # rewrap walks a store with encrypted names through the name layer (tests/test_names_*).
    store = tmp_path / "backing"
    run_vcfs("init", str(store), "--plain-names")
    tree = store / "files"
    provider = open_provider(load_config(store), HostKeyOptions())
    try:
        ref = provider.current("default")
        for i in range(N):
            path = _path(tree, i)
            if i % PER_DIR == 0:
                path.parent.mkdir()
            cf = create_cryptfile(
                os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), str(path), lambda d: provider.wrap(ref, d)
            )
            cf.write(0, _content(i))
            cf.close()
    finally:
        provider.close()
    blocks = {i: _path(tree, i).read_bytes()[HEADER_LEN:] for i in range(0, N, 7)}
    run_vcfs("keys", "rotate", str(store), "default")

    marker = _path(tree, N // 3)  # files are rewrapped in path order (two workers: roughly)
    cmd = [*VCFS, "keys", "rewrap", str(store), "--jobs", "2"]
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL) as proc:
        deadline = time.monotonic() + 120
        while _version(marker) != 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    half = usage_by_version(store)
    assert 0 < half.get(KeyRef("default", 2), 0) < N  # really killed midway
    assert sum(half.values()) == N  # and every header still names a KEK
    time.sleep(0.5)
    assert usage_by_version(store) == half  # the workers died with it

    res = run_vcfs("keys", "rewrap", str(store), "--json", timeout=300)
    report = json.loads(res.stdout)
    assert report["failed"] == [] and report["busy"] == []
    assert report["rewrapped"] + report["already"] == N and report["already"] >= half[KeyRef("default", 2)]
    assert usage_by_version(store) == {KeyRef("default", 2): N}
    assert {i: _path(tree, i).read_bytes()[HEADER_LEN:] for i in blocks} == blocks  # no block touched

    run_vcfs("keys", "retire", str(store), "default", "1")
    run_vcfs("keys", "destroy", str(store), "default", "1")  # refused if any file still needed v1
    provider = open_provider(load_config(store), HostKeyOptions())
    try:
        for i in range(N):
            path = _path(tree, i)
            cf = open_cryptfile(os.open(path, os.O_RDONLY), str(path), provider.unwrap)
            try:
                assert cf.key_ref == KeyRef("default", 2)
                assert cf.read(0, 1 << 20) == _content(i)
            finally:
                cf.close()
    finally:
        provider.close()
