"""The encrypted-names contract (docs/FORMAT.md, "Names") checked against a fixed vector.

(a) An independent name decoder, written from docs/FORMAT.md with `cryptography`, base64 and
    hashlib only (nothing from vcfs), decodes tests/data/names-v1.json: it unwraps the names
    secret with the KEK, derives the AES-SIV key, and turns the backing names and the stored
    symlink target back into the plaintext ones.
(b) vcfs's codec reproduces the vector byte for byte (known answer).
(c) Names moved to another directory, damaged, or paired with the wrong sidecar are refused
    by both, with the named error in vcfs.

tests/test_names_mount.py reuses the independent decoder on a real store written by a mount.
Regenerate with `.venv/bin/python tests/make_names_vector.py` only for a new names scheme.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding

VECTOR = json.loads((Path(__file__).parent / "data" / "names-v1.json").read_text())
INPUTS, MID, EXPECTED = VECTOR["inputs"], VECTOR["intermediate"], VECTOR["expected"]
DIR_ID = bytes.fromhex(INPUTS["dir_id"])


# =========================================================================================
# (a) Independent decoder, from docs/FORMAT.md alone: no vcfs import until "vcfs side".
# =========================================================================================


class NotAName(Exception):
    """The independent decoder refuses a backing name or target."""


IND_B64 = re.compile(rb"[A-Za-z0-9_-]+")


def ind_names_key(secret: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=64, salt=None, info=b"vcfs v1 names key").derive(secret)


def ind_b64(text: bytes) -> bytes:
    if not IND_B64.fullmatch(text) or len(text) % 4 == 1:
        raise NotAName("not base64url")
    try:
        raw = base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
    except binascii.Error:
        raise NotAName("not base64url") from None
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != text:
        raise NotAName("not the canonical encoding")
    return raw


def ind_open(key: bytes, sealed: bytes, ad: list[bytes]) -> bytes:
    try:
        padded = AESSIV(key).decrypt(sealed, ad)
    except InvalidTag:
        raise NotAName("does not authenticate") from None
    n = padded[-1] if padded else 0
    if not 1 <= n <= 16 or padded[-n:] != bytes([n]) * n:
        raise NotAName("bad padding")
    return padded[:-n]


def ind_decode_name(key: bytes, dir_id: bytes, entry: bytes, sidecar: bytes | None = None) -> bytes:
    """Plaintext name of backing name ``entry`` in the directory with id ``dir_id``."""
    if entry.endswith(b".long") and len(entry) == 48:
        if sidecar is None or base64.urlsafe_b64encode(hashlib.sha256(sidecar).digest()).rstrip(b"=") != entry[:43]:
            raise NotAName("sidecar does not match")
        sealed = sidecar
    elif b"." in entry:
        raise NotAName("vcfs's own file")
    else:
        sealed = ind_b64(entry)
    name = ind_open(key, sealed, [b"vcfs v1 name", dir_id])
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise NotAName("not a file name")
    return name


def ind_decode_target(key: bytes, stored: bytes) -> bytes:
    raw = ind_b64(stored)
    if len(raw) < 48:
        raise NotAName("too short")
    return ind_open(key, raw[16:], [b"vcfs v1 symlink", raw[:16]])


def ind_list_dir(key: bytes, path: Path) -> dict[str, str]:
    """{backing name: plaintext name} of one backing directory (read with plain file I/O)."""
    dir_id = (path / "vcfs.dirid").read_bytes()
    assert len(dir_id) == 16
    out = {}
    for entry in sorted(p.name for p in path.iterdir()):
        raw = entry.encode()
        if raw == b"vcfs.dirid" or raw.startswith(b"vcfs.tmp.") or raw.endswith(b".name"):
            continue
        sidecar = (path / (entry[:-5] + ".name")).read_bytes() if raw.endswith(b".long") else None
        out[entry] = ind_decode_name(key, dir_id, raw, sidecar).decode()
    return out


def ind_key_from_vector() -> bytes:
    secret = aes_key_unwrap_with_padding(bytes.fromhex(INPUTS["kek"]), bytes.fromhex(EXPECTED["wrapped_secret"]))
    assert secret.hex() == INPUTS["names_secret"]
    return ind_names_key(secret)


def test_independent_decoder_reads_the_vector() -> None:
    key = ind_key_from_vector()
    assert key.hex() == MID["names_key"]
    short = EXPECTED["short_entry"].encode()
    assert ind_decode_name(key, DIR_ID, short).decode() == INPUTS["short_name"]
    assert len(short) <= 255 and b"." not in short
    long_entry = EXPECTED["long_entry"].encode()
    sidecar = bytes.fromhex(EXPECTED["long_sidecar"])
    assert len(INPUTS["long_name"].encode()) > 159
    assert ind_decode_name(key, DIR_ID, long_entry, sidecar).decode() == INPUTS["long_name"]
    assert EXPECTED["long_sidecar_name"] == EXPECTED["long_entry"][:-5] + ".name"
    assert ind_decode_target(key, EXPECTED["stored_target"].encode()).decode() == INPUTS["symlink_target"]


def test_independent_decoder_refuses_moved_or_damaged_names() -> None:
    key = ind_key_from_vector()
    short = EXPECTED["short_entry"].encode()
    other_dir = bytes(16)
    with pytest.raises(NotAName, match="authenticate"):
        ind_decode_name(key, other_dir, short)  # the same backing name in another directory
    flipped = short[:10] + (b"A" if short[10:11] != b"A" else b"B") + short[11:]
    with pytest.raises(NotAName):
        ind_decode_name(key, DIR_ID, flipped)
    with pytest.raises(NotAName, match="sidecar"):
        ind_decode_name(key, DIR_ID, EXPECTED["long_entry"].encode(), bytes.fromhex(EXPECTED["long_sidecar"])[::-1])


# =========================================================================================
# vcfs side
# =========================================================================================

from vcfs.core.aead import NamesKey  # noqa: E402
from vcfs.core.names import (  # noqa: E402
    NameCodec,
    _pad,
    b64decode,
    classify,
    sha256,
)
from vcfs.errors import NameAuthError, NameTooLongError  # noqa: E402

SECRET = bytes.fromhex(INPUTS["names_secret"])


def codec() -> NameCodec:
    return NameCodec(NamesKey(SECRET))


def test_codec_reproduces_the_vector() -> None:
    c = codec()
    short, long = INPUTS["short_name"].encode(), INPUTS["long_name"].encode()
    assert _pad(short).hex() == MID["short_padded"] and _pad(long).hex() == MID["long_padded"]
    en = c.encrypt(short, DIR_ID)
    assert en.entry.decode() == EXPECTED["short_entry"] and en.sidecar is None
    assert b64decode(en.entry).hex() == EXPECTED["short_sealed"]
    en = c.encrypt(long, DIR_ID)
    assert en.entry.decode() == EXPECTED["long_entry"]
    assert en.sidecar is not None and en.sidecar.hex() == EXPECTED["long_sidecar"]
    assert sha256(en.sidecar).hex() == MID["long_sealed_sha256"]
    assert (en.sidecar_name or b"").decode() == EXPECTED["long_sidecar_name"]
    target = c.encrypt_target(INPUTS["symlink_target"].encode(), bytes.fromhex(INPUTS["target_nonce"]))
    assert target.decode() == EXPECTED["stored_target"]
    assert _pad(INPUTS["symlink_target"].encode()).hex() == MID["target_padded"]


def test_vector_file_is_what_make_names_vector_builds() -> None:
    from make_names_vector import build

    assert build() == VECTOR


def test_codec_refuses_what_the_independent_decoder_refuses() -> None:
    c = codec()
    short = EXPECTED["short_entry"].encode()
    with pytest.raises(NameAuthError, match="does not decrypt in this directory"):
        c.decrypt(short, bytes(16))
    with pytest.raises(NameAuthError, match="sidecar does not belong"):
        c.decrypt(EXPECTED["long_entry"].encode(), DIR_ID, bytes.fromhex(EXPECTED["long_sidecar"])[::-1])
    with pytest.raises(NameAuthError, match="without its sidecar"):
        c.decrypt(EXPECTED["long_entry"].encode(), DIR_ID)
    with pytest.raises(NameAuthError, match="canonical"):
        c.decrypt(short[:-1] + (b"x" if short[-1:] == b"w" else b"w"), DIR_ID)  # non-zero trailing bits
    with pytest.raises(NameAuthError, match="symlink target does not decrypt"):
        stored = EXPECTED["stored_target"].encode()
        c.decrypt_target(stored[:30] + (b"A" if stored[30:31] != b"A" else b"B") + stored[31:])


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "call_uid4711_acme-layoffs_2026-11-28.mp4",
        "Überstunden-Besprechung_会议_🎥.mkv",
        "x" * 159,  # the longest short name
        "x" * 160,  # the shortest long name
        "é" * 127 + "z",  # 255 bytes of UTF-8
        "vcfs.dirid",
        "name.with.dots",
        " leading space and trailing ",
    ],
)
def test_round_trip_and_what_the_backing_name_looks_like(name: str) -> None:
    c = codec()
    raw = name.encode()
    en = c.encrypt(raw, DIR_ID)
    assert len(en.entry) <= 255 and (len(raw) < 4 or raw not in en.entry)
    assert (en.sidecar is not None) == (len(raw) > 159)
    assert c.decrypt(en.entry, DIR_ID, en.sidecar) == raw
    assert ind_decode_name(ind_names_key(SECRET), DIR_ID, en.entry, en.sidecar) == raw
    assert classify(en.entry).value == ("long" if en.sidecar else "short")
    assert c.encrypt(raw, bytes(16)).entry != en.entry  # another directory, another backing name


def test_padding_hides_lengths_within_16_bytes() -> None:
    c = codec()
    lengths = {len(c.encrypt(b"n" * n, DIR_ID).entry) for n in range(1, 16)}
    assert len(lengths) == 1
    assert len(c.encrypt(b"n" * 16, DIR_ID).entry) > lengths.pop()


def test_symlink_targets_do_not_repeat_and_have_a_limit() -> None:
    c = codec()
    a, b = c.encrypt_target(b"same/target"), c.encrypt_target(b"same/target")
    assert a != b and c.decrypt_target(a) == c.decrypt_target(b) == b"same/target"
    longest = c.encrypt_target(b"t" * 3023)
    assert len(longest) <= 4095 and c.decrypt_target(longest) == b"t" * 3023
    with pytest.raises(NameTooLongError):
        c.encrypt_target(b"t" * 3024)
    with pytest.raises(NameTooLongError):
        c.encrypt(b"n" * 256, DIR_ID)


def test_backing_names_never_contain_a_dot_and_internal_names_are_not_entries() -> None:
    for internal in (b"vcfs.dirid", b"vcfs.tmp.0123abcd", EXPECTED["long_sidecar_name"].encode()):
        assert classify(internal).value in ("dirid", "tmp", "sidecar")
        with pytest.raises(NameAuthError):
            codec().decrypt(internal, DIR_ID)
    assert classify(b"holiday.mp4").value == "foreign"


# ---- properties -------------------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_names = st.binary(min_size=1, max_size=255).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
)


@settings(max_examples=200, deadline=None)
@given(name=_names, dir_id=st.binary(min_size=16, max_size=16))
def test_every_valid_name_round_trips_through_both_decoders(name: bytes, dir_id: bytes) -> None:
    en = codec().encrypt(name, dir_id)
    assert len(en.entry) <= 255 and (en.sidecar is None) == (len(name) <= 159)
    assert codec().decrypt(en.entry, dir_id, en.sidecar) == name
    assert ind_decode_name(ind_names_key(SECRET), dir_id, en.entry, en.sidecar) == name


@settings(max_examples=300, deadline=None)
@given(entry=st.binary(min_size=1, max_size=255), sidecar=st.none() | st.binary(max_size=300))
def test_arbitrary_backing_names_are_refused_with_a_name_error(entry: bytes, sidecar: bytes | None) -> None:
    with pytest.raises(NameAuthError):
        codec().decrypt(entry, DIR_ID, sidecar)
