"""Restoring blocks a crash tore, from the file's journal (docs/FORMAT.md, "Recovery").

Rule: a journal record for block *b* is used only if block *b* on disk does not read under
the normal reading rules (it fails authentication, is cut short, or ends the file without
being sealed final) and the record's sealed bytes do authenticate as block *b* of this file.
Then the newest such record replaces the block. A record shorter than a whole block was the
file's last block when it was saved, so everything after it was written later, never
fsynced, and is cut off. Nothing unauthenticated is ever used, and an intact block is never
replaced, so an old journal can at worst restore an authentic older version of a damaged
block (the rollback limit of docs/THREAT_MODEL.md).

With ``write`` the restored bytes go to disk (the store's one writer: the mount, or fsck
--repair); without it they are kept in memory so an offline reader of a crashed store or a
backup copy still sees every fsynced byte.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vcfs.core.journal import Record
from vcfs.core.layout import (
    CIPHER_BLOCK_SIZE,
    HEADER_LEN,
    block_count,
    block_no_to_cipher_off,
    cipher_to_plain_size,
)
from vcfs.errors import TruncatedError
from vcfs.store import pread_exact, pwrite_all

if TYPE_CHECKING:
    from vcfs.cryptfile import CryptFile


@dataclass(frozen=True, slots=True)
class Restored:
    block_no: int
    cut: bool  # the file now ends after this block


def disk_block_count(size: int) -> int:
    """Blocks a reader sees in a backing file of ``size`` bytes (whole blocks only if torn)."""
    try:
        return block_count(cipher_to_plain_size(size))
    except TruncatedError:
        return max(size - HEADER_LEN, 0) // CIPHER_BLOCK_SIZE


def _reads_ok(cf: CryptFile, block_no: int, size: int) -> bool:
    """Does block ``block_no`` read under the FORMAT.md rules, in a file of ``size`` bytes?"""
    n = disk_block_count(size)
    if block_no >= n:
        return False  # cut short or torn: no whole block there
    sealed = pread_exact(cf.fd, CIPHER_BLOCK_SIZE, block_no_to_cipher_off(block_no))
    opened = cf.try_open(block_no, sealed)
    return opened is not None and (opened[1] or block_no < n - 1)


def restore_from_journal(cf: CryptFile, records: list[Record], write: bool) -> list[Restored]:
    """Apply the journal to ``cf`` (see the module docstring); returns what was restored."""
    by_block: dict[int, list[Record]] = {}
    for rec in records:
        if rec.file_id == cf.file_id:
            by_block.setdefault(rec.block_no, []).append(rec)
    done: list[Restored] = []
    size = os.fstat(cf.fd).st_size
    for b in sorted(by_block):
        start = block_no_to_cipher_off(b)
        if start >= size or _reads_ok(cf, b, size):
            continue  # never written over, or the rewrite completed
        for rec in reversed(by_block[b]):  # newest first
            opened = cf.try_open(b, rec.sealed)
            if opened is not None:
                break
        else:
            continue  # nothing authentic to restore: fsck reports the block
        plain, final = opened
        # The copy ends the file if it was the last block when saved (shorter than a whole
        # block), or if nothing whole follows it now: then what follows was written later and
        # never synced (a torn tail) and goes, and a copy sealed inner (the file was cut back to
        # it since) is resealed final, as fsck --repair would seal an authentic last block.
        ends = len(rec.sealed) < CIPHER_BLOCK_SIZE or b >= disk_block_count(size) - 1
        sealed = rec.sealed
        if write:
            if ends and not final:
                sealed = cf.seal_final(b, plain)
            pwrite_all(cf.fd, sealed, start)
            if ends:
                os.ftruncate(cf.fd, start + len(sealed))
        cf.patch_block(b, plain, start + len(sealed) if ends else None, in_memory=not write)
        done.append(Restored(b, ends))
        if ends:
            break  # the file ends here now; later records describe bytes written after it
    return done
