"""X-Wing, the hybrid KEM that wraps DEKs to a recipient on write-only (ingest) hosts.

Why X-Wing: a recording sealed today must stay sealed if a quantum computer arrives later
("harvest now, decrypt later"), and also if ML-KEM turns out weaker than believed. X-Wing
(draft-connolly-cfrg-xwing-kem-08; security proof in ePrint 2024/039) combines ML-KEM-768
(FIPS 203) and X25519 (RFC 7748) so that breaking it needs breaking both. It is the KEM
the HPKE post-quantum drafts register as MLKEM768-X25519.

Only the composition is written here; every primitive comes from ``cryptography``:
ML-KEM-768 and X25519 for the two KEMs, SHAKE256 to expand the 32-byte seed, SHA3-256 for
the combiner. Pure: bytes in, bytes out, no I/O.

    expand(seed):     x = SHAKE256(seed, 96); ML-KEM-768 key from x[0:64] (d || z),
                      X25519 key from x[64:96]; pk = pk_M (1184) || pk_X (32)
    encapsulate(pk):  e random; ct_X = X25519(e, base); ss_X = X25519(e, pk_X)
                      (ss_M, ct_M) = ML-KEM-768.Encaps(pk_M); ct = ct_M (1088) || ct_X (32)
    decapsulate:      ss_M = ML-KEM-768.Decaps(ct_M); ss_X = X25519(sk_X, ct_X)
    combiner:         ss = SHA3-256(ss_M || ss_X || ct_X || pk_X || "\\.//^\\")
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

SEED_LEN = 32
MLKEM_PK_LEN = 1184
MLKEM_CT_LEN = 1088
X25519_LEN = 32
PUBLIC_KEY_LEN = MLKEM_PK_LEN + X25519_LEN  # 1216
CIPHERTEXT_LEN = MLKEM_CT_LEN + X25519_LEN  # 1120
SHARED_SECRET_LEN = 32
LABEL = b"\\.//^\\"  # 5c 2e 2f 2f 5e 5c, X-Wing's domain separator


class XWingError(Exception):
    """A malformed key or ciphertext; callers turn it into a named vcfs error."""


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


@dataclass(frozen=True, slots=True)
class XWingPrivateKey:
    """The expanded decapsulation key. Holds secrets: never log or repr it."""

    mlkem_key: mlkem.MLKEM768PrivateKey
    x25519_key: x25519.X25519PrivateKey
    public: bytes

    def __repr__(self) -> str:
        return "XWingPrivateKey(<secret>)"


def new_seed() -> bytes:
    return os.urandom(SEED_LEN)


def expand(seed: bytes | bytearray) -> XWingPrivateKey:
    """The decapsulation key and public key that a 32-byte seed stands for."""
    if len(seed) != SEED_LEN:
        raise XWingError(f"X-Wing seed must be {SEED_LEN} bytes")
    expanded = _digest(hashes.SHAKE256(digest_size=96), bytes(seed))
    key_m = mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64])
    key_x = x25519.X25519PrivateKey.from_private_bytes(expanded[64:96])
    public = key_m.public_key().public_bytes_raw() + key_x.public_key().public_bytes_raw()
    return XWingPrivateKey(key_m, key_x, public)


def combiner(ss_m: bytes, ss_x: bytes, ct_x: bytes, pk_x: bytes) -> bytes:
    return _digest(hashes.SHA3_256(), ss_m + ss_x + ct_x + pk_x + LABEL)


def _split_public(public: bytes) -> tuple[mlkem.MLKEM768PublicKey, bytes]:
    if len(public) != PUBLIC_KEY_LEN:
        raise XWingError(f"X-Wing public key must be {PUBLIC_KEY_LEN} bytes, not {len(public)}")
    try:
        key_m = mlkem.MLKEM768PublicKey.from_public_bytes(public[:MLKEM_PK_LEN])
    except ValueError:
        raise XWingError("invalid ML-KEM-768 public key") from None
    return key_m, public[MLKEM_PK_LEN:]


def encapsulate(public: bytes, x25519_ephemeral: bytes | None = None) -> tuple[bytes, bytes]:
    """(shared secret, ciphertext) for ``public``.

    ``x25519_ephemeral`` fixes the classical half for test vectors only; ML-KEM's own
    randomness cannot be fixed through ``cryptography``, so vectors are checked by
    decapsulation.
    """
    key_m, pk_x = _split_public(public)
    eph = (
        x25519.X25519PrivateKey.generate()
        if x25519_ephemeral is None
        else x25519.X25519PrivateKey.from_private_bytes(x25519_ephemeral)
    )
    ct_x = eph.public_key().public_bytes_raw()
    try:
        ss_x = eph.exchange(x25519.X25519PublicKey.from_public_bytes(pk_x))
    except ValueError:  # a low-order point gives an all-zero secret, which cryptography refuses
        raise XWingError("invalid X25519 public key") from None
    ss_m, ct_m = key_m.encapsulate()
    return combiner(ss_m, ss_x, ct_x, pk_x), ct_m + ct_x


def decapsulate(key: XWingPrivateKey, ciphertext: bytes | memoryview) -> bytes:
    """The shared secret. ML-KEM rejects implicitly (a wrong ciphertext gives a wrong secret),
    so callers must authenticate what they derive from it."""
    ct = bytes(ciphertext)
    if len(ct) != CIPHERTEXT_LEN:
        raise XWingError(f"X-Wing ciphertext must be {CIPHERTEXT_LEN} bytes, not {len(ct)}")
    ct_m, ct_x = ct[:MLKEM_CT_LEN], ct[MLKEM_CT_LEN:]
    ss_m = key.mlkem_key.decapsulate(ct_m)
    try:
        ss_x = key.x25519_key.exchange(x25519.X25519PublicKey.from_public_bytes(ct_x))
    except ValueError:
        raise XWingError("invalid X25519 ciphertext (low-order point)") from None
    return combiner(ss_m, ss_x, ct_x, key.public[MLKEM_PK_LEN:])
