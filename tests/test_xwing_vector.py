"""An independent reader of wrap algorithm 2, written from docs/FORMAT.md alone.

The reader uses nothing from vcfs: only hashlib, hmac, struct and cryptography's ML-KEM-768,
X25519, HKDF, RFC 5649 unwrap and AES-GCM, so a mistake shared by the codec and its
documentation shows up here. The last test checks the other direction: vcfs's codec makes the
same bytes, and vcfs reads them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding

VECTOR = json.loads((Path(__file__).parent / "data" / "vector-xwing-wrap.json").read_text())


def independent_unwrap(seed: bytes, blob: bytes) -> bytes:
    expanded = hashlib.shake_256(seed).digest(96)
    sk_m = mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[0:64])
    sk_x = x25519.X25519PrivateKey.from_private_bytes(expanded[64:96])
    pk = sk_m.public_key().public_bytes_raw() + sk_x.public_key().public_bytes_raw()
    fp, ct, wrapped = blob[0:16], blob[16:1136], blob[1136:1176]
    assert fp == hashlib.sha3_256(b"vcfs v1 recipient" + pk).digest()[:16]
    ct_m, ct_x = ct[:1088], ct[1088:]
    ss_m = sk_m.decapsulate(ct_m)
    ss_x = sk_x.exchange(x25519.X25519PublicKey.from_public_bytes(ct_x))
    ss = hashlib.sha3_256(ss_m + ss_x + ct_x + pk[1184:1216] + bytes.fromhex("5c2e2f2f5e5c")).digest()
    kek = HKDF(algorithm=hashes.SHA256(), length=32, salt=fp, info=b"vcfs v1 xwing dek wrap").derive(ss)
    return aes_key_unwrap_with_padding(kek, wrapped)


def test_vector_unwraps_independently() -> None:
    seed, blob = bytes.fromhex(VECTOR["recipient_seed"]), bytes.fromhex(VECTOR["blob"])
    assert len(blob) == 1176
    assert independent_unwrap(seed, blob) == bytes.fromhex(VECTOR["dek"])


def test_vector_public_key_and_ephemeral() -> None:
    expanded = hashlib.shake_256(bytes.fromhex(VECTOR["recipient_seed"])).digest(96)
    sk_m = mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[0:64])
    sk_x = x25519.X25519PrivateKey.from_private_bytes(expanded[64:96])
    pk = sk_m.public_key().public_bytes_raw() + sk_x.public_key().public_bytes_raw()
    assert pk.hex() == VECTOR["recipient_public_key"]
    eph = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(VECTOR["x25519_ephemeral"]))
    ct_x = bytes.fromhex(VECTOR["blob"])[16 + 1088 : 16 + 1120]
    assert eph.public_key().public_bytes_raw() == ct_x


def test_backing_file_decrypts_independently() -> None:
    """The whole file an ingest host writes, read from docs/FORMAT.md alone (Header, Key slots, Blocks)."""
    f = VECTOR["file"]
    raw = bytes.fromhex(f["backing"])
    assert len(raw) == f["backing_size"] and hashlib.sha256(raw).hexdigest() == f["backing_sha256"]
    preamble, slot = raw[0:64], raw[64 : 64 + 2016]
    file_id = preamble[12:28]
    gen, alg, version, seals, dlen, wlen = struct.unpack(">QHIQBH", slot[:25])
    assert (gen, alg, version, seals, dlen, wlen) == (1, 2, 1, 65536, 7, 1176)
    assert slot[25 : 25 + dlen] == b"default"
    dek = independent_unwrap(bytes.fromhex(VECTOR["recipient_seed"]), slot[25 + dlen : 25 + dlen + wlen])

    def hkdf(info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=file_id, info=info).derive(dek)

    assert hkdf(b"vcfs v1 key commitment") == preamble[28:60]
    mac = hmac.new(hkdf(b"vcfs v1 header mac key"), preamble + slot[:1984], hashlib.sha256).digest()
    assert mac == slot[1984:2016]
    block = raw[4096:]
    aad = preamble[:28] + (0).to_bytes(8, "big") + b"\x01"  # block 0, final
    plain = AESGCM(hkdf(b"vcfs v1 content key")).decrypt(block[:12], block[12:], aad)
    assert plain == bytes.fromhex(f["plaintext"])


def test_codec_reproduces_the_backing_file_and_vcfs_reads_it(tmp_path: Path) -> None:
    from make_xwing_vector import backing_file

    from vcfs.cryptfile import open_cryptfile
    from vcfs.keys.base import KeyRef, Wrapped
    from vcfs.keys.recipient import RecipientKeyring, RecipientSpec

    f = VECTOR["file"]
    assert backing_file(bytes.fromhex(VECTOR["blob"]))["backing"] == f["backing"]
    path = tmp_path / "rec"
    path.write_bytes(bytes.fromhex(f["backing"]))
    seed = bytes.fromhex(VECTOR["recipient_seed"])
    seed_wrapping = Wrapped(KeyRef("default", 1), 1, b"(the seed, wrapped under a KEK)")
    keyring = RecipientKeyring(lambda _w: bytearray(seed))  # stands in for the HSM's unwrap of the seed
    keyring.sync([RecipientSpec(KeyRef("default", 1), bytes.fromhex(VECTOR["fingerprint"]), seed=seed_wrapping)])
    cf = open_cryptfile(os.open(path, os.O_RDONLY), "rec", keyring.unwrap)
    try:
        assert cf.read(0, cf.size) == bytes.fromhex(f["plaintext"])
    finally:
        cf.close()
