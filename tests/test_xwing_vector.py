"""An independent reader of wrap algorithm 2, written from docs/FORMAT.md alone.

It uses nothing from vcfs: only hashlib and cryptography's ML-KEM-768, X25519, HKDF and
RFC 5649 unwrap, so a mistake shared by the codec and its documentation shows up here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
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
