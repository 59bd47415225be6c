"""The pool of pre-wrapped DEKs for new files (vcfs/keys/dekpool.py).

Unit tests use a counting stand-in for the HSM's wrap (the pool only needs the callable); the
mounted test uses the real SoftHSM2 token: after a rotation while mounted, no new file may be
wrapped under the old KEK, however many pairs were ready for it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import Mounted, run_vcfs

from vcfs.keys.base import KeyRef, Wrapped
from vcfs.keys.dekpool import DekPool

V1, V2 = KeyRef("default", 1), KeyRef("default", 2)


class Wraps:
    """Records every DEK buffer it was given (to check they are overwritten later)."""

    def __init__(self, ref: KeyRef, fail_after: int | None = None) -> None:
        self.ref = ref
        self.seen: list[bytearray] = []
        self.fail_after = fail_after

    def __call__(self, dek: bytearray) -> Wrapped:
        self.seen.append(dek)
        if self.fail_after is not None and len(self.seen) > self.fail_after:
            raise ConnectionError("token gone")
        return Wrapped(self.ref, 1, b"w" + bytes(dek))


def test_take_serves_each_pair_once_in_order_and_misses_when_empty() -> None:
    pool = DekPool(size=4)
    assert pool.take(V1) is None and pool.wanted == {V1}  # asked for: from now on kept filled
    wraps = Wraps(V1)
    assert pool.fill(V1, wraps, 8) == 4 and pool.missing(V1) == 0  # bounded by size
    got = [pool.take(V1) for _ in range(5)]
    assert got[4] is None
    pairs = [g for g in got if g is not None]
    assert [w.blob for _, w in pairs] == [b"w" + bytes(d) for d in wraps.seen]
    assert len({bytes(d) for d, _ in pairs}) == 4  # fresh random keys, none served twice
    assert pool.take(V2) is None  # another KEK's pairs are never served


def test_pairs_of_a_kek_that_stopped_being_current_are_overwritten() -> None:
    pool = DekPool(size=4)
    pool.take(V1)
    wraps = Wraps(V1)
    pool.fill(V1, wraps)
    assert pool.retain([V2]) == 4
    assert all(d == bytearray(32) for d in wraps.seen) and len(pool) == 0 and pool.wanted == set()
    late = Wraps(V1)
    assert pool.fill(V1, late) == 0 and late.seen == []  # no longer wanted: no HSM call for it
    assert pool.fill(V2, late) == 0  # never asked for either


def test_pairs_older_than_max_age_are_overwritten() -> None:
    pool = DekPool(size=2, max_age=0.05)
    pool.take(V1)
    wraps = Wraps(V1)
    pool.fill(V1, wraps)
    time.sleep(0.1)
    assert pool.take(V1) is None  # too old to serve, even before a sweep
    pool.fill(V1, wraps)
    time.sleep(0.1)
    assert pool.sweep() == 2 and len(pool) == 0
    assert all(d == bytearray(32) for d in wraps.seen)


def test_a_failing_wrap_keeps_what_was_made_and_overwrites_its_key() -> None:
    pool = DekPool(size=8)
    pool.take(V1)
    wraps = Wraps(V1, fail_after=2)
    with pytest.raises(ConnectionError):
        pool.fill(V1, wraps, 8)
    assert len(pool) == 2 and wraps.seen[2] == bytearray(32)
    pool.clear()
    assert all(d == bytearray(32) for d in wraps.seen) and pool.wanted == set()


def _versions(backing: Path) -> dict[int, int]:
    rows = json.loads(run_vcfs("keys", "list", str(backing), "--json").stdout)
    return {r["version"]: r["files"] for r in rows if r["tier"] == "kek"}


def test_after_a_rotation_no_new_file_takes_a_dek_wrapped_ahead_for_the_old_kek(mounted: Mounted) -> None:
    for i in range(40):  # the pool is filled for v1 meanwhile
        (mounted.mnt / f"before-{i}").write_bytes(b"a" * i)
    run_vcfs("keys", "rotate", str(mounted.backing), "default")
    for i in range(40):
        (mounted.mnt / f"after-{i}").write_bytes(b"b" * i)
    for i in range(40):
        assert (mounted.mnt / f"before-{i}").read_bytes() == b"a" * i
        assert (mounted.mnt / f"after-{i}").read_bytes() == b"b" * i
    assert _versions(mounted.backing) == {1: 40, 2: 40}
    status = json.loads(run_vcfs("status", str(mounted.mnt), "--json").stdout)
    assert status["hsm"]["calls"]["wrap"] >= 80  # every new file's DEK was wrapped (some ahead of time)
