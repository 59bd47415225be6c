"""Tampering with the backing store while unmounted: the mount answers EIO, never wrong bytes.

Each case damages ciphertext the way an attacker with write access to the backing directory
(or a broken disk) could, then reads through a real mount.
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
    "header from another file": (lambda a, b: _header_from_other(a, b), None),
    "bit flip in file id": (lambda a, b: _flip(a, 20), None),
    # The newest valid slot wins and the other is a fallback, so damage both slots' wrapped DEK
    # (fixed fields 25 bytes + domain "default" 7 bytes precede it in each slot).
    "bit flip in wrapped DEK": (lambda a, b: _flip_both_slots(a, 32 + 5), None),
    "bit flip in one slot only": (lambda a, b: _flip(a, 2080 + 32 + 5), -1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tamper_gives_eio_and_the_rest_stays_readable(mounted: Mounted, case: str) -> None:
    (mounted.mnt / "a.bin").write_bytes(DATA_A)
    (mounted.mnt / "b.bin").write_bytes(DATA_B)
    mounted.umount()
    damage, bad_block = CASES[case]
    damage(mounted.backing_of("a.bin"), mounted.backing_of("b.bin"))
    mounted.mount()
    a = mounted.mnt / "a.bin"
    if bad_block == -1:
        assert a.read_bytes() == DATA_A  # the other slot still opens the file
    elif bad_block is None:
        with pytest.raises(OSError) as info:
            a.read_bytes()
        assert info.value.errno == errno.EIO
    else:
        with pytest.raises(OSError) as info:
            _read_range(a, bad_block * BLOCK_SIZE, BLOCK_SIZE)
        assert info.value.errno == errno.EIO
        assert _read_range(a, 0, BLOCK_SIZE) == DATA_A[:BLOCK_SIZE]  # damage is contained
    assert (mounted.mnt / "b.bin").read_bytes() == DATA_B  # other files unaffected


def test_renamed_backing_file_still_opens(mounted: Mounted) -> None:
    """Whole-file moves are not detected in v1 (content is not bound to its name): see THREAT_MODEL.md."""
    (mounted.mnt / "x.bin").write_bytes(b"x" * 1000)
    (mounted.mnt / "y.bin").write_bytes(b"y")
    x, y = mounted.backing_of("x.bin"), mounted.backing_of("y.bin")
    mounted.umount()
    shutil.move(x, y)
    mounted.mount()
    assert (mounted.mnt / "y.bin").read_bytes() == b"x" * 1000


def test_auth_failure_is_logged_with_path_and_block(mounted: Mounted, vcfs_home: Path) -> None:
    (mounted.mnt / "log.bin").write_bytes(DATA_A)
    mounted.umount()
    _flip(mounted.backing_of("log.bin"), block_no_to_cipher_off(3) + 9)
    mounted.mount()
    with pytest.raises(OSError):
        (mounted.mnt / "log.bin").read_bytes()
    logs = "".join(p.read_text() for p in (vcfs_home / "logs").glob("*.log"))
    assert "log.bin" in logs and "block 3" in logs
