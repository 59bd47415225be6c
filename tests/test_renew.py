"""DEK renewal: a file near its seal budget moves to a fresh DEK transparently and crash-safely.

The budget is made small through CryptFile's constructor (seal_budget); everything else is
real: SoftHSM2 wraps, a store's backing directory, the rename exchange, a SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vcfs import events
from vcfs.config import load_config
from vcfs.core.layout import BLOCK_SIZE
from vcfs.cryptfile import CryptFile, create_cryptfile, open_cryptfile, renew_threshold
from vcfs.errors import SealLimitError
from vcfs.keys.provider import Pkcs11Provider
from vcfs.keys.setup import HostKeyOptions, open_provider
from vcfs.renew import DekRenewer, clean_leftovers
from vcfs.storelayout import renew_path


@pytest.fixture
def provider(store: Path) -> Iterator[Pkcs11Provider]:
    p = open_provider(load_config(store), HostKeyOptions())
    yield p
    p.close()


def _renewer(store: Path, provider: Pkcs11Provider, swaps: list[tuple[int, int]] | None = None) -> DekRenewer:
    return DekRenewer(
        store, provider.current, provider.wrap, (lambda a, b: swaps.append((a, b))) if swaps is not None else None
    )


def _new(store: Path, provider: Pkcs11Provider, name: str, budget: int, renewer: DekRenewer | None) -> CryptFile:
    path = store / "files" / name
    ref = provider.current("default")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
    return create_cryptfile(fd, str(path), lambda d: provider.wrap(ref, d), seal_budget=budget, renewer=renewer)


def _block(i: int) -> bytes:
    return bytes([i % 251]) * BLOCK_SIZE


def test_file_near_its_budget_gets_a_new_dek(store: Path, provider: Pkcs11Provider) -> None:
    budget = 64
    swaps: list[tuple[int, int]] = []
    seen: list[events.Event] = []
    unsubscribe = events.subscribe(seen.append)
    path = store / "files" / "long-recording.ts"
    try:
        cf = _new(store, provider, path.name, budget, _renewer(store, provider, swaps))
        first_id, ino = cf.file_id, os.stat(path).st_ino
        for i in range(3 * budget):  # an 8-block file rewritten over and over: 3 budgets of seals
            cf.write((i % 8) * BLOCK_SIZE, _block(i))
            cf.flush()
            assert cf.seals_used <= budget
        assert cf.file_id != first_id
        cf.close()
    finally:
        unsubscribe()
    assert swaps and swaps[0][0] == ino and os.stat(path).st_ino == swaps[-1][1]
    renewals = [e for e in seen if e.kind == events.KEY_RENEW]
    assert len(renewals) >= 2 and renewals[0].fields["old_file_id"] == first_id.hex()
    assert all("dek" not in k for e in seen for k in e.fields)
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o640)  # the copy keeps the file's mode
    assert list(renew_path(store).iterdir()) == []
    cf = open_cryptfile(os.open(path, os.O_RDONLY), str(path), provider.unwrap)
    try:
        assert cf.read(0, 8 * BLOCK_SIZE) == b"".join(_block(i) for i in range(3 * budget - 8, 3 * budget))
    finally:
        cf.close()


def test_without_renewal_the_budget_is_a_hard_limit(store: Path, provider: Pkcs11Provider) -> None:
    budget = 32
    cf = _new(store, provider, "capped.ts", budget, None)
    with pytest.raises(SealLimitError):
        for i in range(budget + 1):
            cf.write(i * BLOCK_SIZE, _block(i))
            cf.flush()
    with pytest.raises(SealLimitError):
        cf.close()  # what is still held cannot be sealed either; the file is closed all the same
    assert cf.fd == -1


def test_hard_linked_file_is_not_renewed(store: Path, provider: Pkcs11Provider) -> None:
    """Renewing would split the links (the other names would keep the old inode)."""
    budget = 32
    cf = _new(store, provider, "linked.ts", budget, _renewer(store, provider))
    os.link(store / "files" / "linked.ts", store / "files" / "other-name.ts")
    first_id = cf.file_id
    with pytest.raises(SealLimitError):
        for i in range(budget + 1):
            cf.write(i * BLOCK_SIZE, _block(i))
            cf.flush()
    assert cf.file_id == first_id
    with pytest.raises(SealLimitError):
        cf.close()


CHILD = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from vcfs.config import load_config
    from vcfs.core.layout import BLOCK_SIZE
    from vcfs.cryptfile import open_cryptfile
    from vcfs.keys.setup import HostKeyOptions, open_provider
    from vcfs.renew import DekRenewer
    store, path, budget = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    provider = open_provider(load_config(store), HostKeyOptions())
    renewer = DekRenewer(store, provider.current, provider.wrap)
    cf = open_cryptfile(os.open(path, os.O_RDWR), path, provider.unwrap, seal_budget=budget, renewer=renewer)
    for i in range(64):  # crosses the renewal threshold: the whole file is re-encrypted first
        cf.write(i * BLOCK_SIZE, b"n" * BLOCK_SIZE)
        cf.flush()
    cf.close()
    """
)


def test_crash_during_renewal_leaves_the_file_readable(store: Path, provider: Pkcs11Provider) -> None:
    blocks = 400  # 25 MiB to re-encrypt: long enough to be caught in the middle
    path = store / "files" / "big.ts"
    cf = _new(store, provider, path.name, 1 << 31, None)
    for _round in range(2):  # written twice: about 800 seals used under this DEK
        for i in range(blocks):
            cf.write(i * BLOCK_SIZE, _block(i))
        cf.flush()
    cf.close()
    cf = open_cryptfile(os.open(path, os.O_RDONLY), str(path), provider.unwrap)
    seals, first_id = cf.seals_used, cf.file_id
    cf.close()
    budget = 1000
    assert seals < renew_threshold(budget) < seals + 64 and 2 * blocks < renew_threshold(budget)
    caught = False
    for _attempt in range(3):
        with subprocess.Popen([sys.executable, "-c", CHILD, str(store), str(path), str(budget)]) as child:
            while child.poll() is None and not any(renew_path(store).glob("*.vcfs-renew")):
                time.sleep(0.001)
            child.send_signal(signal.SIGKILL)
        caught = child.returncode == -signal.SIGKILL and any(renew_path(store).glob("*.vcfs-renew"))
        if caught:
            break
    assert caught, "the renewal finished before it could be interrupted"
    cf = open_cryptfile(os.open(path, os.O_RDONLY), str(path), provider.unwrap, allow_damaged=True)
    try:
        assert cf.file_id == first_id  # still the original: the copy was never swapped in
        for i in range(blocks):  # every block authentic: as first written, or as the child rewrote it
            assert cf.read(i * BLOCK_SIZE, BLOCK_SIZE) in (_block(i), b"n" * BLOCK_SIZE)
    finally:
        cf.close()
    assert clean_leftovers(store) == 1 and list(renew_path(store).iterdir()) == []
