"""The encrypted-file engine without FUSE, keys from a real SoftHSM2 token.

A seeded model test compares CryptFile with a bytearray through thousands of writes (as the
mount makes them: into blocks held in memory where possible, including the cached last block),
truncates, reads, flushes and reopenings; tamper and crash tests check what a reader sees.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from vcfs.config import load_config
from vcfs.core.layout import BLOCK_OVERHEAD, BLOCK_SIZE, CIPHER_BLOCK_SIZE, HEADER_LEN, block_no_to_cipher_off
from vcfs.cryptfile import CryptFile, create_cryptfile, open_cryptfile
from vcfs.errors import BlockAuthError, IntegrityError, TruncatedError
from vcfs.keys.provider import Pkcs11Provider
from vcfs.keys.setup import HostKeyOptions, open_provider


@pytest.fixture
def provider(store: Path) -> Iterator[Pkcs11Provider]:
    p = open_provider(load_config(store), HostKeyOptions())
    yield p
    p.close()


def _create(provider: Pkcs11Provider, path: Path) -> CryptFile:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    ref = provider.current("default")
    return create_cryptfile(fd, str(path), lambda dek: provider.wrap(ref, dek))


def _reopen(provider: Pkcs11Provider, path: Path) -> CryptFile:
    return open_cryptfile(os.open(path, os.O_RDWR), str(path), provider.unwrap)


def _write_file(provider: Pkcs11Provider, path: Path, data: bytes) -> None:
    cf = _create(provider, path)
    cf.write(0, data)
    cf.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_model_random_operations(provider: Pkcs11Provider, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    path = tmp_path / "f"
    model = bytearray()
    cf = _create(provider, path)
    try:
        for step in range(1500):
            op = rng.random()
            if op < 0.45:
                off = rng.choice([len(model), rng.randrange(0, len(model) + 3 * BLOCK_SIZE)])
                data = rng.randbytes(rng.choice([1, 100, 4096, BLOCK_SIZE, BLOCK_SIZE + 7, 300_000]))
                if rng.random() < 0.5:  # as the mount writes: into a block held in memory if it can
                    assert cf.try_write_buffered(off, data) or cf.write(off, data) == len(data)
                else:  # a caller's mutable buffer: the engine must copy it, not keep a view
                    buf = bytearray(data)
                    cf.write(off, buf)
                    buf[:] = bytes(len(buf))
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off : off + len(data)] = data
            elif op < 0.55:
                size = rng.randrange(0, len(model) + 2 * BLOCK_SIZE)
                cf.truncate(size)
                del model[size:]
                model.extend(bytes(size - len(model)))
            elif op < 0.85:
                off = rng.randrange(0, len(model) + 10)
                n = rng.choice([1, 4096, BLOCK_SIZE, 200_000])
                assert cf.read(off, n) == bytes(model[off : off + n]), f"seed {seed} step {step}"
            elif op < 0.92:
                cf.fsync() if rng.random() < 0.5 else cf.flush()
            else:
                cf.close()
                cf = _reopen(provider, path)
            assert cf.size == len(model)
    finally:
        cf.close()
    cf = _reopen(provider, path)
    assert cf.read(0, len(model) + 1) == bytes(model)
    cf.close()


def test_small_sequential_writes_stay_in_memory(provider: Pkcs11Provider, tmp_path: Path) -> None:
    """A recorder's 4 KiB appends fill the open block in memory: no seal until it is full."""
    cf = _create(provider, tmp_path / "rec")
    seals_before = cf.seals_used
    for i in range(15):
        assert cf.try_write_buffered(i * 4096, b"x" * 4096) or cf.write(i * 4096, b"x" * 4096)
    assert cf.seals_used == seals_before
    assert cf.read(0, 15 * 4096) == b"x" * 15 * 4096
    cf.close()


def test_seal_count_is_persisted_exactly_at_close(provider: Pkcs11Provider, tmp_path: Path) -> None:
    path = tmp_path / "count"
    _write_file(provider, path, os.urandom(5 * BLOCK_SIZE))
    cf = _reopen(provider, path)
    assert cf.seals_persisted == cf.seals_used  # reservation released to the exact count
    cf.close()


def test_truncation_at_block_boundary_is_detected(provider: Pkcs11Provider, tmp_path: Path) -> None:
    path = tmp_path / "t"
    data = os.urandom(3 * BLOCK_SIZE + 100)
    _write_file(provider, path, data)
    os.truncate(path, block_no_to_cipher_off(2))  # drop blocks 2 and 3
    cf = _reopen(provider, path)
    assert cf.read(0, BLOCK_SIZE) == data[:BLOCK_SIZE]  # the rest of the file stays readable
    with pytest.raises(TruncatedError):
        cf.read(BLOCK_SIZE, BLOCK_SIZE)
    cf.close()


def test_appended_block_is_detected(provider: Pkcs11Provider, tmp_path: Path) -> None:
    path = tmp_path / "a"
    data = os.urandom(2 * BLOCK_SIZE)
    _write_file(provider, path, data)
    raw = path.read_bytes()
    path.write_bytes(raw + raw[HEADER_LEN : HEADER_LEN + CIPHER_BLOCK_SIZE])
    cf = _reopen(provider, path)
    with pytest.raises(IntegrityError):
        cf.read(0, 3 * BLOCK_SIZE)
    cf.close()


def test_bit_flip_fails_only_its_block(provider: Pkcs11Provider, tmp_path: Path) -> None:
    path = tmp_path / "b"
    data = os.urandom(4 * BLOCK_SIZE)
    _write_file(provider, path, data)
    raw = bytearray(path.read_bytes())
    raw[block_no_to_cipher_off(1) + 100] ^= 0x04
    path.write_bytes(raw)
    cf = _reopen(provider, path)
    with pytest.raises(BlockAuthError) as info:
        cf.read(BLOCK_SIZE, 10)
    assert info.value.block_no == 1
    assert cf.read(2 * BLOCK_SIZE, 2 * BLOCK_SIZE) == data[2 * BLOCK_SIZE :]
    cf.close()


def test_crash_between_new_end_and_reseal_leaves_file_readable(provider: Pkcs11Provider, tmp_path: Path) -> None:
    """Simulate the crash window of an extension: the old end still sealed final, a new final after it."""
    a = tmp_path / "grown"
    data = os.urandom(2 * BLOCK_SIZE + 500)
    _write_file(provider, a, data[: 2 * BLOCK_SIZE])  # block 1 sealed final
    cf = _reopen(provider, a)
    cf.write(2 * BLOCK_SIZE, data[2 * BLOCK_SIZE :])
    cf.close()
    # Put block 1 back sealed final, as it was before the extension, as a crash would leave it.
    raw_old = bytearray(a.read_bytes())
    cf = _reopen(provider, a)
    final_one = cf._seal(1, True, data[BLOCK_SIZE : 2 * BLOCK_SIZE])
    cf.close()
    raw_old[block_no_to_cipher_off(1) : block_no_to_cipher_off(2)] = final_one
    a.write_bytes(raw_old)
    cf = _reopen(provider, a)
    assert cf.read(0, len(data)) == data
    cf.close()


@pytest.mark.parametrize("cut", [10, BLOCK_OVERHEAD - 1, 1000])
def test_torn_tail_is_detected(provider: Pkcs11Provider, tmp_path: Path, cut: int) -> None:
    """A file cut inside a block: the last whole block must prove it is final, and cannot."""
    path = tmp_path / "torn"
    data = os.urandom(2 * BLOCK_SIZE + 5000)
    _write_file(provider, path, data)
    os.truncate(path, block_no_to_cipher_off(2) + cut)
    cf = _reopen(provider, path)
    assert cf.read(0, BLOCK_SIZE) == data[:BLOCK_SIZE]
    with pytest.raises(IntegrityError):
        cf.read(0, 3 * BLOCK_SIZE)
    cf.close()


def test_header_only_file_does_not_open(provider: Pkcs11Provider, tmp_path: Path) -> None:
    path = tmp_path / "cut"
    _write_file(provider, path, b"abc")
    os.truncate(path, HEADER_LEN + 5)
    with pytest.raises(TruncatedError):
        _reopen(provider, path)
