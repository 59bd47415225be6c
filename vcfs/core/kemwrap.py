"""Wrap algorithm 2: a file's DEK sealed to a recipient's X-Wing public key (docs/FORMAT.md).

Why: an ingest host must be able to create files whose DEKs it can never unwrap again. It
holds only the recipient's public key; the private seed stays wrapped by the HSM on trusted
hosts. The wrapped blob is

    fingerprint (16) || X-Wing ciphertext (1120) || RFC 5649 wrap of the DEK (40)

where the RFC 5649 key is HKDF-SHA256(ikm = X-Wing shared secret, salt = fingerprint,
info = "vcfs v1 xwing dek wrap"). RFC 5649's integrity check makes a modified ciphertext,
fingerprint or wrap fail to unwrap, because ML-KEM's implicit rejection turns a modified
ciphertext into a different (random-looking) secret. The header slot's MAC then covers the
whole blob like any other wrap. Pure: no I/O.
"""

from __future__ import annotations

import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)

from vcfs.core import xwing
from vcfs.core.header import WRAP_XWING_KWP
from vcfs.errors import HeaderAuthError

__all__ = ["BLOB_LEN", "WRAP_XWING_KWP", "blob_fingerprint", "fingerprint", "unwrap_with", "wrap_to"]
FINGERPRINT_LEN = 16
WRAPPED_DEK_LEN = 40
BLOB_LEN = FINGERPRINT_LEN + xwing.CIPHERTEXT_LEN + WRAPPED_DEK_LEN  # 1176
INFO_FINGERPRINT = b"vcfs v1 recipient"
INFO_WRAP = b"vcfs v1 xwing dek wrap"


def fingerprint(public: bytes) -> bytes:
    """Names a recipient key: SHA3-256("vcfs v1 recipient" || public key)[0:16]."""
    h = hashes.Hash(hashes.SHA3_256())
    h.update(INFO_FINGERPRINT + public)
    return h.finalize()[:FINGERPRINT_LEN]


def _wrap_key(shared_secret: bytes, fp: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=fp, info=INFO_WRAP).derive(shared_secret)


def wrap_to(public: bytes, dek: bytes | bytearray, x25519_ephemeral: bytes | None = None) -> bytes:
    """Seal ``dek`` to the recipient ``public``. ``x25519_ephemeral``: test vectors only."""
    fp = fingerprint(public)
    secret, ct = xwing.encapsulate(public, x25519_ephemeral)
    return fp + ct + aes_key_wrap_with_padding(_wrap_key(secret, fp), bytes(dek))


def blob_fingerprint(blob: bytes) -> bytes:
    if len(blob) != BLOB_LEN:
        raise HeaderAuthError(f"recipient-wrapped key is {len(blob)} bytes, expected {BLOB_LEN}")
    return blob[:FINGERPRINT_LEN]


def unwrap_with(key: xwing.XWingPrivateKey, blob: bytes) -> bytearray:
    """The DEK, or HeaderAuthError naming what did not match. Never returns unverified bytes.

    The DEK comes in a fresh buffer that the caller owns and overwrites (``cryptography``'s own
    ``bytes`` copy cannot be wiped; see docs/KEYS.md, "Memory")."""
    fp = blob_fingerprint(blob)
    if not hmac.compare_digest(fp, fingerprint(key.public)):
        raise HeaderAuthError("the DEK is wrapped to another recipient key (fingerprint mismatch)")
    ct = blob[FINGERPRINT_LEN : FINGERPRINT_LEN + xwing.CIPHERTEXT_LEN]
    try:
        secret = xwing.decapsulate(key, ct)
        return bytearray(
            aes_key_unwrap_with_padding(_wrap_key(secret, fp), blob[FINGERPRINT_LEN + xwing.CIPHERTEXT_LEN :])
        )
    except (InvalidUnwrap, xwing.XWingError):
        raise HeaderAuthError(
            "the recipient-wrapped DEK does not open: KEM ciphertext or wrapped key was modified"
        ) from None
