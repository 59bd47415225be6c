"""Name codec: plaintext names and symlink targets to backing names and back (docs/FORMAT.md, "Names").

Pure: bytes in, bytes out. The backing-directory side (directory-id files, long-name sidecars,
listings) lives in vcfs/names.py.

    padded  = PKCS#7(name, 16)                       name: 1..255 bytes, no '/' or NUL
    sealed  = AES-SIV(names key, padded, AD = ["vcfs v1 name", directory id])
    entry   = base64url(sealed), no '=' padding      if that is at most 255 bytes (names up to 159 bytes)
            = base64url(SHA-256(sealed)) + ".long"   otherwise; the sidecar H.name then holds ``sealed``

Padding to 16 bytes hides a name's exact length (only its 16-byte bucket shows). The
directory id as associated data makes equal names differ between directories and makes a
name moved or copied into another directory fail to decrypt there. Backing names never
contain a '.', so vcfs's own files (which all do) never collide with an entry.

Symlink targets are sealed the same way but with a fresh random 16-byte nonce as the last
associated-data element (``["vcfs v1 symlink", nonce]``) and stored as base64url(nonce ||
sealed): a target is never looked up by value, so equal targets need not look equal.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass
from enum import Enum

from cryptography.hazmat.primitives import hashes

from vcfs.core.aead import AuthFailed, NamesKey
from vcfs.errors import NameAuthError, NameTooLongError, UsageError

NAME_MAX = 255  # bytes of a plaintext name, and of a backing name
PAD_TO = 16
SIV_LEN = 16
DIR_ID_LEN = 16
TARGET_NONCE_LEN = 16
TARGET_MAX = 3023  # longest plaintext target whose stored form fits a 4095-byte symlink
STORED_TARGET_MAX = 4095

AD_NAME = b"vcfs v1 name"
AD_TARGET = b"vcfs v1 symlink"

DIR_ID_NAME = b"vcfs.dirid"  # in every backing directory: its 16 random id bytes
TMP_PREFIX = b"vcfs.tmp."  # half-done mkdir / rmdir / rename-over-directory, and sidecar temp files
LONG_SUFFIX = b".long"
SIDECAR_SUFFIX = b".name"
_B64 = rb"[A-Za-z0-9_-]"
_B64_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_B64_RE = re.compile(_B64 + rb"+")
_LONG_RE = re.compile(_B64 + rb"{43}" + re.escape(LONG_SUFFIX))
_SIDECAR_RE = re.compile(_B64 + rb"{43}" + re.escape(SIDECAR_SUFFIX))


class Kind(Enum):
    """What a name found in a backing directory of an encrypted-names store is."""

    SHORT = "short"  # an entry; the name is its own ciphertext
    LONG = "long"  # an entry whose ciphertext is in its sidecar
    SIDECAR = "sidecar"  # H.name: the ciphertext of the long entry H.long
    DIR_ID = "dirid"
    TMP = "tmp"  # left over from an interrupted operation
    FOREIGN = "foreign"  # not written by vcfs


def classify(entry: bytes) -> Kind:
    if b"." not in entry:  # the common case, without a regex: all base64url, at most 255 bytes
        return Kind.SHORT if 0 < len(entry) <= NAME_MAX and not entry.translate(None, _B64_CHARS) else Kind.FOREIGN
    if entry == DIR_ID_NAME:
        return Kind.DIR_ID
    if entry.startswith(TMP_PREFIX):
        return Kind.TMP
    if _LONG_RE.fullmatch(entry):
        return Kind.LONG
    if _SIDECAR_RE.fullmatch(entry):
        return Kind.SIDECAR
    return Kind.FOREIGN


def is_entry(entry: bytes) -> bool:
    """True for names that stand for a plaintext entry (short or long); False for vcfs's own files."""
    return classify(entry) in (Kind.SHORT, Kind.LONG)


def sidecar_of(long_entry: bytes) -> bytes:
    return long_entry[: -len(LONG_SUFFIX)] + SIDECAR_SUFFIX


@dataclass(frozen=True, slots=True)
class EntryName:
    """The backing name of one plaintext name in one directory."""

    entry: bytes
    sidecar: bytes | None = None  # long names only: the sealed name, the content of sidecar_of(entry)

    @property
    def sidecar_name(self) -> bytes | None:
        return sidecar_of(self.entry) if self.sidecar is not None else None


def b64encode(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


_URL_TO_STD = bytes.maketrans(b"-_", b"+/")
_B64_VALUE = {c: i for i, c in enumerate(_B64_CHARS)}


def b64decode(text: bytes, alphabet_checked: bool = False) -> bytes:
    """Strict base64url without padding: only the canonical encoding of some bytes is accepted
    (``alphabet_checked``: the caller already matched ``text`` against the base64url alphabet)."""
    if not alphabet_checked and not _B64_RE.fullmatch(text):
        raise NameAuthError("not a base64url name")
    tail = len(text) % 4
    if tail == 1:
        raise NameAuthError("not a base64url name")
    # Canonical: the bits of the last character that encode no byte are zero.
    if tail and _B64_VALUE[text[-1]] & (0x0F if tail == 2 else 0x03):
        raise NameAuthError("not a canonical base64url name")
    return binascii.a2b_base64(text.translate(_URL_TO_STD) + b"=" * (-len(text) % 4))


def sha256(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()


def _pad(data: bytes) -> bytes:
    """PKCS#7 (RFC 5652, 6.3) to a multiple of 16: k bytes of value k, 1 <= k <= 16."""
    k = PAD_TO - len(data) % PAD_TO
    return data + bytes((k,)) * k


def _unpad(data: bytes) -> bytes:
    """Undo ``_pad``; only ever applied to authenticated plaintext, so no oracle to guard."""
    k = data[-1] if data else 0
    if not 1 <= k <= PAD_TO or data[-k:] != bytes((k,)) * k:
        raise NameAuthError("bad padding in an authentic name")
    return data[:-k]


def _valid(name: bytes) -> bool:
    return bool(name) and len(name) <= NAME_MAX and name not in (b".", b"..") and b"/" not in name and b"\0" not in name


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise NameTooLongError(f"file name is {len(name)} bytes; at most {NAME_MAX} are allowed")
    if not _valid(name):
        raise UsageError(f"invalid file name {name!r}")


class NameCodec:
    """Encrypts and decrypts the names of one key domain (thread-safe: it keeps no state)."""

    def __init__(self, key: NamesKey) -> None:
        self._key = key

    def __repr__(self) -> str:
        return "NameCodec(<secret>)"

    def encrypt(self, name: bytes, dir_id: bytes) -> EntryName:
        check_name(name)
        sealed = self._key.seal(_pad(name), [AD_NAME, dir_id])
        text = b64encode(sealed)
        if len(text) <= NAME_MAX:
            return EntryName(text)
        return EntryName(b64encode(sha256(sealed)) + LONG_SUFFIX, sealed)

    def decrypt(self, entry: bytes, dir_id: bytes, sidecar: bytes | None = None, kind: Kind | None = None) -> bytes:
        """The plaintext name of ``entry``; for a long entry, ``sidecar`` is its sidecar's content.

        Raises NameAuthError for anything that was not written by this key for this directory.
        ``kind`` is ``classify(entry)`` when the caller already has it.
        """
        kind = classify(entry) if kind is None else kind
        if kind is Kind.SHORT:
            sealed = b64decode(entry, alphabet_checked=True)
        elif kind is Kind.LONG:
            if sidecar is None:
                raise NameAuthError("long name without its sidecar")
            if b64encode(sha256(sidecar)) != entry[: -len(LONG_SUFFIX)]:
                raise NameAuthError("long-name sidecar does not belong to this entry")
            sealed = sidecar
        else:
            raise NameAuthError(f"not an encrypted name ({kind.value})")
        if len(sealed) < SIV_LEN + PAD_TO or (len(sealed) - SIV_LEN) % PAD_TO:
            raise NameAuthError("encrypted name has an impossible length")
        try:
            name = _unpad(self._key.open(sealed, [AD_NAME, dir_id]))
        except AuthFailed:
            raise NameAuthError("name does not decrypt in this directory (moved, copied or damaged)") from None
        if kind is Kind.LONG and len(b64encode(sealed)) <= NAME_MAX:
            raise NameAuthError("short name stored as a long one")  # one plaintext name, one backing name
        if not _valid(name):
            raise NameAuthError("decrypted name is not a valid file name")
        return name

    def encrypt_target(self, target: bytes, nonce: bytes | None = None) -> bytes:
        """The stored form of a symlink target; ``nonce`` only for test vectors (default: random)."""
        if not target or b"\0" in target:
            raise NameAuthError("invalid symlink target")
        if len(target) > TARGET_MAX:
            raise NameTooLongError(
                f"symlink target is {len(target)} bytes; at most {TARGET_MAX} can be stored encrypted"
            )
        nonce = os.urandom(TARGET_NONCE_LEN) if nonce is None else nonce
        return b64encode(nonce + self._key.seal(_pad(target), [AD_TARGET, nonce]))

    def decrypt_target(self, stored: bytes) -> bytes:
        raw = b64decode(stored)
        if len(raw) < TARGET_NONCE_LEN + SIV_LEN + PAD_TO or (len(raw) - TARGET_NONCE_LEN - SIV_LEN) % PAD_TO:
            raise NameAuthError("not an encrypted symlink target")
        nonce, sealed = raw[:TARGET_NONCE_LEN], raw[TARGET_NONCE_LEN:]
        try:
            target = _unpad(self._key.open(sealed, [AD_TARGET, nonce]))
        except AuthFailed:
            raise NameAuthError("symlink target does not decrypt (damaged or not written by this store)") from None
        if not target or b"\0" in target:
            raise NameAuthError("invalid symlink target")
        return target
