"""The v1 header: a 64-byte preamble and two 2016-byte key slots (docs/FORMAT.md, "Header").

Why two slots: a header is rewritten only to rewrap the DEK (key rotation) or to raise the
reserved seal count. Writing the inactive slot in place, then syncing, never leaves a moment
without a valid slot, and needs no rename, which shared stores (NFS, CephFS, JuiceFS) make
unsafe for concurrent readers. Readers take the valid slot with the highest generation.

Everything a reader acts on is authenticated: the preamble is bound into every block's AAD
and into each slot's MAC, and each slot's MAC covers all of its bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from vcfs.core.aead import COMMITMENT_LEN, FILE_ID_LEN, MAC_LEN, HeaderKeys
from vcfs.core.layout import BLOCK_SHIFT, HEADER_LEN
from vcfs.errors import FormatError, HeaderAuthError, UnsupportedFormat

MAGIC = b"VCFS"
VERSION = 1
CIPHER_AES256GCM_R96 = 1  # AES-256-GCM, random 96-bit nonce per block, 128-bit tag
KDF_HKDF_SHA256 = 1
WRAP_PKCS11_AES_KWP = 1  # RFC 5649 AES key wrap with padding, done by a PKCS#11 token
WRAP_XWING_KWP = 2  # hybrid KEM (X-Wing) to recipient N, then RFC 5649 (vcfs/core/kemwrap.py)
KNOWN_WRAPS = {
    WRAP_PKCS11_AES_KWP: "PKCS#11 AES key wrap with padding (RFC 5649)",
    WRAP_XWING_KWP: "X-Wing hybrid KEM to a recipient key, then RFC 5649",
}

SLOT_COUNT = 2
PREAMBLE_LEN = 64
BOUND_LEN = 28  # preamble bytes bound into every block's AAD: all but the commitment
SLOT_LEN = (HEADER_LEN - PREAMBLE_LEN) // SLOT_COUNT  # 2016
SLOT_BODY_LEN = SLOT_LEN - MAC_LEN  # bytes covered by the slot MAC, after the preamble
_SLOT_FIXED = struct.Struct(">QHIQBH")  # generation, wrap alg, kek version, seals, dlen, wlen
MAX_DOMAIN_LEN = 64
MAX_WRAPPED_LEN = SLOT_BODY_LEN - _SLOT_FIXED.size - MAX_DOMAIN_LEN

_PREAMBLE = struct.Struct(">4sHHBBBB16s32s4s")


@dataclass(frozen=True, slots=True)
class Preamble:
    file_id: bytes
    commitment: bytes
    version: int = VERSION
    cipher: int = CIPHER_AES256GCM_R96
    kdf: int = KDF_HKDF_SHA256

    def encode(self) -> bytes:
        return _PREAMBLE.pack(
            MAGIC,
            self.version,
            HEADER_LEN,
            BLOCK_SHIFT,
            self.cipher,
            SLOT_COUNT,
            self.kdf,
            self.file_id,
            self.commitment,
            b"\0" * 4,
        )

    @property
    def bound(self) -> bytes:
        """The 28 bytes every block's AAD starts with: format ids and the file id."""
        return self.encode()[:BOUND_LEN]


@dataclass(frozen=True, slots=True)
class KeySlot:
    """One wrapping of the file's DEK. ``generation`` 0 marks an empty slot."""

    generation: int
    wrap_alg: int
    domain: str
    kek_version: int
    wrapped: bytes
    seals: int  # block seals reserved under this DEK so far (an upper bound, see cryptfile)
    mac: bytes = b""

    def body(self) -> bytes:
        domain = self.domain.encode()
        fixed = _SLOT_FIXED.pack(
            self.generation, self.wrap_alg, self.kek_version, self.seals, len(domain), len(self.wrapped)
        )
        raw = fixed + domain + self.wrapped
        return raw + b"\0" * (SLOT_BODY_LEN - len(raw))

    def sealed(self, preamble: Preamble, keys: HeaderKeys) -> KeySlot:
        """This slot with its MAC computed over preamble || body."""
        return replace(self, mac=keys.mac(preamble.encode() + self.body()))

    def encode(self) -> bytes:
        if len(self.mac) != MAC_LEN:
            raise ValueError("slot must be sealed before encoding")
        return self.body() + self.mac


EMPTY_SLOT_BYTES = b"\0" * SLOT_LEN


def check_slot_fields(domain: str, wrapped: bytes) -> None:
    if not domain or len(domain.encode()) > MAX_DOMAIN_LEN:
        raise ValueError(f"key domain name must be 1..{MAX_DOMAIN_LEN} bytes")
    if len(wrapped) > MAX_WRAPPED_LEN:
        raise ValueError(f"wrapped key of {len(wrapped)} bytes does not fit a slot")


@dataclass(frozen=True, slots=True)
class Header:
    preamble: Preamble
    slots: tuple[KeySlot | None, KeySlot | None]

    def candidates(self) -> list[tuple[int, KeySlot]]:
        """(index, slot) of the non-empty slots, newest generation first."""
        found = [(i, s) for i, s in enumerate(self.slots) if s is not None]
        return sorted(found, key=lambda item: item[1].generation, reverse=True)

    def encode(self) -> bytes:
        parts = [self.preamble.encode()]
        parts += [EMPTY_SLOT_BYTES if s is None else s.encode() for s in self.slots]
        return b"".join(parts)


def slot_offset(index: int) -> int:
    return PREAMBLE_LEN + index * SLOT_LEN


def parse_preamble(data: bytes) -> Preamble:
    if len(data) < PREAMBLE_LEN:
        raise FormatError(f"header is {len(data)} bytes, expected {HEADER_LEN}")
    magic, version, hlen, shift, cipher, nslots, kdf, file_id, commitment, reserved = _PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise FormatError("not a vcfs file (bad magic)")
    if version != VERSION:
        raise UnsupportedFormat(
            f"format version {version} is not supported (this vcfs reads version {VERSION})",
            hint="use a vcfs release that supports this format version",
        )
    for name, got, want in (
        ("header length", hlen, HEADER_LEN),
        ("block size shift", shift, BLOCK_SHIFT),
        ("content cipher id", cipher, CIPHER_AES256GCM_R96),
        ("slot count", nslots, SLOT_COUNT),
        ("kdf id", kdf, KDF_HKDF_SHA256),
    ):
        if got != want:
            raise UnsupportedFormat(f"unsupported {name} {got} in a version {VERSION} header")
    if reserved != b"\0" * 4:
        raise UnsupportedFormat("reserved header bytes are not zero")
    return Preamble(file_id=file_id, commitment=commitment)


def parse_slot(data: bytes) -> KeySlot | None:
    """Decode one slot's fields. Nothing is trusted until verify_slot() accepts it."""
    if data == EMPTY_SLOT_BYTES:
        return None
    if len(data) != SLOT_LEN:
        raise HeaderAuthError(f"malformed key slot ({len(data)} bytes, expected {SLOT_LEN})")
    gen, wrap_alg, kver, seals, dlen, wlen = _SLOT_FIXED.unpack_from(data)
    start = _SLOT_FIXED.size
    if gen == 0 or dlen > MAX_DOMAIN_LEN or wlen > MAX_WRAPPED_LEN:
        raise HeaderAuthError("malformed key slot")
    domain_b = data[start : start + dlen]
    wrapped = data[start + dlen : start + dlen + wlen]
    if data[start + dlen + wlen : SLOT_BODY_LEN] != EMPTY_SLOT_BYTES[: SLOT_BODY_LEN - start - dlen - wlen]:
        raise HeaderAuthError("malformed key slot (padding is not zero)")  # the MAC covers re-encoded fields
    try:
        domain = domain_b.decode()
    except UnicodeDecodeError:
        raise HeaderAuthError("malformed key slot (domain name)") from None
    return KeySlot(gen, wrap_alg, domain, kver, wrapped, seals, mac=data[SLOT_BODY_LEN:SLOT_LEN])


def parse_header(data: bytes) -> Header:
    if len(data) < HEADER_LEN:
        raise FormatError(f"header is {len(data)} bytes, expected {HEADER_LEN}")
    pre = parse_preamble(data)
    slots: list[KeySlot | None] = []
    for i in range(SLOT_COUNT):
        try:
            slots.append(parse_slot(data[slot_offset(i) : slot_offset(i) + SLOT_LEN]))
        except HeaderAuthError:
            slots.append(None)  # a damaged slot is skipped; the other may still be valid
    if all(s is None for s in slots):
        raise HeaderAuthError("header has no usable key slot")
    return Header(pre, (slots[0], slots[1]))


def verify_slot(preamble: Preamble, slot: KeySlot, keys: HeaderKeys) -> None:
    """Accept a slot only if its DEK matches the commitment and its MAC checks."""
    if len(preamble.commitment) != COMMITMENT_LEN or not keys.commitment_ok(preamble.commitment):
        raise HeaderAuthError("key commitment mismatch: header does not belong to this key")
    if not keys.mac_ok(preamble.encode() + slot.body(), slot.mac):
        raise HeaderAuthError("header slot MAC mismatch: header was modified")
    if slot.wrap_alg not in KNOWN_WRAPS:
        raise UnsupportedFormat(f"unknown key wrap algorithm id {slot.wrap_alg}")


def new_header(file_id: bytes, keys: HeaderKeys, slot: KeySlot) -> Header:
    """A fresh header whose slot 0 holds ``slot`` (MAC computed here)."""
    if len(file_id) != FILE_ID_LEN:
        raise ValueError("file id must be 16 bytes")
    check_slot_fields(slot.domain, slot.wrapped)
    pre = Preamble(file_id=file_id, commitment=keys.commitment)
    return Header(pre, (slot.sealed(pre, keys), None))
