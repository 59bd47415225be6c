"""Size arithmetic of the v1 layout: the two directions agree and impossible sizes are refused."""

from __future__ import annotations

import pytest

from vcfs.core.layout import (
    BLOCK_OVERHEAD,
    BLOCK_SIZE,
    HEADER_LEN,
    block_count,
    cipher_to_plain_size,
    cipher_to_plain_size_or_floor,
    plain_to_cipher_size,
)
from vcfs.errors import TruncatedError

SIZES = [0, 1, 4095, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 3 * BLOCK_SIZE, 10**7 + 3]


@pytest.mark.parametrize("size", SIZES)
def test_sizes_round_trip(size: int) -> None:
    assert cipher_to_plain_size(plain_to_cipher_size(size)) == size


def test_empty_file_is_one_final_block() -> None:
    assert block_count(0) == 1
    assert plain_to_cipher_size(0) == HEADER_LEN + BLOCK_OVERHEAD


@pytest.mark.parametrize(
    "cipher_size", [0, HEADER_LEN, HEADER_LEN + BLOCK_OVERHEAD - 1, HEADER_LEN + BLOCK_SIZE + BLOCK_OVERHEAD + 5]
)
def test_impossible_backing_sizes_are_truncation(cipher_size: int) -> None:
    with pytest.raises(TruncatedError):
        cipher_to_plain_size(cipher_size)
    assert cipher_to_plain_size_or_floor(cipher_size) >= 0
