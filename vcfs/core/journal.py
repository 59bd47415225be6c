"""Journal records: copies of sealed blocks kept while those blocks are rewritten in place.

Why: a block is rewritten at its fixed position when a file's partial last block grows, when
a full last block is resealed inner, on a seek-and-rewrite and on a shrinking truncate. A
write cut short (kill -9 stops a write at a page boundary; a power loss can persist any
subset of sectors) leaves a block that authenticates as neither version, and with it bytes an
earlier fsync had made durable. So before the first in-place rewrite of a block after an
fsync, the writer copies the block's sealed bytes, as they are on disk, into the file's
journal and syncs the journal; a reader that finds the block torn restores that copy.

A record carries no key material and needs no MAC of its own: ``sealed`` is an ordinary
sealed block (nonce || ciphertext || tag) whose AAD binds it to its file id, its block number
and its final flag, so a record that was torn, altered or belongs elsewhere simply fails to
open and is ignored. Layout (all integers big-endian; docs/FORMAT.md, "Journal"):

    offset size field
    0      4    magic "VJNL"
    4      2    journal record version (1)
    6      1    kind (1 = pre-image of one block)
    7      1    reserved, zero
    8      8    epoch: which generation of the journal file the record belongs to
    16     16   file id (preamble bytes 12..27 of the backing file)
    32     8    block number
    40     4    length of the sealed block, 28..65564
    44     2    length of the path hint, 0..4096
    46     2    reserved, zero
    48     ..   path hint (the backing file's path under files/, raw bytes; a hint only)
    ..     ..   the sealed block, exactly as it was on disk
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vcfs.core.layout import BLOCK_OVERHEAD, CIPHER_BLOCK_SIZE

MAGIC = b"VJNL"
VERSION = 1
KIND_PREIMAGE = 1
MAX_HINT = 4096
_HEAD = struct.Struct(">4sHBBQ16sQIH2s")
HEAD_LEN = _HEAD.size  # 48


@dataclass(frozen=True, slots=True)
class Record:
    """The sealed bytes block ``block_no`` of file ``file_id`` held before an in-place rewrite."""

    epoch: int
    file_id: bytes
    block_no: int
    sealed: bytes
    hint: bytes = b""

    def encode(self) -> bytes:
        if not BLOCK_OVERHEAD <= len(self.sealed) <= CIPHER_BLOCK_SIZE:
            raise ValueError(f"a sealed block is 28..65564 bytes, not {len(self.sealed)}")
        hint = self.hint[:MAX_HINT]
        head = _HEAD.pack(
            MAGIC,
            VERSION,
            KIND_PREIMAGE,
            0,
            self.epoch,
            self.file_id,
            self.block_no,
            len(self.sealed),
            len(hint),
            b"\0\0",
        )
        return head + hint + self.sealed


def parse_records(data: bytes) -> list[Record]:
    """The current records of a journal file: from offset 0, while they parse and share one epoch.

    A journal file is rewritten from offset 0 with a higher epoch after every fsync, so what
    follows the current records may be older ones (lower epoch) or a record torn by a crash:
    parsing stops at the first record that does not parse or has another epoch. Never raises.
    """
    out: list[Record] = []
    pos = 0
    while pos + HEAD_LEN <= len(data):
        magic, version, kind, res1, epoch, file_id, block_no, slen, hlen, res2 = _HEAD.unpack_from(data, pos)
        if magic != MAGIC or version != VERSION or kind != KIND_PREIMAGE or res1 or res2 != b"\0\0":
            break
        if not BLOCK_OVERHEAD <= slen <= CIPHER_BLOCK_SIZE or hlen > MAX_HINT:
            break
        if out and epoch != out[0].epoch:
            break
        start = pos + HEAD_LEN
        end = start + hlen + slen
        if end > len(data):
            break
        out.append(Record(epoch, file_id, block_no, data[start + hlen : end], data[start : start + hlen]))
        pos = end
    return out
