"""The v1 format contract (docs/FORMAT.md) checked against a fixed test vector.

(a) An independent decryptor, written from docs/FORMAT.md with `cryptography` primitives and
    struct only (it imports nothing from vcfs), decrypts tests/data/vector-v1.json, and with
    its journal reader recovers the crash in tests/data/journal-v1.json.
(b) vcfs's codec reproduces the vector byte for byte from the same inputs (known answer).
(c) Tampered copies of the vector are refused with the named vcfs error, by a reader built
    from vcfs.core functions, by vcfs's CryptFile, and by the independent decryptor: none of
    them returns data.

Regenerate the vector with `.venv/bin/python tests/make_vector.py` only for a new format
version; a diff in it for v1 means the format changed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap_with_padding, aes_key_wrap_with_padding

VECTOR_PATH = Path(__file__).parent / "data" / "vector-v1.json"
VECTOR = json.loads(VECTOR_PATH.read_text())
JOURNAL_VECTOR = json.loads((Path(__file__).parent / "data" / "journal-v1.json").read_text())
INPUTS = VECTOR["inputs"]
MID = VECTOR["intermediate"]
KEK = bytes.fromhex(INPUTS["kek"])
DEK = bytes.fromhex(INPUTS["dek"])
FILE_ID = bytes.fromhex(INPUTS["file_id"])
PLAIN = bytes.fromhex(INPUTS["plaintext"])
NONCES = [bytes.fromhex(n) for n in INPUTS["nonces"]]
BACKING = bytes.fromhex(VECTOR["expected"]["backing"])


# =========================================================================================
# (a) Independent decryptor. Written from docs/FORMAT.md alone: no vcfs import below here
#     until the "vcfs side" marker.
# =========================================================================================


class Refused(Exception):
    """The independent decryptor refuses a file; ``kind`` names the FORMAT.md rule."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


IND_HEADER_LEN = 4096
IND_PREAMBLE = struct.Struct(">4sHHBBBB16s32s4s")  # 64 bytes
IND_SLOT_LEN = 2016
IND_SLOT_BODY_LEN = 1984
IND_SLOT_FIXED = struct.Struct(">QHIQBH")  # 25 bytes
IND_BLOCK = 65536
IND_OVERHEAD = 28
IND_STRIDE = IND_BLOCK + IND_OVERHEAD


def ind_hkdf(dek: bytes, file_id: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=file_id, info=info).derive(dek)


def ind_hmac(key: bytes, data: bytes) -> bytes:
    h = crypto_hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    return h.finalize()


def ind_plain_size(backing_size: int) -> tuple[int, int]:
    """(plaintext size, number of blocks) for a backing-file size, per FORMAT.md "Sizes"."""
    body = backing_size - IND_HEADER_LEN
    if body < IND_OVERHEAD:
        raise Refused("truncated", "no final block after the header")
    full, rest = divmod(body, IND_STRIDE)
    if rest == 0:
        return full * IND_BLOCK, full
    if rest < IND_OVERHEAD:
        raise Refused("truncated", "last block shorter than nonce and tag")
    return full * IND_BLOCK + rest - IND_OVERHEAD, full + 1


@dataclass
class IndResult:
    plaintext: bytes
    slot_index: int
    content_key: bytes
    mac_key: bytes
    commitment: bytes
    wrapped: bytes


def ind_unlock(data: bytes, keks: dict[tuple[str, int], bytes]) -> tuple[int, bytes, bytes, bytes, bytes]:
    """Check the preamble and find the DEK: (slot index, content key, MAC key, commitment, wrapped DEK)."""
    if len(data) < IND_HEADER_LEN:
        raise Refused("format", "shorter than the header")
    pre = data[:64]
    magic, version, hlen, shift, cipher, nslots, kdf, file_id, commitment, reserved = IND_PREAMBLE.unpack(pre)
    if magic != b"VCFS":
        raise Refused("not-vcfs", "bad magic")
    if version != 1:
        raise Refused("unsupported", f"version {version}")
    if (hlen, shift, cipher, nslots, kdf, reserved) != (4096, 16, 1, 2, 1, b"\0\0\0\0"):
        raise Refused("unsupported", "preamble field")

    candidates = []
    for index in range(2):
        raw = data[64 + index * IND_SLOT_LEN : 64 + (index + 1) * IND_SLOT_LEN]
        if raw == bytes(IND_SLOT_LEN):
            continue  # empty slot
        gen, alg, kver, _seals, dlen, wlen = IND_SLOT_FIXED.unpack_from(raw)
        if gen == 0 or dlen > 64 or wlen > IND_SLOT_BODY_LEN - 25 - 64:
            continue  # malformed: skipped
        try:
            domain = raw[25 : 25 + dlen].decode("utf-8")
        except UnicodeDecodeError:
            continue
        candidates.append((gen, index, alg, domain, kver, raw[25 + dlen : 25 + dlen + wlen], raw))
    if not candidates:
        raise Refused("header-auth", "no usable key slot")

    errors: list[Refused] = []
    for _gen, index, alg, domain, kver, wrapped, raw in sorted(candidates, key=lambda c: c[0], reverse=True):
        if alg != 1:
            errors.append(Refused("unsupported", f"wrap alg {alg}"))
            continue
        kek = keks.get((domain, kver))
        if kek is None:
            errors.append(Refused("no-kek", f"{domain}/v{kver}"))
            continue
        try:
            dek = aes_key_unwrap_with_padding(kek, wrapped)
        except InvalidUnwrap:
            errors.append(Refused("header-auth", "unwrap failed"))
            continue
        if len(dek) != 32:
            errors.append(Refused("header-auth", "DEK is not 32 bytes"))
            continue
        content_key = ind_hkdf(dek, file_id, b"vcfs v1 content key")
        mac_key = ind_hkdf(dek, file_id, b"vcfs v1 header mac key")
        expect_commitment = ind_hkdf(dek, file_id, b"vcfs v1 key commitment")
        if not hmac.compare_digest(expect_commitment, commitment):
            errors.append(Refused("header-auth", "commitment"))
            continue
        if not hmac.compare_digest(ind_hmac(mac_key, pre + raw[:IND_SLOT_BODY_LEN]), raw[IND_SLOT_BODY_LEN:]):
            errors.append(Refused("header-auth", "slot MAC"))
            continue
        return index, content_key, mac_key, expect_commitment, wrapped
    raise errors[0]


def ind_decrypt(data: bytes, keks: dict[tuple[str, int], bytes], end_block: int | None = None) -> IndResult:
    """Decrypt a v1 backing file. ``keks`` maps (domain, KEK version) to the AES-256 KEK.

    ``end_block``: a block that journal recovery made the file's end (FORMAT.md, "Recovery"),
    accepted there even if it was sealed inner.
    """
    chosen, content_key, mac_key, expect_commitment, wrapped = ind_unlock(data, keks)
    size, nblocks = ind_plain_size(len(data))
    aead = AESGCM(content_key)
    bound = data[:28]

    def try_open(b: int, final: bool, sealed: bytes) -> bytes | None:
        try:
            return aead.decrypt(sealed[:12], sealed[12:], bound + struct.pack(">QB", b, 1 if final else 0))
        except InvalidTag:
            return None

    out = []
    for b in range(nblocks):
        off = IND_HEADER_LEN + b * IND_STRIDE
        sealed = data[off : off + IND_STRIDE]
        if b == nblocks - 1:
            plain = try_open(b, True, sealed)
            if plain is None and end_block == b:
                plain = try_open(b, False, sealed)
            if plain is None:
                if try_open(b, False, sealed) is not None:
                    raise Refused("truncated", f"block {b} ends the file but was sealed inner")
                raise Refused("block-auth", f"block {b}")
        else:
            plain = try_open(b, False, sealed)
            if plain is None:
                plain = try_open(b, True, sealed)  # trace of an interrupted extension
            if plain is None:
                raise Refused("block-auth", f"block {b}")
        out.append(plain)
    plaintext = b"".join(out)
    assert len(plaintext) == size
    return IndResult(plaintext, chosen, content_key, mac_key, expect_commitment, wrapped)


IND_KEKS = {(INPUTS["domain"], INPUTS["kek_version"]): KEK}

IND_JOURNAL_HEAD = struct.Struct(">4sHBBQ16sQIH2s")  # 48 bytes


def ind_journal_records(journal: bytes, file_id: bytes) -> list[tuple[int, bytes]]:
    """(block number, sealed bytes) of the journal's current records for ``file_id``, in file order.

    FORMAT.md "Journal": records start at offset 0; parsing stops at the first one that does not
    parse or whose epoch differs from the first record's.
    """
    out: list[tuple[int, bytes]] = []
    pos, epoch = 0, None
    while pos + IND_JOURNAL_HEAD.size <= len(journal):
        magic, version, kind, res1, ep, fid, block_no, slen, hlen, res2 = IND_JOURNAL_HEAD.unpack_from(journal, pos)
        if (magic, version, kind, res1, res2) != (b"VJNL", 1, 1, 0, b"\0\0") or not 28 <= slen <= IND_STRIDE:
            break
        if hlen > 4096 or (epoch is not None and ep != epoch):
            break
        end = pos + IND_JOURNAL_HEAD.size + hlen + slen
        if end > len(journal):
            break
        epoch = ep
        if fid == file_id:
            out.append((block_no, journal[end - slen : end]))
        pos = end
    return out


def ind_whole_blocks(size: int) -> int:
    """Blocks a reader counts in a backing file of ``size`` bytes (only whole ones if the size is invalid)."""
    try:
        return ind_plain_size(size)[1]
    except Refused:
        return max(size - IND_HEADER_LEN, 0) // IND_STRIDE


def ind_recover(data: bytes, journal: bytes, keks: dict[tuple[str, int], bytes]) -> tuple[bytes, int | None]:
    """FORMAT.md "Recovery", in memory: (the backing file as recovered, the block it now ends with if
    that block has to be taken as final although sealed inner, else None)."""
    _index, content_key, _mac, _commitment, _wrapped = ind_unlock(data, keks)
    aead, bound, file_id = AESGCM(content_key), data[:28], data[12:28]

    def sealed_final(b: int, sealed: bytes) -> bool | None:
        for final in (True, False):
            try:
                aead.decrypt(sealed[:12], sealed[12:], bound + struct.pack(">QB", b, 1 if final else 0))
                return final
            except InvalidTag:
                continue
        return None

    records = ind_journal_records(journal, file_id)
    out = bytearray(data)
    for b in sorted({b for b, _ in records}):
        start = IND_HEADER_LEN + b * IND_STRIDE
        if start >= len(out):
            continue
        n = ind_whole_blocks(len(out))
        now = sealed_final(b, bytes(out[start : start + IND_STRIDE])) if b < n else None
        if now is True or (now is False and b < n - 1):
            continue  # block b reads: the journal is not needed for it
        for cand in reversed([sealed for bb, sealed in records if bb == b]):
            final = sealed_final(b, cand)
            if final is not None:
                break
        else:
            continue
        ends = len(cand) < IND_STRIDE or b >= n - 1
        out[start : start + len(cand)] = cand
        if ends:
            del out[start + len(cand) :]
            return bytes(out), None if final else b
    return bytes(out), None


def test_independent_decryptor_reads_the_vector() -> None:
    res = ind_decrypt(BACKING, IND_KEKS)
    assert res.plaintext == PLAIN
    assert hashlib.sha256(res.plaintext).hexdigest() == INPUTS["plaintext_sha256"]
    assert bytes(i * 7 % 251 for i in range(INPUTS["plaintext_len"])) == PLAIN
    assert res.slot_index == 0
    assert res.wrapped.hex() == MID["wrapped_dek"]
    assert res.content_key.hex() == MID["content_key"]
    assert res.mac_key.hex() == MID["header_mac_key"]
    assert res.commitment.hex() == MID["key_commitment"]


def test_independent_view_of_the_worked_example() -> None:
    """The numbers docs/FORMAT.md quotes agree with the backing file bytes."""
    assert len(BACKING) == VECTOR["expected"]["backing_size"] == 74152
    assert hashlib.sha256(BACKING).hexdigest() == VECTOR["expected"]["backing_sha256"]
    assert BACKING[:64].hex() == MID["preamble"]
    assert BACKING[64:2080].hex() == MID["slot0"]
    assert BACKING[2048:2080].hex() == MID["slot0_mac"]
    assert BACKING[2080:4096] == bytes(2016)
    for blk in MID["blocks"]:
        sealed = BACKING[blk["offset"] : blk["offset"] + blk["sealed_len"]]
        assert sealed[:12].hex() == blk["nonce"]
        assert sealed[:16].hex() == blk["sealed_first16"]
        assert sealed[-16:].hex() == blk["sealed_last16"] == blk["tag"]
        aad = BACKING[:28] + struct.pack(">QB", blk["block_no"], blk["final"])
        assert aad.hex() == blk["aad"]
    assert [ind_plain_size(len(BACKING))] == [(70000, 2)]


def test_independent_recovery_of_the_journal_vector() -> None:
    """A crash tore the rewrite of block 1; the journal holds its synced version."""
    torn, journal = bytes.fromhex(JOURNAL_VECTOR["torn_backing"]), bytes.fromhex(JOURNAL_VECTOR["journal"])
    with pytest.raises(Refused):
        ind_decrypt(torn, IND_KEKS)  # without the journal the file is damaged
    assert [b for b, _ in ind_journal_records(journal, FILE_ID)] == [1, 0]  # the epoch-1 record is not current
    recovered, end_block = ind_recover(torn, journal, IND_KEKS)
    assert end_block is None
    assert hashlib.sha256(recovered).hexdigest() == JOURNAL_VECTOR["expected"]["recovered_sha256"]
    assert recovered == BACKING
    assert ind_decrypt(recovered, IND_KEKS).plaintext == PLAIN
    assert ind_recover(BACKING, journal, IND_KEKS) == (BACKING, None)  # an intact file is left alone


def test_independent_recovery_reseals_nothing_and_accepts_an_inner_end() -> None:
    """A journal copy sealed inner that ends the file (a truncate made it the last block) is
    taken as the end by a reader recovering in memory."""
    two_inner = BACKING[: IND_HEADER_LEN + IND_STRIDE]  # block 0 alone: sealed inner
    journal_rec = IND_JOURNAL_HEAD.pack(b"VJNL", 1, 1, 0, 1, FILE_ID, 0, IND_STRIDE, 0, b"\0\0") + two_inner[4096:]
    torn = two_inner[:IND_HEADER_LEN] + b"\x00" * 5000  # block 0 rewritten, torn
    recovered, end_block = ind_recover(torn, journal_rec, IND_KEKS)
    assert end_block == 0 and recovered == two_inner
    assert ind_decrypt(recovered, IND_KEKS, end_block=end_block).plaintext == PLAIN[:IND_BLOCK]


@pytest.mark.parametrize(
    ("plain_size", "backing_size"),
    [(0, 4124), (1, 4125), (65535, 69659), (65536, 69660), (65537, 69689), (70000, 74152), (131072, 135224)],
)
def test_independent_size_arithmetic(plain_size: int, backing_size: int) -> None:
    blocks = max(1, -(-plain_size // IND_BLOCK))
    assert IND_HEADER_LEN + plain_size + IND_OVERHEAD * blocks == backing_size
    assert ind_plain_size(backing_size) == (plain_size, blocks)


@pytest.mark.parametrize("backing_size", [0, 4095, 4096, 4123, 69661, 69687, 4096 + 2 * IND_STRIDE + 27])
def test_independent_size_arithmetic_refuses_impossible_sizes(backing_size: int) -> None:
    with pytest.raises(Refused):
        ind_plain_size(backing_size)


# =========================================================================================
# vcfs side: everything below may use vcfs.
# =========================================================================================

from vcfs.core.aead import derive_file_keys  # noqa: E402
from vcfs.core.blocks import block_aad, open_block, seal_block  # noqa: E402
from vcfs.core.header import (  # noqa: E402
    HEADER_LEN,
    WRAP_PKCS11_AES_KWP,
    KeySlot,
    new_header,
    parse_header,
    parse_preamble,
    verify_slot,
)
from vcfs.core.layout import (  # noqa: E402
    BLOCK_OVERHEAD,
    BLOCK_SIZE,
    CIPHER_BLOCK_SIZE,
    block_count,
    block_len,
    block_no_to_cipher_off,
    cipher_to_plain_size,
    plain_to_cipher_size,
)
from vcfs.cryptfile import SEAL_BUDGET, SEAL_RESERVE_STEP, open_cryptfile  # noqa: E402
from vcfs.errors import (  # noqa: E402
    BlockAuthError,
    FormatError,
    HeaderAuthError,
    KeyProviderError,
    TruncatedError,
    UnsupportedFormat,
    UnterminatedError,
    VcfsError,
)
from vcfs.keys.base import KeyRef, Wrapped  # noqa: E402


def make_backing(
    dek: bytes = DEK,
    file_id: bytes = FILE_ID,
    plain: bytes = PLAIN,
    nonces: list[bytes] | None = None,
    finals: Callable[[int, int], bool] | None = None,
) -> bytes:
    """A backing file made with vcfs's codec; ``finals(b, n)`` overrides the final flags."""
    keys = derive_file_keys(dek, file_id)
    wrapped = aes_key_wrap(dek)
    slot = KeySlot(
        INPUTS["slot_generation"],
        WRAP_PKCS11_AES_KWP,
        INPUTS["domain"],
        INPUTS["kek_version"],
        wrapped,
        INPUTS["seals"],
    )
    header = new_header(file_id, keys, slot)
    n = block_count(len(plain))
    nonces = nonces or [bytes([b + 1]) * 12 for b in range(n)]
    parts = [header.encode()]
    for b in range(n):
        final = finals(b, n) if finals else b == n - 1
        chunk = plain[b * BLOCK_SIZE : b * BLOCK_SIZE + block_len(b, len(plain))]
        parts.append(seal_block(keys, header.preamble.bound, b, final, chunk, nonce=nonces[b]))
    return b"".join(parts)


def aes_key_wrap(dek: bytes) -> bytes:
    """RFC 5649 under the vector's KEK; equal to SoftHSM2's C_WrapKey with CKM_AES_KEY_WRAP_PAD."""
    return aes_key_wrap_with_padding(KEK, dek)


def test_unwrap_with_softhsm_equivalent_wrap() -> None:
    assert aes_key_wrap(DEK).hex() == MID["wrapped_dek"]
    assert len(bytes.fromhex(MID["wrapped_dek"])) == 40


# ---- (b) known answer ----------------------------------------------------------------------


def test_codec_reproduces_the_vector() -> None:
    keys = derive_file_keys(DEK, FILE_ID)
    assert keys.mac_key.hex() == MID["header_mac_key"]
    assert keys.commitment.hex() == MID["key_commitment"]
    slot = KeySlot(
        INPUTS["slot_generation"],
        INPUTS["wrap_alg"],
        INPUTS["domain"],
        INPUTS["kek_version"],
        aes_key_wrap(DEK),
        INPUTS["seals"],
    )
    header = new_header(FILE_ID, keys, slot)
    assert header.preamble.encode().hex() == MID["preamble"]
    assert header.preamble.bound.hex() == MID["aad_prefix"]
    head = header.encode()
    assert len(head) == HEADER_LEN
    assert hashlib.sha256(head).hexdigest() == MID["header_sha256"]
    body = b""
    n = block_count(len(PLAIN))
    assert n == len(MID["blocks"]) == 2
    for b, blk in enumerate(MID["blocks"]):
        final = b == n - 1
        assert blk["final"] is final
        assert block_aad(header.preamble.bound, b, final).hex() == blk["aad"]
        chunk = PLAIN[b * BLOCK_SIZE : b * BLOCK_SIZE + block_len(b, len(PLAIN))]
        sealed = seal_block(keys, header.preamble.bound, b, final, chunk, nonce=NONCES[b])
        assert hashlib.sha256(sealed).hexdigest() == blk["sealed_sha256"]
        body += sealed
    assert head + body == BACKING
    assert plain_to_cipher_size(len(PLAIN)) == len(BACKING)
    assert cipher_to_plain_size(len(BACKING)) == len(PLAIN)
    assert make_backing(nonces=NONCES) == BACKING


def test_vector_file_is_what_make_vector_builds() -> None:
    import make_vector

    assert make_vector.build() == VECTOR


def test_budget_constants_match_the_contract() -> None:
    assert SEAL_BUDGET == 2**31
    assert SEAL_RESERVE_STEP == 2**16
    assert SEAL_BUDGET * BLOCK_SIZE == 128 * 2**40
    assert CIPHER_BLOCK_SIZE == 65564 and BLOCK_OVERHEAD == 28


# ---- readers used by the tamper cases --------------------------------------------------------


def core_unwrap(wrapped: bytes) -> bytes:
    """What a KEK holder does with a slot's wrapped DEK (the vector has one KEK)."""
    try:
        return aes_key_unwrap_with_padding(KEK, wrapped)
    except InvalidUnwrap:
        raise HeaderAuthError("the DEK does not unwrap under the KEK") from None


def core_read(data: bytes) -> bytes:
    """The FORMAT.md reading rules, built from vcfs.core functions only."""
    header = parse_header(data)
    errors: list[Exception] = []
    for _index, slot in header.candidates():
        try:
            keys = derive_file_keys(core_unwrap(slot.wrapped), header.preamble.file_id)
            verify_slot(header.preamble, slot, keys)
        except HeaderAuthError as exc:
            errors.append(exc)
            continue
        break
    else:
        raise errors[0]
    bound = header.preamble.bound
    size = cipher_to_plain_size(len(data))
    n = block_count(size)
    out = []
    for b in range(n):
        off = block_no_to_cipher_off(b)
        sealed = data[off : off + BLOCK_OVERHEAD + block_len(b, size)]
        if b == n - 1:
            try:
                out.append(open_block(keys, bound, b, True, sealed))
            except BlockAuthError:
                try:
                    open_block(keys, bound, b, False, sealed)
                except BlockAuthError:
                    raise
                raise UnterminatedError(f"block {b} ends the file but was sealed as an inner block") from None
        else:
            try:
                out.append(open_block(keys, bound, b, False, sealed))
            except BlockAuthError:
                out.append(open_block(keys, bound, b, True, sealed))
    return b"".join(out)


def provider_unwrap(w: Wrapped) -> bytes:
    """Behaves like vcfs.keys.pkcs11.Pkcs11Provider.unwrap for a token holding one KEK."""
    if w.wrap_alg != WRAP_PKCS11_AES_KWP:
        raise KeyProviderError(f"wrap algorithm {w.wrap_alg} is not handled by the PKCS#11 provider")
    if w.ref != KeyRef(INPUTS["domain"], INPUTS["kek_version"]):
        raise KeyProviderError(f"KEK {w.ref} is not available in the HSM")
    return core_unwrap(w.blob)


def cryptfile_read(data: bytes, tmp_path: Path) -> bytes:
    """Read the whole file through vcfs's CryptFile (the mount's engine)."""
    path = tmp_path / "backing"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        cf = open_cryptfile(fd, str(path), provider_unwrap)
    except BaseException:
        os.close(fd)
        raise
    try:
        return cf.read(0, cf.size + 1)
    finally:
        cf.close()


def test_readers_agree_on_the_vector(tmp_path: Path) -> None:
    assert core_read(BACKING) == PLAIN
    assert cryptfile_read(BACKING, tmp_path) == PLAIN


# ---- (c) tamper cases ---------------------------------------------------------------------

B0 = block_no_to_cipher_off(0)  # 4096
B1 = block_no_to_cipher_off(1)  # 69660


def flip(offset: int, mask: int = 0x01) -> Callable[[bytes], bytes]:
    def mutate(data: bytes) -> bytes:
        out = bytearray(data)
        out[offset] ^= mask
        return bytes(out)

    return mutate


# The second file of the tamper cases: same DEK, other file id (the binding is by file id).
OTHER_ID = bytes(range(0xB0, 0xC0))
OTHER_SAME_DEK = make_backing(file_id=OTHER_ID, nonces=NONCES)
# A third file with its own DEK and file id.
OTHER_DEK = bytes(range(0x60, 0x80))
OTHER_OWN_DEK = make_backing(dek=OTHER_DEK, file_id=OTHER_ID, nonces=NONCES)
TWO_FULL = bytes(i * 7 % 251 for i in range(2 * BLOCK_SIZE))
TWO_FULL_BACKING = make_backing(plain=TWO_FULL)
THREE_BLOCKS = bytes(i * 7 % 251 for i in range(2 * BLOCK_SIZE + 10))
THREE_BACKING = make_backing(plain=THREE_BLOCKS)


def swap_full_blocks(data: bytes) -> bytes:
    b0, b1 = data[B0:B1], data[B1 : B1 + CIPHER_BLOCK_SIZE]
    return data[:B0] + b1 + b0 + data[B1 + CIPHER_BLOCK_SIZE :]


@dataclass(frozen=True)
class Case:
    name: str
    mutate: Callable[[bytes], bytes]
    error: type[VcfsError]  # what the vcfs.core reader raises
    cryptfile_error: type[VcfsError] | None = None  # CryptFile, if different (KEK selection)
    block_no: int | None = None
    base: bytes = BACKING


CASES = [
    # preamble: parsed and refused before any key is used
    Case("magic", flip(0), FormatError),
    Case("magic-last", flip(3, 0x80), FormatError),
    Case("version-low", flip(5), UnsupportedFormat),
    Case("version-high", flip(4, 0x80), UnsupportedFormat),
    Case("header-length", flip(6), UnsupportedFormat),
    Case("block-shift", flip(8), UnsupportedFormat),
    Case("cipher-id", flip(9), UnsupportedFormat),
    Case("slot-count", flip(10), UnsupportedFormat),
    Case("kdf-id", flip(11), UnsupportedFormat),
    Case("reserved", flip(63), UnsupportedFormat),
    # preamble: authenticated by the key commitment, the slot MAC and the block AAD
    Case("file-id", flip(12), HeaderAuthError),
    Case("file-id-last", flip(27, 0x80), HeaderAuthError),
    Case("commitment", flip(28), HeaderAuthError),
    Case("commitment-last", flip(59, 0x80), HeaderAuthError),
    # slot 0 (offset 64): fields authenticated by the slot MAC (verify_slot) ...
    Case("slot-generation", flip(64, 0x80), HeaderAuthError),
    Case("slot-generation-to-zero", flip(71), HeaderAuthError),  # unparsable: slot skipped
    Case("wrap-alg", flip(73), HeaderAuthError, KeyProviderError),
    Case("kek-version", flip(77), HeaderAuthError, KeyProviderError),
    Case("seals", flip(78, 0x80), HeaderAuthError),
    Case("seals-low", flip(85), HeaderAuthError),
    Case("domain-length", flip(86), HeaderAuthError),  # shifted bytes land in the padding: unparsable
    Case("domain-length-too-big", flip(86, 0x80), HeaderAuthError),  # unparsable
    Case("wrapped-length", flip(88), HeaderAuthError),
    Case("wrapped-length-too-big", flip(87, 0x80), HeaderAuthError),  # unparsable
    Case("domain", flip(89), HeaderAuthError, KeyProviderError),
    Case("domain-not-utf8", flip(89, 0x80), HeaderAuthError),  # unparsable
    # ... or by the RFC 5649 integrity check of the wrap itself
    Case("wrapped-dek", flip(96), HeaderAuthError),
    Case("wrapped-dek-last", flip(135, 0x80), HeaderAuthError),
    Case("slot-padding", flip(1000), HeaderAuthError),
    Case("slot-padding-last", flip(2047), HeaderAuthError),
    Case("slot-mac", flip(2048), HeaderAuthError),
    Case("slot-mac-last", flip(2079, 0x80), HeaderAuthError),
    # blocks
    Case("block0-nonce", flip(B0), BlockAuthError, block_no=0),
    Case("block0-ciphertext", flip(B0 + 12 + 1000), BlockAuthError, block_no=0),
    Case("block0-tag", flip(B1 - 1), BlockAuthError, block_no=0),
    Case("block1-nonce", flip(B1 + 11), BlockAuthError, block_no=1),
    Case("block1-ciphertext", flip(B1 + 12), BlockAuthError, block_no=1),
    Case("block1-tag", flip(len(BACKING) - 16), BlockAuthError, block_no=1),
    Case("swap-blocks", lambda d: d[:B0] + d[B1:] + d[B0:B1], BlockAuthError, block_no=0),
    Case("swap-full-blocks", swap_full_blocks, BlockAuthError, block_no=0, base=THREE_BACKING),
    Case("block0-from-other-file", lambda d: d[:B0] + OTHER_SAME_DEK[B0:B1] + d[B1:], BlockAuthError, block_no=0),
    Case("block1-from-other-file", lambda d: d[:B1] + OTHER_SAME_DEK[B1:], BlockAuthError, block_no=1),
    Case(
        "header-onto-other-blocks", lambda d: d[:HEADER_LEN] + OTHER_SAME_DEK[HEADER_LEN:], BlockAuthError, block_no=0
    ),
    Case(
        "header-onto-other-dek-blocks",
        lambda d: d[:HEADER_LEN] + OTHER_OWN_DEK[HEADER_LEN:],
        BlockAuthError,
        block_no=0,
    ),
    Case("other-header-onto-blocks", lambda d: OTHER_OWN_DEK[:HEADER_LEN] + d[HEADER_LEN:], BlockAuthError, block_no=0),
    Case("truncate-at-block-boundary", lambda d: d[:B1], UnterminatedError),
    Case("truncate-full-file-at-boundary", lambda d: d[:B1], UnterminatedError, base=TWO_FULL_BACKING),
    Case("truncate-inside-last-block", lambda d: d[:-10], BlockAuthError, block_no=1),
    Case("truncate-into-last-overhead", lambda d: d[: B1 + 20], TruncatedError),
    Case("truncate-to-header", lambda d: d[:HEADER_LEN], TruncatedError),
    Case("truncate-inside-header", lambda d: d[: HEADER_LEN - 1], FormatError),
    Case("append-copy-of-block1", lambda d: d + d[B1:], BlockAuthError, block_no=1),
    Case("append-copy-of-full-final-block", lambda d: d + d[B1:], BlockAuthError, block_no=2, base=TWO_FULL_BACKING),
    Case("append-zeros", lambda d: d + bytes(100), BlockAuthError, block_no=1),
    Case("last-block-sealed-inner", lambda d: make_backing(finals=lambda b, n: False), UnterminatedError),
]


def check_raises(fn: Callable[[], bytes], case: Case, expected: type[VcfsError]) -> None:
    with pytest.raises(VcfsError) as info:
        data = fn()
        pytest.fail(f"{case.name}: returned {len(data)} bytes instead of raising")
    got = info.value
    # FormatError is the base of every format and integrity error: where it is expected, nothing narrower.
    ok = type(got) is FormatError if expected is FormatError else isinstance(got, expected)
    assert ok, f"{case.name}: expected {expected.__name__}, got {type(got).__name__}: {got}"
    if case.block_no is not None and isinstance(info.value, BlockAuthError):
        assert info.value.block_no == case.block_no


def vcfs_params() -> list[object]:
    return [pytest.param(c, id=c.name) for c in CASES]


@pytest.mark.parametrize("case", vcfs_params())
def test_tamper_core(case: Case) -> None:
    tampered = case.mutate(case.base)
    assert tampered != case.base
    check_raises(lambda: core_read(tampered), case, case.error)


@pytest.mark.parametrize("case", vcfs_params())
def test_tamper_cryptfile(case: Case, tmp_path: Path) -> None:
    tampered = case.mutate(case.base)
    check_raises(lambda: cryptfile_read(tampered, tmp_path), case, case.cryptfile_error or case.error)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_tamper_independent(case: Case) -> None:
    tampered = case.mutate(case.base)
    with pytest.raises(Refused):
        ind_decrypt(tampered, IND_KEKS)


def test_tamper_bases_are_valid(tmp_path: Path) -> None:
    for base, plain in ((THREE_BACKING, THREE_BLOCKS), (TWO_FULL_BACKING, TWO_FULL), (OTHER_SAME_DEK, PLAIN)):
        assert core_read(base) == plain
        assert cryptfile_read(base, tmp_path) == plain
        assert ind_decrypt(base, IND_KEKS).plaintext == plain
    assert ind_decrypt(OTHER_OWN_DEK, IND_KEKS).plaintext == PLAIN


def test_header_fields_checked_by_mac_fail_verify_slot() -> None:
    """Header fields not checked when parsing are caught by verify_slot (commitment, then MAC)."""
    keys = derive_file_keys(DEK, FILE_ID)
    for offset in (*range(28, 60), 64, 73, 77, 85, 89, 100, 2050):
        tampered = flip(offset)(BACKING)
        header = parse_header(tampered)
        slot = header.slots[0]
        assert slot is not None
        with pytest.raises(HeaderAuthError):
            verify_slot(header.preamble, slot, keys)
    # a different file id derives different keys: the stored commitment no longer matches
    header = parse_header(flip(12)(BACKING))
    assert header.slots[0] is not None
    with pytest.raises(HeaderAuthError, match="commitment"):
        verify_slot(header.preamble, header.slots[0], derive_file_keys(DEK, header.preamble.file_id))


def test_unparsable_slot_is_skipped() -> None:
    for offset, mask in ((71, 0x01), (86, 0x80), (87, 0x80), (89, 0x80)):
        tampered = flip(offset, mask)(BACKING)
        with pytest.raises(HeaderAuthError, match="no usable key slot"):
            parse_header(tampered)


SLOT0_PADDING = range(136, 2048)  # after the 40-byte wrapped DEK, up to the MAC


def test_every_header_byte_of_preamble_and_slot0_is_protected() -> None:
    for offset in range(64 + 2016):
        tampered = flip(offset, 0x10)(BACKING)
        with pytest.raises(Refused):
            ind_decrypt(tampered, IND_KEKS)
        if offset in SLOT0_PADDING:
            continue  # see test_slot_padding_is_authenticated
        with pytest.raises(FormatError):
            core_read(tampered)


def test_slot_padding_is_authenticated() -> None:
    for offset in SLOT0_PADDING:
        with pytest.raises(HeaderAuthError):
            core_read(flip(offset, 0x10)(BACKING))


def test_sampled_block_bytes_are_protected() -> None:
    for offset in range(HEADER_LEN, len(BACKING), 997):
        with pytest.raises(BlockAuthError):
            core_read(flip(offset, 0x04)(BACKING))


def test_damage_to_the_empty_slot_falls_back_to_the_valid_one(tmp_path: Path) -> None:
    """Slot 1 is empty; garbage there is an unusable candidate, and slot 0 still reads (A/B rule)."""
    for offset in (2080, 2087, 2100, 4095):
        tampered = flip(offset, 0x80)(BACKING)
        assert core_read(tampered) == PLAIN
        assert cryptfile_read(tampered, tmp_path) == PLAIN
        assert ind_decrypt(tampered, IND_KEKS).plaintext == PLAIN


def test_drop_last_block_leaves_an_inner_block_at_the_end() -> None:
    keys = derive_file_keys(DEK, FILE_ID)
    bound = BACKING[:28]
    cut = BACKING[:B1]
    assert cipher_to_plain_size(len(cut)) == BLOCK_SIZE  # the size alone looks fine
    with pytest.raises(BlockAuthError):
        open_block(keys, bound, 0, True, cut[B0:])
    assert open_block(keys, bound, 0, False, cut[B0:]) == PLAIN[:BLOCK_SIZE]


def test_inner_block_sealed_final_is_accepted(tmp_path: Path) -> None:
    """The trace of an interrupted extension: the old end, still sealed final, at an inner position."""
    data = make_backing(finals=lambda b, n: True)
    assert core_read(data) == PLAIN
    assert cryptfile_read(data, tmp_path) == PLAIN
    assert ind_decrypt(data, IND_KEKS).plaintext == PLAIN


def test_empty_file_is_one_final_empty_block(tmp_path: Path) -> None:
    data = make_backing(plain=b"")
    assert len(data) == HEADER_LEN + BLOCK_OVERHEAD == plain_to_cipher_size(0)
    assert core_read(data) == b""
    assert cryptfile_read(data, tmp_path) == b""
    assert ind_decrypt(data, IND_KEKS).plaintext == b""
    unsealed_final = make_backing(plain=b"", finals=lambda b, n: False)
    with pytest.raises(TruncatedError):
        core_read(unsealed_final)


def test_authenticated_unknown_wrap_alg_is_refused() -> None:
    """A slot that verifies but names an unknown wrap algorithm is refused, not guessed at."""
    keys = derive_file_keys(DEK, FILE_ID)
    slot = KeySlot(1, 99, INPUTS["domain"], INPUTS["kek_version"], aes_key_wrap(DEK), INPUTS["seals"])
    header = new_header(FILE_ID, keys, slot)
    sealed = header.slots[0]
    assert sealed is not None
    with pytest.raises(UnsupportedFormat, match="wrap algorithm"):
        verify_slot(header.preamble, sealed, keys)


def test_unknown_version_message() -> None:
    data = bytearray(BACKING)
    data[4:6] = (2).to_bytes(2, "big")
    with pytest.raises(UnsupportedFormat, match="format version 2 is not supported"):
        parse_preamble(bytes(data))
    with pytest.raises(FormatError, match="not a vcfs file"):
        parse_preamble(b"XXXX" + BACKING[4:64])


# ---- the journal vector through vcfs ---------------------------------------------------------

from vcfs.core.journal import Record, parse_records  # noqa: E402
from vcfs.journal import Journal  # noqa: E402


def test_journal_vector_is_what_make_vector_builds() -> None:
    import make_vector

    assert make_vector.build_journal() == JOURNAL_VECTOR


def test_vcfs_journal_codec_matches_the_vector() -> None:
    journal = bytes.fromhex(JOURNAL_VECTOR["journal"])
    records = parse_records(journal)
    assert [(r.epoch, r.block_no, len(r.sealed), r.hint) for r in records] == [
        (2, 1, 4492, b"rec.bin"),
        (2, 0, 65564, b"rec.bin"),
    ]
    assert b"".join(r.encode() for r in records) == journal[: JOURNAL_VECTOR["records"][2]["offset"]]
    for meta, rec in zip(JOURNAL_VECTOR["records"], records, strict=False):
        assert rec.encode()[:48].hex() == meta["head"]
    assert (
        Record(2, FILE_ID, 1, records[0].sealed, b"rec.bin").encode()
        == journal[: JOURNAL_VECTOR["records"][1]["offset"]]
    )


def _crashed_store(tmp_path: Path) -> tuple[Path, Path]:
    store = tmp_path / "store"
    (store / "files").mkdir(parents=True)
    (store / "journal").mkdir()
    path = store / "files" / "rec.bin"
    path.write_bytes(bytes.fromhex(JOURNAL_VECTOR["torn_backing"]))
    (store / "journal" / JOURNAL_VECTOR["journal_name"]).write_bytes(bytes.fromhex(JOURNAL_VECTOR["journal"]))
    return store, path


def test_vcfs_recovers_the_journal_vector_in_memory_and_on_disk(tmp_path: Path) -> None:
    store, path = _crashed_store(tmp_path)
    cf = open_cryptfile(os.open(path, os.O_RDONLY), str(path), provider_unwrap, journal=Journal(store))
    try:  # read-only: restored in memory, nothing written
        assert [r.block_no for r in cf.restored] == [1]
        assert cf.read(0, cf.size + 1) == PLAIN
    finally:
        cf.close()
    assert path.read_bytes() == bytes.fromhex(JOURNAL_VECTOR["torn_backing"])
    cf = open_cryptfile(os.open(path, os.O_RDWR), str(path), provider_unwrap, journal=Journal(store))
    cf.close()  # the store's writer: restored on disk, journal gone
    assert path.read_bytes() == BACKING
    assert not (store / "journal" / JOURNAL_VECTOR["journal_name"]).exists()
