"""The DEK cache: pinned while open, dropped (buffer overwritten) a short time after the last close."""

from __future__ import annotations

import time

from vcfs.keys.base import KeyRef, Wrapped
from vcfs.keys.dekcache import DekCache

W = Wrapped(KeyRef("default", 1), 1, b"w" * 40)


class Hsm:
    """Stands in for the token: counts unwraps (the cache's only collaborator)."""

    def __init__(self) -> None:
        self.calls = 0

    def unwrap(self, wrapped: Wrapped) -> bytearray:
        self.calls += 1
        return bytearray(b"k" * 32)


def test_second_open_is_a_hit_and_callers_get_their_own_copy() -> None:
    hsm = Hsm()
    cache = DekCache(hsm.unwrap, ttl=60)
    a = cache.unwrap(W)
    a[:] = bytes(32)  # the caller wipes its copy
    assert cache.unwrap(W) == bytearray(b"k" * 32) and hsm.calls == 1


def test_entry_is_wiped_after_the_last_release_and_ttl() -> None:
    hsm = Hsm()
    cache = DekCache(hsm.unwrap, ttl=0.05)
    cache.unwrap(W)
    cache.hold(W)
    entry = cache._entries[DekCache.key_of(W)]
    time.sleep(0.1)
    assert cache.sweep() == 0  # held by an open file: kept however old
    cache.release(W)
    assert len(cache) == 1  # released just now: kept for the ttl
    time.sleep(0.1)
    assert cache.sweep() == 1 and len(cache) == 0
    assert entry.dek == bytearray(32)  # overwritten, not just dropped
    cache.unwrap(W)
    assert hsm.calls == 2


def test_ttl_zero_keeps_nothing() -> None:
    hsm = Hsm()
    cache = DekCache(hsm.unwrap, ttl=0)
    cache.unwrap(W)
    cache.unwrap(W)
    assert hsm.calls == 2 and len(cache) == 0


def test_destroyed_kek_entries_go_at_once() -> None:
    cache = DekCache(Hsm().unwrap, ttl=60)
    cache.unwrap(W)
    cache.hold(W)
    entry = cache._entries[DekCache.key_of(W)]
    cache.drop_kek(KeyRef("default", 1))
    assert len(cache) == 0 and entry.dek == bytearray(32)
