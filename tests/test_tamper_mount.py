"""Tampering with the backing store while unmounted: the mount answers EIO, never wrong bytes.

Each case damages ciphertext the way an attacker with write access to the backing directory
(or a broken disk) could, then reads through a real mount: the damaged range gives EIO, the
rest of the file and the other file read back exactly, and the daemon log names the backing
file and the block. The limits of docs/THREAT_MODEL.md (whole-file swaps, rollback of a block
to an older version of itself) are pinned as they are, so a change in them shows up here.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Mounted

from vcfs.core.layout import BLOCK_SIZE, CIPHER_BLOCK_SIZE, HEADER_LEN, block_no_to_cipher_off

pytestmark = pytest.mark.mount
DATA_A = bytes(range(256)) * (4 * BLOCK_SIZE // 256) + b"tail-of-a"
DATA_B = os.urandom(4 * BLOCK_SIZE + 9)


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(raw)


def _flip_both_slots(path: Path, offset_in_slot: int) -> None:
    _flip(path, 64 + offset_in_slot)
    _flip(path, 2080 + offset_in_slot)


def _swap_blocks(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    one, two = block_no_to_cipher_off(1), block_no_to_cipher_off(2)
    raw[one:two], raw[two : two + CIPHER_BLOCK_SIZE] = raw[two : two + CIPHER_BLOCK_SIZE], raw[one:two]
    path.write_bytes(raw)


def _block_from_other(path: Path, other: Path) -> None:
    raw = bytearray(path.read_bytes())
    off = block_no_to_cipher_off(1)
    raw[off : off + CIPHER_BLOCK_SIZE] = other.read_bytes()[off : off + CIPHER_BLOCK_SIZE]
    path.write_bytes(raw)


def _header_from_other(path: Path, other: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[:HEADER_LEN] = other.read_bytes()[:HEADER_LEN]
    path.write_bytes(raw)


def _swap_headers(path: Path, other: Path) -> None:
    a, b = path.read_bytes(), other.read_bytes()
    path.write_bytes(b[:HEADER_LEN] + a[HEADER_LEN:])
    other.write_bytes(a[:HEADER_LEN] + b[HEADER_LEN:])


def _copy_block(path: Path, src: int, dst: int) -> None:
    raw = bytearray(path.read_bytes())
    s, d = block_no_to_cipher_off(src), block_no_to_cipher_off(dst)
    raw[d : d + CIPHER_BLOCK_SIZE] = raw[s : s + CIPHER_BLOCK_SIZE]
    path.write_bytes(raw)


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def _read_range(path: Path, off: int, n: int) -> bytes:
    with open(path, "rb", buffering=0) as f:
        f.seek(off)
        return f.read(n)


CASES: dict[str, tuple[Callable[[Path, Path], None], int | None]] = {
    # name: (damage(a, b), first damaged block or None when the whole file is refused)
    "bit flip in block 1": (lambda a, b: _flip(a, block_no_to_cipher_off(1) + 500), 1),
    "bit flip in a tag": (lambda a, b: _flip(a, block_no_to_cipher_off(2) - 1), 1),
    "blocks 1 and 2 swapped": (lambda a, b: _swap_blocks(a), 1),
    "block moved from another file": (lambda a, b: _block_from_other(a, b), 1),
    "truncated at block boundary": (lambda a, b: os.truncate(a, block_no_to_cipher_off(2)), 1),
    "truncated inside a block": (lambda a, b: os.truncate(a, block_no_to_cipher_off(3) + 5000), 3),
    "block 1 copied over block 3": (lambda a, b: _copy_block(a, 1, 3), 3),
    "garbage appended": (lambda a, b: _append(a, os.urandom(70_000)), 4),
    "header from another file": (lambda a, b: _header_from_other(a, b), None),
    "bit flip in file id": (lambda a, b: _flip(a, 20), None),
    # The newest valid slot wins and the other is a fallback, so damage both slots' wrapped DEK
    # (fixed fields 25 bytes + domain "default" 7 bytes precede it in each slot).
    "bit flip in wrapped DEK": (lambda a, b: _flip_both_slots(a, 32 + 5), None),
    "bit flip in one slot only": (lambda a, b: _flip(a, 2080 + 32 + 5), -1),
}


def _log(vcfs_home: Path, m: Mounted) -> str:
    """The daemon log of this mount (vcfs mount names it after the mount point)."""
    path = vcfs_home / "logs" / (os.path.realpath(m.mnt).strip("/").replace("/", "-") + ".log")
    return path.read_text() if path.exists() else ""


@pytest.mark.parametrize("case", list(CASES))
def test_tamper_gives_eio_and_the_rest_stays_readable(mounted: Mounted, vcfs_home: Path, case: str) -> None:
    (mounted.mnt / "a.bin").write_bytes(DATA_A)
    (mounted.mnt / "b.bin").write_bytes(DATA_B)
    mounted.umount()
    damage, bad_block = CASES[case]
    damage(mounted.backing_of("a.bin"), mounted.backing_of("b.bin"))
    logged = len(_log(vcfs_home, mounted))
    mounted.mount()
    a = mounted.mnt / "a.bin"
    if bad_block == -1:
        assert a.read_bytes() == DATA_A  # the other slot still opens the file
    elif bad_block is None:
        with pytest.raises(OSError) as info:
            a.read_bytes()
        assert info.value.errno == errno.EIO
        assert str(mounted.backing_of("a.bin")) in _log(vcfs_home, mounted)[logged:]
    else:
        with pytest.raises(OSError) as info:
            _read_range(a, bad_block * BLOCK_SIZE, BLOCK_SIZE)
        assert info.value.errno == errno.EIO
        for b in range(min(bad_block, 4)):  # every block before the damage still reads
            assert _read_range(a, b * BLOCK_SIZE, BLOCK_SIZE) == DATA_A[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE]
        if bad_block < 3 and os.stat(a).st_size > 4 * BLOCK_SIZE:  # and after it, if the file goes on
            assert _read_range(a, 3 * BLOCK_SIZE, BLOCK_SIZE) == DATA_A[3 * BLOCK_SIZE : 4 * BLOCK_SIZE]
        lines = _log(vcfs_home, mounted)[logged:].splitlines()
        line = next((ln for ln in lines if "authentication failed" in ln), "no log line")
        assert str(mounted.backing_of("a.bin")) in line and f"block {bad_block}" in line, line
    assert (mounted.mnt / "b.bin").read_bytes() == DATA_B  # other files unaffected


def test_swapped_headers_fail_both_files(mounted: Mounted) -> None:
    (mounted.mnt / "a.bin").write_bytes(DATA_A)
    (mounted.mnt / "b.bin").write_bytes(DATA_B)
    (mounted.mnt / "c.bin").write_bytes(b"untouched")
    mounted.umount()
    _swap_headers(mounted.backing_of("a.bin"), mounted.backing_of("b.bin"))
    mounted.mount()
    for name in ("a.bin", "b.bin"):
        with pytest.raises(OSError) as info:
            _read_range(mounted.mnt / name, 0, 100)
        assert info.value.errno == errno.EIO
    assert (mounted.mnt / "c.bin").read_bytes() == b"untouched"


def test_exchanged_backing_files_are_a_stated_limit(mounted: Mounted) -> None:
    """Whole-file swaps are not detected (THREAT_MODEL.md): each name now shows the other's
    authentic content, never a mix and never garbage."""
    (mounted.mnt / "a.bin").write_bytes(DATA_A)
    (mounted.mnt / "b.bin").write_bytes(DATA_B)
    mounted.umount()
    a, b = mounted.backing_of("a.bin"), mounted.backing_of("b.bin")
    tmp = mounted.tree / "swap.tmp"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    mounted.mount()
    assert (mounted.mnt / "a.bin").read_bytes() == DATA_B
    assert (mounted.mnt / "b.bin").read_bytes() == DATA_A


def test_block_rollback_is_a_stated_limit(mounted: Mounted) -> None:
    """A block replaced by an older sealed version of itself (same file, same position) reads
    as that older, authentic content (THREAT_MODEL.md, "Rollback")."""
    (mounted.mnt / "a.bin").write_bytes(DATA_A)
    mounted.umount()
    old = (mounted.backing_of("a.bin")).read_bytes()
    mounted.mount()
    with open(mounted.mnt / "a.bin", "r+b") as f:
        f.seek(BLOCK_SIZE)
        f.write(b"N" * BLOCK_SIZE)
    mounted.umount()
    raw = bytearray((mounted.backing_of("a.bin")).read_bytes())
    one = block_no_to_cipher_off(1)
    raw[one : one + CIPHER_BLOCK_SIZE] = old[one : one + CIPHER_BLOCK_SIZE]
    (mounted.backing_of("a.bin")).write_bytes(raw)
    mounted.mount()
    assert (mounted.mnt / "a.bin").read_bytes() == DATA_A  # the old block 1, undetected


def test_renamed_backing_file_still_opens(mounted: Mounted) -> None:
    """Whole-file moves are not detected in v1 (content is not bound to its name): see THREAT_MODEL.md."""
    (mounted.mnt / "x.bin").write_bytes(b"x" * 1000)
    (mounted.mnt / "y.bin").write_bytes(b"y")
    x, y = mounted.backing_of("x.bin"), mounted.backing_of("y.bin")
    mounted.umount()
    shutil.move(x, y)
    mounted.mount()
    assert (mounted.mnt / "y.bin").read_bytes() == b"x" * 1000
