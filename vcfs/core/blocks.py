"""Sealing and opening one 64 KiB block (docs/FORMAT.md, "Blocks").

A sealed block is nonce(12) || AES-256-GCM ciphertext || tag(16). Its AAD is
preamble[0:28] || block number (u64 big-endian) || final flag (1 byte), which binds the block
to the format, to its file (file id), to its position, and to whether it ends the file.
"""

from __future__ import annotations

import struct

from vcfs.core.aead import AuthFailed, FileKeys, new_nonce
from vcfs.core.layout import BLOCK_OVERHEAD, BLOCK_SIZE, NONCE_LEN
from vcfs.errors import BlockAuthError

_POS = struct.Struct(">QB")


def block_aad(bound: bytes, block_no: int, final: bool) -> bytes:
    return bound + _POS.pack(block_no, 1 if final else 0)


def seal_block(
    keys: FileKeys,
    bound: bytes,
    block_no: int,
    final: bool,
    plaintext: bytes | bytearray | memoryview,
    nonce: bytes | None = None,
) -> bytes:
    """Seal one block. ``nonce`` is for test vectors only; normal use draws a fresh one."""
    if len(plaintext) > BLOCK_SIZE:
        raise ValueError("block longer than BLOCK_SIZE")
    nonce = new_nonce() if nonce is None else nonce
    return nonce + keys.seal(nonce, plaintext, block_aad(bound, block_no, final))


def seal_block_parts(
    keys: FileKeys, bound: bytes, block_no: int, final: bool, plaintext: bytes | bytearray | memoryview
) -> tuple[bytes, bytes]:
    """``seal_block`` as its two parts, nonce and ciphertext || tag (a vectored write needs no join)."""
    if len(plaintext) > BLOCK_SIZE:
        raise ValueError("block longer than BLOCK_SIZE")
    nonce = new_nonce()
    return nonce, keys.seal(nonce, plaintext, block_aad(bound, block_no, final))


def open_block_into(
    keys: FileKeys, bound: bytes, block_no: int, final: bool, sealed: bytes | memoryview, out: memoryview
) -> int:
    """``open_block`` written into the front of ``out``; returns the plaintext length.

    On BlockAuthError ``out`` may hold unauthenticated bytes: discard it.
    """
    if len(sealed) < BLOCK_OVERHEAD:
        raise BlockAuthError(f"block {block_no} is {len(sealed)} bytes, shorter than nonce and tag", block_no)
    view = memoryview(sealed)
    n = len(view) - BLOCK_OVERHEAD
    try:
        keys.open_into(view[:NONCE_LEN], view[NONCE_LEN:], block_aad(bound, block_no, final), out[:n])
    except AuthFailed:
        raise BlockAuthError(
            f"block {block_no} failed authentication ({'final' if final else 'inner'} position)", block_no
        ) from None
    return n


def open_block(keys: FileKeys, bound: bytes, block_no: int, final: bool, sealed: bytes | memoryview) -> bytes:
    """Authenticate and decrypt one block, or raise BlockAuthError; never returns unverified bytes."""
    if len(sealed) < BLOCK_OVERHEAD:
        raise BlockAuthError(f"block {block_no} is {len(sealed)} bytes, shorter than nonce and tag", block_no)
    view = memoryview(sealed)
    try:
        return keys.open(view[:NONCE_LEN], view[NONCE_LEN:], block_aad(bound, block_no, final))
    except AuthFailed:
        raise BlockAuthError(
            f"block {block_no} failed authentication ({'final' if final else 'inner'} position)", block_no
        ) from None
