"""One encrypted file: read, write, truncate, flush and sync in plaintext terms.

Shared by the mount, and later by fsck, rotation and offline restore. Thread-safe: every
public method takes the file's lock, so the FUSE adapter may call it from worker threads.

State kept in memory (see docs/FORMAT.md, "Writing"):
- ``dirty``: plaintext of blocks changed since they were last written, keyed by block
  number. Every logical block beyond the blocks on disk is dirty, so appending 4 KiB pieces
  only copies bytes until a block is sealed; nothing is decrypted and re-encrypted per write.
- ``final_cache``: plaintext of the block that ends the file on disk, so turning it into an
  inner block when the file grows costs one seal and no decrypt.

Order of writes: dirty blocks are written in ascending order, the new last block sealed
final; only then is the old final block resealed as an inner block. A crash in between
leaves two final-sealed blocks, which readers accept (an inner position may hold a
final-sealed block); a crash earlier leaves a tail that fails authentication, which fsck
repairs. The header is touched only to reserve seal counts (two alternating slots).

In-place rewrites: before a block that an fsync may have made durable is overwritten, its
sealed bytes are copied to the file's journal and synced (``_preserve``), so a write torn by
kill -9 or a power loss never costs fsynced bytes: recovery restores the copy
(vcfs/recovery.py). ``_unsynced`` holds the blocks written since the last fsync began; they
promise nothing yet and are overwritten without a copy. So an appending recorder pays one
journal sync per fsync interval (for its partial last block), and a file that is never
fsynced pays nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vcfs import counters, events
from vcfs.core.aead import DEK_LEN, FileKeys, derive_file_keys, derive_header_keys, new_dek, new_file_id, wipe
from vcfs.core.blocks import open_block, open_block_into, seal_block, seal_block_parts
from vcfs.core.header import (
    SLOT_LEN,
    WRAP_PKCS11_AES_KWP,
    Header,
    KeySlot,
    new_header,
    parse_header,
    slot_offset,
    verify_slot,
)
from vcfs.core.layout import (
    BLOCK_OVERHEAD,
    BLOCK_SIZE,
    CIPHER_BLOCK_SIZE,
    HEADER_LEN,
    block_count,
    block_len,
    block_no_to_cipher_off,
    cipher_to_plain_size,
    plain_off_to_block_no,
)
from vcfs.errors import (
    BlockAuthError,
    HeaderAuthError,
    KeyProviderError,
    SealLimitError,
    TruncatedError,
    UnterminatedError,
    VcfsError,
)
from vcfs.journal import FileJournal, Journal
from vcfs.keys.base import KeyRef, Wrapped
from vcfs.recovery import Restored, restore_from_journal
from vcfs.store import fsync_dir, pread_exact, pwrite_all, pwritev_all, reserve_space

# NIST SP 800-38D: at most 2^32 random 96-bit nonces per key. vcfs stops at half of that.
SEAL_BUDGET = 1 << 31
SEAL_RESERVE_STEP = 1 << 16  # seals reserved in the header at a time (4 GiB of block writes)
# A new file reserves only a few seals (4 MiB of block writes): a small file then never needs
# to lower its reservation at close, which over a slot never synced would cost an fdatasync.
NEW_FILE_SEALS = 64
MAX_DIRTY_BLOCKS = 16  # plaintext held per open file before sealing (1 MiB)

log = logging.getLogger("vcfs.cryptfile")
Unwrap = Callable[[Wrapped], bytes | bytearray]


def renew_threshold(budget: int) -> int:
    """Seals after which a file moves to a fresh DEK: 7/8 of the budget, leaving room to finish."""
    return budget - budget // 8


class Renewer(Protocol):
    """Moves an open file to a fresh DEK (vcfs/renew.py); the file's lock is held by the caller."""

    def renew(self, cf: CryptFile) -> bool: ...


class CryptFile:
    def __init__(
        self,
        fd: int,
        header: Header,
        slot_index: int,
        keys: FileKeys,
        label: str,
        seal_budget: int = SEAL_BUDGET,
        renewer: Renewer | None = None,
    ) -> None:
        slot = header.slots[slot_index]
        assert slot is not None
        self.seal_budget = seal_budget
        self.renewer = renewer  # None: no renewal; the write fails with EFBIG at the budget
        self._renew_failed = False
        self.fd = fd
        self.label = label  # backing path, for log lines only
        self.lock = threading.Lock()
        self._pre = header.preamble
        self._bound = header.preamble.bound
        self._keys = keys
        self._slot = slot
        self._slot_index = slot_index
        # The wrapped DEK this file was opened with: what the mount's DEK cache holds for it.
        self.opened_with = Wrapped(KeyRef(slot.domain, slot.kek_version), slot.wrap_alg, slot.wrapped)
        self._load_disk_state()
        # A block written whole from immutable bytes is held as a view of them (no copy) until
        # something changes part of it (``_dirty_block`` then copies it into a bytearray).
        self.dirty: dict[int, bytearray | memoryview] = {}
        self.final_cache: tuple[int, bytes] | None = None
        self.journal: FileJournal | None = None  # set for writers: where _preserve copies blocks
        self._unsynced: set[int] = set()  # on-disk blocks written since the last fsync began
        self._journaled: set[int] = set()  # blocks copied to the journal since the last fsync began
        self._slot_durable = False  # the active slot is known to be on disk (synced since written)
        self.patched: dict[int, bytes] = {}  # read-only opens: plaintext recovered from the journal
        self.restored: list[Restored] = []  # what recovery restored at open (for fsck and logs)
        self.seals_used = slot.seals  # conservative: the persisted value is an upper bound
        self.seals_reserved = slot.seals
        self.seals_persisted = slot.seals
        self.changed = False  # written since open: callers drop cached pages of other opens

    def _load_disk_state(self) -> None:
        """Size and block count as the backing file's length implies them."""
        self.disk_size = os.fstat(self.fd).st_size
        self.disk_last_final = True  # what the on-disk last block must authenticate as
        self.torn_tail = False  # bytes after the last whole block that cannot be a block
        try:
            self.size = cipher_to_plain_size(self.disk_size)
            self.disk_blocks = block_count(self.size)
        except TruncatedError:
            # A torn or cut tail: only whole blocks count, and the last of them has to prove it
            # is final, which it cannot. Reads of it fail; fsck --repair fixes the file.
            whole = max(self.disk_size - HEADER_LEN, 0) // CIPHER_BLOCK_SIZE
            self.disk_blocks = whole
            self.size = whole * BLOCK_SIZE
            self.torn_tail = True

    @property
    def file_id(self) -> bytes:
        return self._pre.file_id

    @property
    def key_ref(self) -> KeyRef:
        return KeyRef(self._slot.domain, self._slot.kek_version)

    def adopt(self, fd: int, header: Header, keys: FileKeys) -> None:
        """Switch to a re-encrypted copy of this file under a new DEK (renewal; lock held).

        The copy has the same blocks (same plaintext, same final flags), so every size and
        block counter stays valid; only the file id, keys, header and seal counts change. The
        copy was synced before it was swapped in, so the old file's journal copies are moot.
        """
        slot = header.slots[0]
        assert slot is not None
        old_fd, old_keys = self.fd, self._keys
        self.fd, self._keys = fd, keys
        self._pre, self._bound = header.preamble, header.preamble.bound
        self._slot, self._slot_index = slot, 0
        self._slot_durable = True
        self.seals_used = self.disk_blocks
        self.seals_reserved = self.seals_persisted = slot.seals
        self._unsynced.clear()
        self._journaled.clear()
        if self.journal is not None:
            journal = self.journal
            journal.discard()
            self.journal = journal.for_id(self.file_id)
        os.close(old_fd)
        old_keys.wipe()

    # ---- reading -------------------------------------------------------------------------

    def _open_disk_block(self, block_no: int, sealed: bytes | memoryview, out: memoryview) -> int:
        """Authenticate on-disk block ``block_no`` and decrypt it into ``out``; its length.

        On an error ``out`` may hold unauthenticated bytes; the caller drops the buffer.
        """
        last = block_no == self.disk_blocks - 1
        if last:
            try:
                return open_block_into(self._keys, self._bound, block_no, self.disk_last_final, sealed, out)
            except BlockAuthError:
                if self.disk_last_final and _opens_as(self, block_no, False, sealed):
                    raise UnterminatedError(
                        f"{self.label}: file ends at block {block_no}, which was not sealed as final: truncated",
                        hint="run vcfs fsck to find the last authentic block",
                    ) from None
                raise
        try:
            return open_block_into(self._keys, self._bound, block_no, False, sealed, out)
        except BlockAuthError:
            # An inner block sealed final is the trace of a crash between writing a file's new
            # end and resealing its old end; its bytes are still authentic.
            return open_block_into(self._keys, self._bound, block_no, True, sealed, out)

    def _read_disk_blocks(self, first: int, count: int, out: memoryview) -> int:
        """Authenticated plaintext of on-disk blocks first..first+count-1, one after the other
        into ``out`` (room for ``count`` whole blocks); returns the bytes written.

        One pread for the run, each block decrypted straight into its place: no copy between
        the read and the reply. On an error ``out`` may hold unauthenticated bytes: drop it.
        """
        cached = self.final_cache
        if count == 1 and cached is not None and cached[0] == first:
            out[: len(cached[1])] = cached[1]
            return len(cached[1])
        raw = pread_exact(self.fd, count * CIPHER_BLOCK_SIZE, block_no_to_cipher_off(first))
        view = memoryview(raw)
        pos = 0
        for i in range(count):
            if self.patched and first + i in self.patched:
                plain = self.patched[first + i]
                out[pos : pos + len(plain)] = plain
                pos += len(plain)
                continue
            sealed = view[i * CIPHER_BLOCK_SIZE : (i + 1) * CIPHER_BLOCK_SIZE]
            if len(sealed) < BLOCK_OVERHEAD:
                raise TruncatedError(f"{self.label}: block {first + i} is missing or torn", hint="run vcfs fsck")
            n = self._open_disk_block(first + i, sealed, out[pos:])
            counters.opened(n)
            pos += n
        return pos

    def try_open(self, block_no: int, sealed: bytes | memoryview) -> tuple[bytes, bool] | None:
        """(plaintext, sealed final?) if ``sealed`` authenticates as block ``block_no`` of this file."""
        for final in (True, False):
            try:
                return open_block(self._keys, self._bound, block_no, final, sealed), final
            except BlockAuthError:
                continue
        return None

    def seal_final(self, block_no: int, plain: bytes) -> bytes:
        """A fresh final seal of ``plain`` as block ``block_no`` (recovery ending a file there)."""
        with self.lock:
            self._reserve_seals(1)
            return self._seal(block_no, True, plain)

    def patch_block(self, block_no: int, plain: bytes, new_disk_size: int | None, in_memory: bool) -> None:
        """Recovery replaced block ``block_no`` (on disk, or only in memory); ``new_disk_size`` if
        the file now ends after it."""
        if in_memory:
            self.patched[block_no] = plain
            if new_disk_size is not None:
                self.disk_size, self.disk_blocks, self.torn_tail = new_disk_size, block_no + 1, False
                self.size = block_no * BLOCK_SIZE + len(plain)
        else:
            self._load_disk_state()

    def _plain_block(self, block_no: int) -> bytes | bytearray | memoryview:
        if block_no in self.dirty:
            return self.dirty[block_no]
        if block_no >= self.disk_blocks:
            return b""
        cached = self.final_cache
        if cached is not None and cached[0] == block_no:
            return bytearray(cached[1])
        buf = bytearray(BLOCK_SIZE)
        with memoryview(buf) as view:
            n = self._read_disk_blocks(block_no, 1, view)
        del buf[n:]
        return buf  # a fresh buffer: the caller may keep it

    def read(self, offset: int, length: int) -> bytes | memoryview:
        """Up to ``length`` plaintext bytes at ``offset``, every one authenticated.

        A view of one buffer that the blocks were decrypted into (no join, no slice copy).
        """
        with self.lock:
            end = min(offset + length, self.size)
            if offset >= end:
                return b""
            first, last = plain_off_to_block_no(offset), plain_off_to_block_no(end - 1)
            buf = bytearray((last - first + 1) * BLOCK_SIZE)
            out = memoryview(buf)
            pos = 0
            b = first
            while b <= last:
                if b in self.dirty or b >= self.disk_blocks:
                    plain = self._plain_block(b)
                    out[pos : pos + len(plain)] = plain
                    pos += len(plain)
                    b += 1
                    continue
                run_end = b
                while run_end <= last and run_end not in self.dirty and run_end < self.disk_blocks:
                    run_end += 1
                pos += self._read_disk_blocks(b, run_end - b, out[pos:])
                b = run_end
            start = offset - first * BLOCK_SIZE
            return out[start : min(pos, start + end - offset)]

    # ---- writing -------------------------------------------------------------------------

    def _dirty_block(self, block_no: int) -> bytearray:
        """Block ``block_no`` held in memory as a buffer that may be changed in place."""
        blk = self.dirty.get(block_no)
        if isinstance(blk, bytearray):
            return blk
        plain = self._plain_block(block_no)  # a view of written bytes, or not dirty: a fresh buffer (or b"")
        held = plain if isinstance(plain, bytearray) and blk is None else bytearray(plain)
        self.dirty[block_no] = held
        return held

    def _extend(self, new_size: int) -> None:
        """Grow the file with explicit, sealed zeros up to ``new_size`` (no unauthenticated holes)."""
        while self.size < new_size:
            b = plain_off_to_block_no(self.size)
            blk = self._dirty_block(b)
            target = min((b + 1) * BLOCK_SIZE, new_size) - b * BLOCK_SIZE
            blk.extend(bytes(target - len(blk)))
            self.size = b * BLOCK_SIZE + target
            if len(self.dirty) > MAX_DIRTY_BLOCKS:
                self._flush(keep_tail=True)

    def try_write_buffered(self, offset: int, data: bytes) -> bool:
        """Write without I/O if the bytes land in one block already held in memory: a dirty
        block, or the file's last block whose plaintext ``final_cache`` keeps (an append right
        after a flush, or the first write into a new file).

        For the event loop: never blocks (gives up if the lock is busy), does no crypto and
        copies at most one block.
        """
        b = plain_off_to_block_no(offset)
        boff = offset - b * BLOCK_SIZE
        if boff + len(data) > BLOCK_SIZE or offset > self.size:
            return False
        if not self.lock.acquire(blocking=False):
            return False
        try:
            held: bytes | bytearray | memoryview | None = self.dirty.get(b)
            if held is None:
                cached = self.final_cache
                if cached is None or cached[0] != b or b != self.disk_blocks - 1 or b in self.patched:
                    return False
                held = cached[1]
            if boff > len(held):
                return False
            blk = self._dirty_block(b)  # a copy only if the block was a view of an earlier write
            blk[boff : boff + len(data)] = data
            self.size = max(self.size, offset + len(data))
            self.changed = True
            return True
        finally:
            self.lock.release()

    def write(self, offset: int, data: bytes | memoryview) -> int:
        with self.lock:
            self.changed = True
            if offset > self.size:
                self._extend(offset)
            view = memoryview(data)
            keep = isinstance(view.obj, bytes)  # immutable: whole blocks may stay views of it
            pos, end = offset, offset + len(view)
            while pos < end:
                b = plain_off_to_block_no(pos)
                boff = pos - b * BLOCK_SIZE
                n = min(BLOCK_SIZE - boff, end - pos)
                chunk = view[pos - offset : pos - offset + n]
                if boff == 0 and n >= block_len(b, self.size):
                    # Whole block replaced: nothing to read, and nothing to copy from bytes.
                    self.dirty[b] = chunk if keep and n == BLOCK_SIZE else bytearray(chunk)
                else:
                    blk = self._dirty_block(b)
                    blk[boff : boff + n] = chunk
                pos += n
                self.size = max(self.size, pos)
                if len(self.dirty) > MAX_DIRTY_BLOCKS:
                    self._flush(keep_tail=True)
            return len(view)

    def truncate(self, new_size: int) -> None:
        with self.lock:
            self.changed = True
            if new_size >= self.size:
                self._extend(new_size)
                return
            nb = block_count(new_size)
            last = nb - 1
            for b in [b for b in self.dirty if b > last]:
                del self.dirty[b]
            blk = self._dirty_block(last)
            del blk[block_len(last, new_size) :]
            self.size = new_size
            if self.final_cache is not None and self.final_cache[0] >= last:
                self.final_cache = None
            if self.disk_blocks > last:
                plain = self.dirty.pop(last)
                self._flush(keep_tail=False)  # blocks before it: inner, at their places
                self._rewrite_last(last, plain)
            else:
                self._flush(keep_tail=False)

    def _rewrite_last(self, last: int, plain: bytes | bytearray | memoryview) -> None:
        """Make on-disk block ``last`` the file's final block holding ``plain``; cut what follows.

        The block is written over in place, then the file is cut after it. Until the cut, block
        ``last`` does not authenticate (the new, shorter block runs into the old bytes); with
        on-disk blocks after it, ``_preserve`` copies it to the journal, so a crash in between
        restores the file as it was instead of leaving a damaged block inside it.
        """
        self._preserve([last])
        self._reserve_seals(1)
        sealed = self._seal(last, True, plain)
        off = block_no_to_cipher_off(last)
        pwrite_all(self.fd, sealed, off)
        os.ftruncate(self.fd, off + len(sealed))
        self._unsynced.add(last)
        self.disk_blocks, self.disk_size = last + 1, off + len(sealed)
        self.disk_last_final, self.torn_tail = True, False
        self.final_cache = (last, bytes(plain))

    # ---- sealing -------------------------------------------------------------------------

    def _reserve_seals(self, count: int) -> None:
        need = self.seals_used + count
        if need > renew_threshold(self.seal_budget) and self.renewer is not None and not self._renew_failed:
            # Near the nonce budget: re-encrypt under a fresh DEK first (see vcfs/renew.py).
            try:
                if not self.renewer.renew(self):
                    self._renew_failed = True
            except (OSError, VcfsError) as exc:
                self._renew_failed = True  # once per open: keep writing up to the hard limit
                log.error("%s: could not move the file to a fresh data key: %s", self.label, exc)
            need = self.seals_used + count
        if need > self.seal_budget:
            raise SealLimitError(
                f"{self.label}: the file's data key has sealed {self.seals_used} blocks, near the random-nonce limit",
                hint="copy the file to a new name: the copy gets a fresh data key",
            )
        if need > self.seals_reserved:
            self._write_slot(min(need + SEAL_RESERVE_STEP, self.seal_budget))
            self.seals_reserved = self._slot.seals
        self.seals_used = need

    def _write_slot(self, seals: int, sync: bool = True) -> None:
        """Write the other header slot with a higher generation, then (by default) sync it.

        A raised reservation must be durable before blocks sealed under it; lowering the
        count to the exact value at close may be lost in a crash, which only leaves the
        (safe) higher reservation in place, so it is written without a sync. Overwriting the
        other slot is safe only while the active one is durable: one written without a sync
        (by this close, or by an earlier session's: unknown after open) is synced first, or a
        power loss could tear both.
        """
        if not self._slot_durable:
            os.fdatasync(self.fd)
        new = KeySlot(
            self._slot.generation + 1,
            self._slot.wrap_alg,
            self._slot.domain,
            self._slot.kek_version,
            self._slot.wrapped,
            seals,
        ).sealed(self._pre, self._keys)
        index = 1 - self._slot_index
        pwrite_all(self.fd, new.encode(), slot_offset(index))
        if sync:
            os.fdatasync(self.fd)
        self._slot, self._slot_index, self._slot_durable = new, index, sync
        self.seals_persisted = seals

    def _seal(self, block_no: int, final: bool, plain: bytes | bytearray | memoryview) -> bytes:
        counters.sealed(len(plain))
        return seal_block(self._keys, self._bound, block_no, final, plain)

    def _seal_parts(self, block_no: int, final: bool, plain: bytes | bytearray | memoryview) -> tuple[bytes, bytes]:
        """``_seal`` as (nonce, ciphertext + tag), for a vectored write without a join."""
        counters.sealed(len(plain))
        return seal_block_parts(self._keys, self._bound, block_no, final, plain)

    def _disk_block(self, block_no: int) -> bytes:
        """Block ``block_no``'s sealed bytes as they are on disk now."""
        off = block_no_to_cipher_off(block_no)
        return pread_exact(self.fd, min(CIPHER_BLOCK_SIZE, self.disk_size - off), off)

    def _preserve(self, blocks: list[int]) -> list[tuple[int, bytes]]:
        """Copy on-disk blocks about to be written over in place to the journal first.

        A block an fsync may have promised (not in ``_unsynced``) is copied and the journal
        synced, so not even a power loss can tear its fsynced bytes. A block holding only
        unsynced bytes is copied without a sync if on-disk blocks follow it: kill -9 cannot lose
        a completed write, so the copy keeps a write cut short by kill -9 from leaving a damaged
        block inside the file. The on-disk last block needs no copy then: a cut write there is a
        torn tail of unsynced bytes, which fsck --repair cuts. Each block is copied at most once
        between two fsyncs; recovery restores the newest copy that authenticates. Returns what
        was copied.
        """
        if self.journal is None:
            return []
        last_on_disk = self.disk_blocks - 1
        todo, durable = [], False
        for b in blocks:
            if b > last_on_disk or b in self._journaled:
                continue
            promised = b not in self._unsynced
            if promised or b < last_on_disk:
                todo.append(b)
                durable |= promised
        if not todo:
            return []
        saved = [(b, self._disk_block(b)) for b in todo]
        self.journal.save(saved, durable)
        self._journaled.update(todo)
        return saved

    def _flush(self, keep_tail: bool) -> None:
        if not self.dirty:
            return
        tail = block_count(self.size) - 1
        todo = sorted(self.dirty)
        if keep_tail and todo[-1] == tail and len(self.dirty[tail]) < BLOCK_SIZE and self.size > 0:
            todo.pop()
        if not todo:
            return
        old_last = self.disk_blocks - 1
        new_last = max(old_last, todo[-1])
        reseal_old = 0 <= old_last < new_last and old_last not in self.dirty and self.disk_last_final
        # Full disk: claim the space first, so ENOSPC comes before any byte is overwritten (a
        # growing partial last block is rewritten in place, and losing space halfway would tear
        # it, fsynced bytes included). Then nothing has changed on disk and everything stays dirty.
        on_disk = os.fstat(self.fd).st_size
        end = block_no_to_cipher_off(todo[-1]) + BLOCK_OVERHEAD + len(self.dirty[todo[-1]])
        if end > on_disk:
            reserve_space(self.fd, on_disk, end - on_disk)
        fd_before = self.fd
        self._reserve_seals(len(todo) + (1 if reseal_old else 0))
        if self.fd != fd_before and end > on_disk:  # renewed: the new copy needs the same claim
            reserve_space(self.fd, on_disk, end - on_disk)
        # The old last block is resealed inner in the same ascending write as the blocks after
        # it (every block past the old end is dirty, so it directly precedes them): a write cut
        # short then always leaves its damage at the new end of the file, never inside it.
        plain: dict[int, bytes | bytearray | memoryview] = {b: self.dirty[b] for b in todo}
        if reseal_old:
            plain[old_last] = self._plain_block(old_last)
        order = sorted(plain)
        undo = dict(self._preserve([b for b in order if b < self.disk_blocks]))
        if end > on_disk and 0 <= old_last < self.disk_blocks and old_last in plain and old_last not in undo:
            undo[old_last] = self._disk_block(old_last)  # to put back if the file must be cut back
        try:
            run: list[bytes] = []  # nonce, ciphertext+tag, nonce, ...: one pwritev, no joining
            for i, b in enumerate(order):
                run.extend(self._seal_parts(b, b == new_last, plain[b]))
                if i + 1 == len(order) or order[i + 1] != b + 1:
                    pwritev_all(self.fd, run, block_no_to_cipher_off(b + 1 - len(run) // 2))
                    run = []
        except OSError:
            if end > on_disk:
                # No reservation possible (or another error): put back what was written over and
                # drop a partly appended block, so the file ends where and as it did. The dirty
                # blocks are still in memory.
                with contextlib.suppress(OSError):
                    for b, sealed in undo.items():
                        pwrite_all(self.fd, sealed, block_no_to_cipher_off(b))
                    os.ftruncate(self.fd, on_disk)
            raise
        self._unsynced.update(order)
        if new_last in self.dirty and new_last in todo:
            last_plain = bytes(self.dirty[new_last])
            self.final_cache = (new_last, last_plain)
            self.disk_size = block_no_to_cipher_off(new_last) + BLOCK_OVERHEAD + len(last_plain)
        self.disk_blocks = new_last + 1
        self.disk_last_final = True
        for b in todo:
            del self.dirty[b]

    def repair_tail(self, keep_blocks: int) -> None:
        """Cut the file after its first ``keep_blocks`` authentic blocks, seal the last final (fsck).

        The caller has checked blocks 0..keep_blocks-1 and saved what lies beyond them.
        """
        with self.lock:
            last = max(keep_blocks - 1, 0)
            plain = b""
            if keep_blocks > 0:
                raw = pread_exact(self.fd, CIPHER_BLOCK_SIZE, block_no_to_cipher_off(last))
                try:
                    plain = open_block(self._keys, self._bound, last, False, raw)
                except BlockAuthError:
                    plain = open_block(self._keys, self._bound, last, True, raw)
            self.dirty.clear()
            self._rewrite_last(last, plain)
            os.fsync(self.fd)
            self._slot_durable = True
            self._unsynced.clear()
            self._journaled.clear()
            if self.journal is not None:
                self.journal.reset()
            self.size = last * BLOCK_SIZE + len(plain)

    def write_copy(self, fd: int, keys: FileKeys, bound: bytes) -> None:
        """Write every on-disk block into ``fd`` sealed under ``keys`` (DEK renewal; lock held).

        Same positions and final flags as here, so the copy is this file under another DEK: an
        inner block found sealed final (a crash trace) stays so. Dirty blocks are not included.
        """
        last = self.disk_blocks - 1
        for first in range(0, self.disk_blocks, MAX_DIRTY_BLOCKS):
            count = min(MAX_DIRTY_BLOCKS, self.disk_blocks - first)
            raw = memoryview(pread_exact(self.fd, count * CIPHER_BLOCK_SIZE, block_no_to_cipher_off(first)))
            out = []
            for i in range(count):
                b, sealed = first + i, raw[i * CIPHER_BLOCK_SIZE : (i + 1) * CIPHER_BLOCK_SIZE]
                final = b == last and self.disk_last_final
                if not _opens_as(self, b, final, sealed):
                    final = not final
                out.append(seal_block(keys, bound, b, final, open_block(self._keys, self._bound, b, final, sealed)))
            pwritev_all(fd, out, block_no_to_cipher_off(first))

    def flush(self) -> None:
        """Seal and write everything held in memory (close(2) semantics; no sync)."""
        with self.lock:
            self._flush(keep_tail=False)

    def fsync(self, datasync: bool = True) -> None:
        """Seal and write what is held, then sync. The sync runs outside the lock: it makes
        durable everything written before it started, and holding the lock through a slow
        disk sync would stall this file's writes (and the kernel's shared writeback slots)."""
        with self.lock:
            self._flush(keep_tail=False)
            fd = self.fd
            # From here on every block on disk is promised: its next rewrite copies it first.
            self._unsynced.clear()
            self._journaled.clear()
            journal = self.journal
            mark = journal.mark() if journal is not None else None
        (os.fdatasync if datasync else os.fsync)(fd)
        with self.lock:
            self._slot_durable = True  # a close-time slot write can only come after this fsync
        if journal is not None and mark is not None:
            with self.lock:
                # Every block written before the sync is durable now, so the journal's copies of
                # older versions are obsolete, unless a rewrite during the sync saved new ones.
                journal.reset(mark)

    def close(self) -> None:
        """Flush, record the exact seal count, close the backing file. Idempotent."""
        with self.lock:
            if self.fd < 0:
                return
            try:
                self._flush(keep_tail=False)
                if self.seals_used < self.seals_persisted and self._slot_durable:
                    # Only over a durable slot: otherwise (a small file created in this session
                    # and never synced) the write would first need an fdatasync of its own, one
                    # per new file; such a file keeps its reservation instead (at most
                    # NEW_FILE_SEALS, once; docs/FORMAT.md, "Nonce budget").
                    # Bookkeeping, not a change of content: keep the times the data (or a
                    # utimens) left, or every close would move mtime to the moment of release.
                    st = os.fstat(self.fd)
                    self._write_slot(self.seals_used, sync=False)
                    os.utime(self.fd, ns=(st.st_atime_ns, st.st_mtime_ns))
                if self.journal is not None:
                    if self.journal.live:
                        os.fdatasync(self.fd)  # the copies may go only once the rewrites are durable
                    self.journal.discard()
            finally:
                if self.journal is not None:
                    self.journal.close()
                os.close(self.fd)
                self.fd = -1
                self._keys.wipe()
                self.dirty.clear()
                self.final_cache = None


def _opens_as(cf: CryptFile, block_no: int, final: bool, sealed: bytes | memoryview) -> bool:
    try:
        open_block(cf._keys, cf._bound, block_no, final, sealed)
        return True
    except BlockAuthError:
        return False


def _unlock(header: Header, label: str, unwrap: Unwrap) -> tuple[int, KeySlot, bytearray, FileKeys]:
    """The newest slot that unwraps and authenticates: (index, slot, DEK, derived keys).

    Falls back to the other slot (a crash during a slot update leaves the older one intact);
    raises the first slot's error if none works. The caller owns the DEK buffer and wipes it.
    """
    errors: list[Exception] = []
    for index, slot in header.candidates():
        dek = bytearray()
        try:
            dek = bytearray(unwrap(Wrapped(KeyRef(slot.domain, slot.kek_version), slot.wrap_alg, slot.wrapped)))
            if len(dek) != DEK_LEN:
                raise HeaderAuthError(f"{label}: key slot {index} unwraps to a {len(dek)}-byte key, not a DEK")
            keys = derive_file_keys(dek, header.preamble.file_id)
            verify_slot(header.preamble, slot, keys)
        except (HeaderAuthError, KeyProviderError) as exc:
            wipe(dek)
            errors.append(exc)
            continue
        return index, slot, dek, keys
    raise errors[0] if errors else HeaderAuthError(f"{label}: no usable key slot")


def open_cryptfile(
    fd: int,
    label: str,
    unwrap: Unwrap,
    allow_damaged: bool = False,
    journal: Journal | None = None,
    seal_budget: int = SEAL_BUDGET,
    renewer: Renewer | None = None,
) -> CryptFile:
    """Authenticate the header of an existing backing file and return its engine.

    Takes a shared flock on the backing file for as long as it is open, so a concurrent
    ``vcfs keys rewrap`` leaves it alone (it needs the exclusive lock). With the store's
    ``journal``, blocks a crash tore are restored first (on disk if ``fd`` is writable, which
    only the store's one writer opens it as; else in memory), and a writable file journals
    its own in-place rewrites.
    """
    fcntl.flock(fd, fcntl.LOCK_SH)
    header = parse_header(pread_exact(fd, HEADER_LEN, 0))
    index, _slot, dek, keys = _unlock(header, label, unwrap)
    wipe(dek)
    cf = CryptFile(fd, header, index, keys, label, seal_budget, renewer)
    if journal is not None:
        _recover(cf, journal)
    if cf.disk_blocks == 0 and not allow_damaged:
        raise TruncatedError(f"{label}: no complete block after the header", hint="run vcfs fsck")
    return cf


def _recover(cf: CryptFile, journal: Journal) -> None:
    writable = (fcntl.fcntl(cf.fd, fcntl.F_GETFL) & os.O_ACCMODE) != os.O_RDONLY
    records = journal.read(cf.file_id)
    if records:
        cf.restored = restore_from_journal(cf, records, write=writable)
        for r in cf.restored:
            log.warning(
                "%s: block %d was torn by a crash; restored its last synced version from the journal%s",
                cf.label,
                r.block_no,
                " and cut the unsynced bytes after it" if r.cut else "",
            )
            events.emit(events.BLOCK_RESTORED, path=cf.label, block=r.block_no, on_disk=writable)
        if writable:
            os.fdatasync(cf.fd)  # the restored blocks are durable before their copies go
            journal.remove(cf.file_id)
    if writable:
        cf.journal = journal.for_file(cf.file_id, _backing_path(cf.fd))


def _backing_path(fd: int) -> bytes:
    """Where the open backing file is, for the journal's path hint. Not the log label: that can
    hold the plaintext path, which must never be written into the store."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}".encode())
    except OSError:
        return b""  # a path too long to name: recovery then finds the file when it is opened


@dataclass(frozen=True, slots=True)
class Rewrapped:
    old: KeyRef  # the KEK the file was under
    active: int  # the slot that now holds the target wrapping
    other_domain: str | None  # domain named by the other slot (unauthenticated), None if empty


def rewrap_header(
    fd: int, label: str, unwrap: Unwrap, target: KeyRef, wrap: Callable[[bytearray], Wrapped], sync: bool = True
) -> Rewrapped:
    """Wrap the file's DEK under ``target`` into the inactive slot.

    Header only: no block is read or written. The new slot (generation + 1) is written in
    place (and, with ``sync``, synced; batch callers sync the filesystem instead, before and
    after the batch); until it is on disk the old slot stays valid, so a crash at any point
    leaves the file readable. The active slot must be durable before the other one is
    overwritten (a close writes the exact seal count without a sync): with ``sync`` this
    function syncs first. Needs the exclusive flock (BlockingIOError if the file is open).
    """
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    header = parse_header(pread_exact(fd, HEADER_LEN, 0))
    index, slot, dek, keys = _unlock(header, label, unwrap)
    try:
        old = KeyRef(slot.domain, slot.kek_version)
        if old == target and slot.wrap_alg == WRAP_PKCS11_AES_KWP:  # under 2, "version" is a recipient
            other = header.slots[1 - index]
            return Rewrapped(old, index, other.domain if other is not None else None)
        wrapped = wrap(dek)
    finally:
        wipe(dek)
    new = KeySlot(
        slot.generation + 1, wrapped.wrap_alg, wrapped.ref.domain, wrapped.ref.version, wrapped.blob, slot.seals
    ).sealed(header.preamble, keys)
    keys.wipe()
    if sync:
        os.fdatasync(fd)  # the active slot may have been written without a sync (exact count at close)
    pwrite_all(fd, new.encode(), slot_offset(1 - index))
    if sync:
        os.fdatasync(fd)
    return Rewrapped(old, 1 - index, old.domain)


def lock_header(fd: int) -> Header:
    """Take a backing file's exclusive flock (BlockingIOError if it is open) and parse its header.

    The first half of a rewrap split in steps for a pipelined caller (vcfs/rewrap.py):
    lock_header, unwrap the newest slot, wrap under the target, then seal_rewrapped_slot.
    """
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return parse_header(pread_exact(fd, HEADER_LEN, 0))


def seal_rewrapped_slot(header: Header, index: int, dek: bytearray, wrapped: Wrapped | None) -> bytes | None:
    """Authenticate slot ``index`` with its unwrapped DEK and build its successor holding ``wrapped``.

    Returns the encoded new slot, for the other slot position; None when ``wrapped`` is None
    (the slot only had to be authenticated). Raises HeaderAuthError if the slot does not
    authenticate: the caller then falls back to rewrap_header, which tries the other slot.
    Wipes ``dek``.
    """
    slot = header.slots[index]
    assert slot is not None
    try:
        if len(dek) != DEK_LEN:
            raise HeaderAuthError(f"key slot {index} unwraps to a {len(dek)}-byte key, not a DEK")
        keys = derive_header_keys(dek, header.preamble.file_id)
    finally:
        wipe(dek)
    try:
        verify_slot(header.preamble, slot, keys)
        if wrapped is None:
            return None
        new = KeySlot(
            slot.generation + 1, wrapped.wrap_alg, wrapped.ref.domain, wrapped.ref.version, wrapped.blob, slot.seals
        )
        return new.sealed(header.preamble, keys).encode()
    finally:
        keys.wipe()


def erase_other_slot(fd: int, keep: int) -> bool:
    """Zero the slot beside ``keep`` (which the caller authenticated and synced); True if it held one.

    After a file moves to another key domain, its old domain's wrapping must not stay behind.
    """
    other = slot_offset(1 - keep)
    if not any(pread_exact(fd, SLOT_LEN, other)):
        return False
    pwrite_all(fd, bytes(SLOT_LEN), other)
    os.fdatasync(fd)
    return True


def new_file_header(
    wrap: Callable[[bytearray], Wrapped] | None, seals: int, prewrapped: tuple[bytearray, Wrapped] | None = None
) -> tuple[Header, FileKeys]:
    """A fresh DEK and file id, the DEK wrapped, and the header for them (slot 0).

    ``prewrapped``: a fresh DEK and its wrapping made ahead (vcfs/keys/dekpool.py) instead of
    ``wrap``; its buffer is overwritten here like a DEK made here.
    """
    dek, wrapped = prewrapped if prewrapped is not None else (new_dek(), None)
    try:
        file_id = new_file_id()
        keys = derive_file_keys(dek, file_id)
        if wrapped is None:
            assert wrap is not None
            wrapped = wrap(dek)
    finally:
        wipe(dek)
    slot = KeySlot(1, wrapped.wrap_alg, wrapped.ref.domain, wrapped.ref.version, wrapped.blob, seals)
    return new_header(file_id, keys, slot), keys


def create_cryptfile(
    fd: int,
    label: str,
    wrap: Callable[[bytearray], Wrapped] | None,
    journal: Journal | None = None,
    seal_budget: int = SEAL_BUDGET,
    renewer: Renewer | None = None,
    prewrapped: tuple[bytearray, Wrapped] | None = None,
) -> CryptFile:
    """Write a new empty file (header + one empty final block) into an empty backing file.

    The DEK is made and wrapped with ``wrap``, or comes ready in ``prewrapped`` (no HSM call).
    """
    header, keys = new_file_header(wrap, min(NEW_FILE_SEALS, seal_budget), prewrapped)
    fcntl.flock(fd, fcntl.LOCK_SH)
    empty = seal_block(keys, header.preamble.bound, 0, True, b"")
    pwrite_all(fd, header.encode() + empty, 0)
    cf = CryptFile(fd, header, 0, keys, label, seal_budget, renewer)
    cf.final_cache = (0, b"")  # the first write lands in memory, without reading the block back
    cf.seals_used = 1
    cf._unsynced.add(0)  # never fsynced: the first write may overwrite it without a copy
    if journal is not None:
        cf.journal = journal.for_file(header.preamble.file_id, _backing_path(fd))
    return cf


def sync_parent(path: str) -> None:
    """fsync the directory holding ``path`` so a create or rename survives power loss."""
    fsync_dir(os.path.dirname(path) or ".")
