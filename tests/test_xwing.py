"""Known answers for the hybrid KEM and the recipient wrap (pure; no HSM, no mount).

The X-Wing vectors are draft-connolly-cfrg-xwing-kem-08 Appendix C. ``cryptography`` cannot
fix ML-KEM's encapsulation randomness, so they are checked the way a recipient uses them:
seed -> public key, and ciphertext -> shared secret.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vcfs.core import kemwrap, xwing
from vcfs.errors import HeaderAuthError

VECTORS = json.loads((Path(__file__).parent / "data" / "xwing-draft08.json").read_text())["vectors"]


@pytest.mark.parametrize("vec", VECTORS, ids=lambda v: v["sk"][:8])
def test_xwing_known_answers(vec: dict[str, str]) -> None:
    key = xwing.expand(bytes.fromhex(vec["sk"]))
    assert key.public == bytes.fromhex(vec["pk"])
    assert xwing.decapsulate(key, bytes.fromhex(vec["ct"])) == bytes.fromhex(vec["ss"])


@pytest.mark.parametrize("vec", VECTORS, ids=lambda v: v["sk"][:8])
def test_xwing_classical_half_matches_vector(vec: dict[str, str]) -> None:
    """With the vector's X25519 ephemeral (eseed[32:64]), ct_X equals the vector's."""
    eseed = bytes.fromhex(vec["eseed"])
    _ss, ct = xwing.encapsulate(bytes.fromhex(vec["pk"]), x25519_ephemeral=eseed[32:])
    assert ct[xwing.MLKEM_CT_LEN :] == bytes.fromhex(vec["ct"])[xwing.MLKEM_CT_LEN :]


def test_combiner_binds_every_input() -> None:
    parts = [os.urandom(32) for _ in range(4)]
    base = xwing.combiner(*parts)
    for i in range(4):
        changed = list(parts)
        changed[i] = bytes([parts[i][0] ^ 1]) + parts[i][1:]
        assert xwing.combiner(*changed) != base


def test_round_trip_and_fresh_ciphertexts() -> None:
    key = xwing.expand(xwing.new_seed())
    ss1, ct1 = xwing.encapsulate(key.public)
    ss2, ct2 = xwing.encapsulate(key.public)
    assert ct1 != ct2 and ss1 != ss2
    assert xwing.decapsulate(key, ct1) == ss1


def test_wrap_round_trip() -> None:
    key = xwing.expand(xwing.new_seed())
    dek = os.urandom(32)
    blob = kemwrap.wrap_to(key.public, dek)
    assert len(blob) == kemwrap.BLOB_LEN
    assert kemwrap.unwrap_with(key, blob) == dek


@pytest.mark.parametrize(
    "where",
    [0, kemwrap.FINGERPRINT_LEN + 5, kemwrap.FINGERPRINT_LEN + xwing.MLKEM_CT_LEN + 3, kemwrap.BLOB_LEN - 1],
    ids=["fingerprint", "mlkem-ct", "x25519-ct", "wrapped-dek"],
)
def test_tampered_wrap_fails_with_named_error(where: int) -> None:
    key = xwing.expand(xwing.new_seed())
    blob = bytearray(kemwrap.wrap_to(key.public, os.urandom(32)))
    blob[where] ^= 0x01
    with pytest.raises(HeaderAuthError):
        kemwrap.unwrap_with(key, bytes(blob))


def test_other_recipient_is_named() -> None:
    a, b = xwing.expand(xwing.new_seed()), xwing.expand(xwing.new_seed())
    blob = kemwrap.wrap_to(a.public, os.urandom(32))
    with pytest.raises(HeaderAuthError, match="another recipient"):
        kemwrap.unwrap_with(b, blob)


@pytest.mark.parametrize("bad", [b"", b"\0" * 31, b"\0" * 33])
def test_bad_seed_and_key_lengths(bad: bytes) -> None:
    with pytest.raises(xwing.XWingError):
        xwing.expand(bad)
    with pytest.raises(xwing.XWingError):
        xwing.encapsulate(bad)
