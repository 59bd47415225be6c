"""Odd file names, very long paths and deep trees behave on the mount as on a plain directory.

Names are bytes to the kernel: non-UTF-8 bytes, newlines, tabs, control characters, a
right-to-left override, leading dashes and spaces, 255-byte names (the most ext4 allows) and
256-byte ones (ENAMETOOLONG) go through create, write, read, stat, readdir, rename, mkdir,
symlink and unlink, and every result and errno is compared with a plain directory. Deep
trees go past PATH_MAX: the tree is walked with relative paths (chdir), as programs do, to
10,000-byte paths, and 300 levels of short names; the backing path of such a file is longer
than the user's, which the mount must hide. Then remount, fsck, export and decrypt must reach
the deep files too, and a 250-byte name with a torn tail must be repairable (its quarantine
file name must stay legal).
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Mounted, run_vcfs

from vcfs.core.layout import block_no_to_cipher_off

pytestmark = pytest.mark.mount

NAMES = [
    b"non-utf8-\xff\xfe\x80",
    b"new\nline",
    b"tab\there",
    b"\x01\x02\x1bctl",
    b"\xe2\x80\xaeRTL-override",
    b"-leading-dash",
    b" leading space",
    b"trailing space ",
    b"..two-dots",
    b"x" * 255,
    b"\xc3\xa9" * 127 + b"z",  # 255 bytes of UTF-8
    b"y" * 254 + b"\xff",
]
TOO_LONG = b"z" * 256
DIR250 = b"d" * 250


def _read(path: bytes) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _both(m: Mounted, plain: Path, fn: Callable[[bytes], Any], what: str) -> Any:
    """Run ``fn(root)`` on the mount and on the plain directory: same result or same errno."""
    out = []
    for root in (os.fsencode(m.mnt), os.fsencode(plain)):
        try:
            out.append(("ok", fn(root)))
        except OSError as exc:
            out.append(("errno", errno.errorcode.get(exc.errno or 0, exc.errno)))
    assert out[0] == out[1], f"{what}: mount {out[0]!r}, plain directory {out[1]!r}"
    return out[0][1]


def test_odd_names_behave_as_on_a_plain_directory(mounted: Mounted, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in [*NAMES, TOO_LONG]:

        def ops(root: bytes, name: bytes = name) -> tuple[object, ...]:
            path = os.path.join(root, name)
            with open(path, "wb") as f:
                f.write(b"content of " + name)
            size = os.stat(path).st_size
            data = _read(path)
            listed = name in os.listdir(root)
            renamed = os.path.join(root, b"r-" + name[:200])
            os.rename(path, renamed)
            os.mkdir(path)
            os.symlink(name, os.path.join(path, b"link"))
            target = os.readlink(os.path.join(path, b"link"))
            os.unlink(os.path.join(path, b"link"))
            os.rmdir(path)
            os.unlink(renamed)
            return size, data, listed, target, name in os.listdir(root)

        _both(mounted, plain, ops, f"name {name[:40]!r}")
    assert sorted(os.listdir(os.fsencode(mounted.mnt))) == sorted(os.listdir(os.fsencode(plain))) == []
    # The same names survive a remount (they are stored, not only cached).
    for name in NAMES:
        (mounted.mnt / os.fsdecode(name)).write_bytes(name)
    mounted.umount()
    mounted.mount()
    for name in NAMES:
        assert (mounted.mnt / os.fsdecode(name)).read_bytes() == name


def _deep(root: bytes, levels: int, name: bytes) -> tuple[object, ...]:
    """Build ``levels`` nested directories by relative paths, work in the deepest, come back."""
    start = os.open(".", os.O_RDONLY)
    try:
        os.chdir(root)
        for _ in range(levels):
            os.mkdir(name)
            os.chdir(name)
        with open(b"rec.bin", "wb") as f:
            f.write(b"deep " * 30_000)
        os.symlink(b"rec.bin", b"latest")
        os.link(b"rec.bin", b"hard")
        os.rename(b"rec.bin", b"rec2.bin")
        got = (
            os.path.lexists(b"latest") and not os.path.exists(b"latest"),  # the symlink now dangles
            _read(b"rec2.bin") == b"deep " * 30_000,
            os.stat(b"hard").st_nlink,
            sorted(os.listdir(b".")),
            len(os.getcwd()) - len(os.fsdecode(root)),  # getcwd works that deep
        )
        os.chdir(root)
        os.rename(name, b"top-" + name[:100])  # move the whole subtree: paths under it change
        os.chdir(b"top-" + name[:100])
        for _ in range(levels - 1):
            os.chdir(name)
        return (*got, _read(b"hard")[:10])
    except FileNotFoundError as exc:
        return ("missing", exc.filename)
    finally:
        os.fchdir(start)
        os.close(start)


def test_trees_deeper_than_path_max(mounted: Mounted, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    for case, levels, name in (("40 x 250-byte names", 40, DIR250), ("300 levels", 300, b"s")):
        for root in (mounted.mnt, plain):
            for entry in os.listdir(root):
                os.system(f"rm -rf '{root / entry}'")

        _both(mounted, plain, lambda root, levels=levels, name=name: _deep(root, levels, name), case)
    deepest = os.fsencode(mounted.tree) + b"/top-" + b"s" + b"/s" * 299
    assert len(deepest) < 4096  # the short-name tree; the 250-byte one was removed above


def test_deep_files_survive_remount_and_offline_tools(mounted: Mounted, tmp_path: Path) -> None:
    start = os.open(".", os.O_RDONLY)
    try:
        os.chdir(mounted.mnt)
        for _ in range(20):
            os.mkdir(DIR250)
            os.chdir(DIR250)
        with open(b"deep.bin", "wb") as f:
            f.write(b"0123456789" * 20_000)
    finally:
        os.fchdir(start)
    mounted.umount()
    report = json.loads(run_vcfs("fsck", str(mounted.backing), "--json").stdout)
    assert report["files"] == 1 and report["problems"] == []
    dest = tmp_path / "restore"
    assert json.loads(run_vcfs("export", str(mounted.backing), str(dest), "--json").stdout)["files"] == 1
    try:
        os.chdir(dest)
        for _ in range(20):
            os.chdir(DIR250)
        assert _read(b"deep.bin") == b"0123456789" * 20_000
    finally:
        os.fchdir(start)
    mounted.mount()
    try:
        os.chdir(mounted.mnt)
        for _ in range(20):
            os.chdir(DIR250)
        assert _read(b"deep.bin") == b"0123456789" * 20_000
    finally:
        os.fchdir(start)
        os.close(start)


def test_long_name_with_torn_tail_is_repaired(mounted: Mounted) -> None:
    name = "q" * 250
    (mounted.mnt / name).write_bytes(os.urandom(3 * 65536 + 10))
    mounted.umount()
    os.truncate(mounted.backing_of(name), block_no_to_cipher_off(2) + 100)
    res = run_vcfs("fsck", str(mounted.backing), "--repair", "--json", check=False)
    report = json.loads(res.stdout)
    assert res.returncode == 1, report
    quarantined = mounted.backing / report["problems"][0]["quarantined"]
    assert quarantined.exists() and len(quarantined.name.encode()) <= 255
