"""The one door to `cryptography`'s AEADs: file contents (key derivation, block AEAD, header MAC)
and, at the end, the AES-SIV key that encrypts names (docs/FORMAT.md, "Names").

Why derived keys: one random 256-bit DEK per file is expanded with HKDF-SHA256 (salt = the
file id) into independent keys for block encryption and for the header MAC, plus a public
key-commitment value. Using the DEK for only one purpose each avoids the cross-use faults
found in EncFS and early gocryptfs, and the commitment stops a crafted header from opening
under a second key (AES-GCM alone is not key-committing).
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

DEK_LEN = 32
FILE_ID_LEN = 16
COMMITMENT_LEN = 32
MAC_LEN = 32

INFO_CONTENT = b"vcfs v1 content key"
INFO_HEADER_MAC = b"vcfs v1 header mac key"
INFO_COMMITMENT = b"vcfs v1 key commitment"
INFO_KEK_CHECK = b"vcfs v1 kek check"

# cryptography >= 46 opens into caller buffers; older ones get the same result with a copy
_INTO = hasattr(AESGCM, "decrypt_into")


def _hkdf(dek: bytes | bytearray, file_id: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=file_id, info=info).derive(dek)


def new_dek() -> bytearray:
    """A fresh random data key (os.urandom via cryptography's generator), in a wipeable buffer."""
    return bytearray(AESGCM.generate_key(bit_length=256))


def new_file_id() -> bytes:
    return os.urandom(FILE_ID_LEN)


def new_nonce() -> bytes:
    return os.urandom(12)


class AuthFailed(Exception):
    """Internal signal from this module; callers turn it into a named IntegrityError."""


def wipe(buf: bytearray) -> None:
    """Overwrite a key buffer in place (the one copy vcfs controls; see docs/KEYS.md, "Memory")."""
    buf[:] = bytes(len(buf))


@dataclass(frozen=True, slots=True)
class HeaderKeys:
    """What a header needs of a file's keys: the slot MAC key and the key commitment.

    Enough to authenticate and rewrite key slots (rewrap) without deriving the content key.
    ``mac_key`` is a mutable buffer so that ``wipe()`` can overwrite it when the file closes.
    Holds secrets: never log or repr it.
    """

    mac_key: bytearray
    commitment: bytes

    def __repr__(self) -> str:  # keep key bytes out of logs and tracebacks
        return f"{type(self).__name__}(<secret>)"

    def wipe(self) -> None:
        wipe(self.mac_key)

    def mac(self, data: bytes) -> bytes:
        h = crypto_hmac.HMAC(self.mac_key, hashes.SHA256())
        h.update(data)
        return h.finalize()

    def mac_ok(self, data: bytes, tag: bytes) -> bool:
        return hmac.compare_digest(self.mac(data), tag)

    def commitment_ok(self, stored: bytes) -> bool:
        return hmac.compare_digest(self.commitment, stored)


@dataclass(frozen=True, slots=True, repr=False)
class FileKeys(HeaderKeys):
    """The keys of one file, derived from its DEK: the header keys plus the block content key.

    The content key lives inside ``cryptography``'s AESGCM object, which offers no wipe.
    """

    content: AESGCM

    def seal(self, nonce: bytes, plaintext: bytes | bytearray | memoryview, aad: bytes) -> bytes:
        """AES-256-GCM: returns ciphertext || 16-byte tag."""
        return self.content.encrypt(nonce, plaintext, aad)

    def open(self, nonce: bytes | memoryview, sealed: bytes | memoryview, aad: bytes) -> bytes:
        try:
            return self.content.decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise AuthFailed from None

    def open_into(self, nonce: bytes | memoryview, sealed: bytes | memoryview, aad: bytes, out: memoryview) -> None:
        """``open`` written into ``out`` (exactly len(sealed) - 16 bytes).

        On AuthFailed ``out`` may hold unauthenticated bytes (cryptography decrypts before it
        compares the tag): the caller must discard the buffer, never hand it out.
        """
        try:
            if _INTO:
                self.content.decrypt_into(nonce, sealed, aad, out)
            else:
                out[:] = self.content.decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise AuthFailed from None


def derive_header_keys(dek: bytes | bytearray, file_id: bytes) -> HeaderKeys:
    if len(dek) != DEK_LEN:
        raise ValueError("DEK must be 32 bytes")
    return HeaderKeys(
        mac_key=bytearray(_hkdf(dek, file_id, INFO_HEADER_MAC)), commitment=_hkdf(dek, file_id, INFO_COMMITMENT)
    )


def derive_file_keys(dek: bytes | bytearray, file_id: bytes) -> FileKeys:
    if len(dek) != DEK_LEN:
        raise ValueError("DEK must be 32 bytes")
    return FileKeys(
        mac_key=bytearray(_hkdf(dek, file_id, INFO_HEADER_MAC)),
        commitment=_hkdf(dek, file_id, INFO_COMMITMENT),
        content=AESGCM(_hkdf(dek, file_id, INFO_CONTENT)),
    )


def kek_check_value(probe_key: bytes | bytearray) -> bytes:
    """Public value proving that a wrapped probe key unwraps to the key it was made from.

    The store config keeps a probe key wrapped under each KEK plus this value, so a mount
    against the wrong KEK fails at start with a clear message instead of at the first read.
    """
    return _hkdf(probe_key, b"", INFO_KEK_CHECK)


# ---- names: AES-SIV (RFC 5297) under a key derived from the store's names secret -----------------

NAMES_SECRET_LEN = 32
NAMES_KEY_LEN = 64  # AES-SIV-512: a 256-bit S2V/CMAC key and a 256-bit CTR key
INFO_NAMES = b"vcfs v1 names key"


def new_names_secret() -> bytes:
    """The random secret behind a names key; wrapped by a KEK exactly like a DEK (32 bytes)."""
    return AESGCM.generate_key(bit_length=256)


class NamesKey:
    """Deterministic AEAD for names and symlink targets. Holds a secret: never log or repr it.

    Why SIV: a name must encrypt to the same backing name every time (lookups go from the
    plaintext name to the backing name), and SIV stays secure when a (key, associated data)
    pair repeats; it only reveals that the plaintexts were equal.
    """

    def __init__(self, secret: bytes) -> None:
        if len(secret) != NAMES_SECRET_LEN:
            raise ValueError("names secret must be 32 bytes")
        key = HKDF(algorithm=hashes.SHA256(), length=NAMES_KEY_LEN, salt=None, info=INFO_NAMES).derive(secret)
        self._siv = AESSIV(key)

    def __repr__(self) -> str:
        return "NamesKey(<secret>)"

    def seal(self, plaintext: bytes, associated: list[bytes]) -> bytes:
        """AES-SIV: returns the 16-byte synthetic IV || ciphertext (as long as the plaintext)."""
        return self._siv.encrypt(plaintext, associated)

    def open(self, sealed: bytes, associated: list[bytes]) -> bytes:
        try:
            return self._siv.decrypt(sealed, associated)
        except InvalidTag:
            raise AuthFailed from None
