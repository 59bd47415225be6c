"""Sizes and offsets of the v1 backing-file layout (see docs/FORMAT.md, "Layout").

A backing file is a fixed 4096-byte header followed by sealed blocks. Every block but the
last holds exactly BLOCK_SIZE plaintext bytes; the last holds 0..BLOCK_SIZE bytes, and it
holds 0 bytes only when the whole file is empty. So every file, even an empty one, has at
least one block, which is sealed as *final*: cutting a file back to any block boundary
leaves a last block that was not sealed final, and the reader notices.
"""

from __future__ import annotations

from vcfs.errors import TruncatedError

HEADER_LEN = 4096
BLOCK_SHIFT = 16
BLOCK_SIZE = 1 << BLOCK_SHIFT  # plaintext bytes per block
NONCE_LEN = 12
TAG_LEN = 16
BLOCK_OVERHEAD = NONCE_LEN + TAG_LEN
CIPHER_BLOCK_SIZE = BLOCK_SIZE + BLOCK_OVERHEAD  # stride of blocks in the backing file


def block_count(plain_size: int) -> int:
    """Number of blocks a file of ``plain_size`` bytes is stored in (never 0)."""
    return max(1, -(-plain_size // BLOCK_SIZE))


def block_len(block_no: int, plain_size: int) -> int:
    """Plaintext length of block ``block_no`` in a file of ``plain_size`` bytes."""
    return max(0, min(BLOCK_SIZE, plain_size - block_no * BLOCK_SIZE))


def plain_off_to_block_no(plain_off: int) -> int:
    return plain_off >> BLOCK_SHIFT


def block_no_to_cipher_off(block_no: int) -> int:
    """Offset of block ``block_no``'s nonce in the backing file."""
    return HEADER_LEN + block_no * CIPHER_BLOCK_SIZE


def plain_to_cipher_size(plain_size: int) -> int:
    """Backing-file size of a file holding ``plain_size`` plaintext bytes."""
    return HEADER_LEN + plain_size + block_count(plain_size) * BLOCK_OVERHEAD


def cipher_to_plain_size(cipher_size: int) -> int:
    """Plaintext size implied by a backing-file size; raises on impossible sizes.

    Only the length arithmetic is checked here; that the last block really is the final
    one is proven when it is decrypted.
    """
    body = cipher_size - HEADER_LEN
    if body < BLOCK_OVERHEAD:
        raise TruncatedError(f"backing file has {max(body, 0)} bytes after the header; no final block")
    full, rest = divmod(body, CIPHER_BLOCK_SIZE)
    if rest == 0:
        return full * BLOCK_SIZE
    if rest < BLOCK_OVERHEAD:
        raise TruncatedError(f"last block is {rest} bytes, shorter than nonce and tag")
    return full * BLOCK_SIZE + rest - BLOCK_OVERHEAD


def cipher_to_plain_size_or_floor(cipher_size: int) -> int:
    """Like cipher_to_plain_size, but for stat(): never raises, reports what is readable."""
    try:
        return cipher_to_plain_size(cipher_size)
    except TruncatedError:
        body = max(cipher_size - HEADER_LEN, 0)
        return (body // CIPHER_BLOCK_SIZE) * BLOCK_SIZE
