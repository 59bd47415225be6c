"""Build the v1 format test vectors (tests/data/vector-v1.json, journal-v1.json) from fixed inputs.

Run:  .venv/bin/python tests/make_vector.py

journal-v1.json is a crash: the vector's file was growing, the rewrite of its last block was
cut after two pages, and its journal holds the block's synced version; recovery (FORMAT.md,
"Recovery") gives back exactly vector-v1's backing file.

The backing file is produced by vcfs's own codec (vcfs.core.*) from fixed inputs, so it is
byte-for-byte reproducible. docs/FORMAT.md ("Worked example") walks through it, and
tests/test_vectors.py decrypts it with an independent decryptor and checks that the codec
still produces exactly these bytes.

The DEK is wrapped with cryptography's aes_key_wrap_with_padding (RFC 5649). For a 32-byte
key this is byte-identical to what a PKCS#11 token returns for C_WrapKey with
CKM_AES_KEY_WRAP_PAD (0x210A, SoftHSM2) or CKM_AES_KEY_WRAP_KWP (0x210B, PKCS#11 3.x): RFC
5649 is deterministic, there is no IV to choose.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vcfs.core.aead import (  # noqa: E402
    INFO_COMMITMENT,
    INFO_CONTENT,
    INFO_HEADER_MAC,
    _hkdf,
    derive_file_keys,
)
from vcfs.core.blocks import block_aad, seal_block  # noqa: E402
from vcfs.core.header import WRAP_PKCS11_AES_KWP, KeySlot, new_header  # noqa: E402
from vcfs.core.journal import Record  # noqa: E402
from vcfs.core.layout import (  # noqa: E402
    BLOCK_SIZE,
    block_count,
    block_len,
    block_no_to_cipher_off,
    plain_to_cipher_size,
)

OUT = ROOT / "tests" / "data" / "vector-v1.json"
JOURNAL_OUT = ROOT / "tests" / "data" / "journal-v1.json"

KEK = bytes(range(32))
DEK = bytes(range(0x40, 0x60))
FILE_ID = bytes(range(0xA0, 0xB0))
DOMAIN = "default"
KEK_VERSION = 1
GENERATION = 1
SEALS = 65536
PLAIN_LEN = 70000
NONCES = [b"\x01" * 12, b"\x02" * 12]


def plaintext(n: int = PLAIN_LEN) -> bytes:
    """byte i = (i * 7) % 251; the first n bytes of the same sequence for every length."""
    return bytes(i * 7 % 251 for i in range(n))


def build(
    kek: bytes = KEK,
    dek: bytes = DEK,
    file_id: bytes = FILE_ID,
    plain: bytes | None = None,
    nonces: list[bytes] | None = None,
) -> dict[str, Any]:
    """Every value of the vector; pure function of the inputs (no randomness)."""
    plain = plaintext() if plain is None else plain
    nblocks = block_count(len(plain))
    nonces = NONCES if nonces is None else nonces
    if len(nonces) != nblocks:
        raise ValueError(f"need {nblocks} nonces")

    keys = derive_file_keys(dek, file_id)
    wrapped = aes_key_wrap_with_padding(kek, dek)
    slot = KeySlot(GENERATION, WRAP_PKCS11_AES_KWP, DOMAIN, KEK_VERSION, wrapped, SEALS)
    header = new_header(file_id, keys, slot)
    head = header.encode()
    pre = header.preamble
    sealed_slot = header.slots[0]
    assert sealed_slot is not None

    blocks = []
    body = b""
    for b in range(nblocks):
        final = b == nblocks - 1
        chunk = plain[b * BLOCK_SIZE : b * BLOCK_SIZE + block_len(b, len(plain))]
        sealed = seal_block(keys, pre.bound, b, final, chunk, nonce=nonces[b])
        assert len(body) + len(head) == block_no_to_cipher_off(b)
        body += sealed
        blocks.append(
            {
                "block_no": b,
                "final": final,
                "offset": block_no_to_cipher_off(b),
                "plain_len": len(chunk),
                "sealed_len": len(sealed),
                "aad": block_aad(pre.bound, b, final).hex(),
                "nonce": nonces[b].hex(),
                "sealed_first16": sealed[:16].hex(),
                "sealed_last16": sealed[-16:].hex(),
                "tag": sealed[-16:].hex(),
                "sealed_sha256": hashlib.sha256(sealed).hexdigest(),
            }
        )
    backing = head + body
    assert len(backing) == plain_to_cipher_size(len(plain))

    return {
        "description": (
            "vcfs on-disk format v1 test vector, built by tests/make_vector.py with vcfs's codec; "
            "see docs/FORMAT.md, 'Worked example'. All byte strings are lowercase hex."
        ),
        "format_version": 1,
        "inputs": {
            "kek": kek.hex(),
            "kek_note": "AES-256 KEK; the wrap is RFC 5649 (cryptography aes_key_wrap_with_padding == PKCS#11 "
            "CKM_AES_KEY_WRAP_PAD 0x210A on SoftHSM2)",
            "dek": dek.hex(),
            "file_id": file_id.hex(),
            "domain": DOMAIN,
            "kek_version": KEK_VERSION,
            "wrap_alg": WRAP_PKCS11_AES_KWP,
            "slot_generation": GENERATION,
            "seals": SEALS,
            "plaintext_rule": "byte i = (i * 7) % 251",
            "plaintext_len": len(plain),
            "plaintext_sha256": hashlib.sha256(plain).hexdigest(),
            "plaintext": plain.hex(),
            "nonces": [n.hex() for n in nonces],
        },
        "intermediate": {
            "hkdf_infos": {
                "content_key": INFO_CONTENT.decode(),
                "header_mac_key": INFO_HEADER_MAC.decode(),
                "key_commitment": INFO_COMMITMENT.decode(),
            },
            "content_key": _hkdf(dek, file_id, INFO_CONTENT).hex(),
            "header_mac_key": keys.mac_key.hex(),
            "key_commitment": keys.commitment.hex(),
            "wrapped_dek": wrapped.hex(),
            "preamble": pre.encode().hex(),
            "aad_prefix": pre.bound.hex(),
            "slot0": sealed_slot.encode().hex(),
            "slot0_mac": sealed_slot.mac.hex(),
            "slot1": "all zero (empty slot)",
            "header_sha256": hashlib.sha256(head).hexdigest(),
            "blocks": blocks,
        },
        "expected": {
            "backing_size": len(backing),
            "backing_sha256": hashlib.sha256(backing).hexdigest(),
            "backing": backing.hex(),
        },
    }


GROWN_LEN = 140_000  # the file grew from 70,000 to this many bytes when the crash hit
TORN_AT = 8192  # bytes of the new block 1 that reached the file: two pages, then kill -9
JOURNAL_NONCES = [b"\x03" * 12, b"\x04" * 12, b"\x05" * 12]  # new block 1, new block 2, the stale record's block


def build_journal() -> dict[str, Any]:
    """The crash vector; pure function of the fixed inputs."""
    base = build()
    synced = bytes.fromhex(base["expected"]["backing"])
    keys = derive_file_keys(DEK, FILE_ID)
    bound = bytes.fromhex(base["intermediate"]["aad_prefix"])
    grown = plaintext(GROWN_LEN)
    new1 = seal_block(keys, bound, 1, False, grown[BLOCK_SIZE : 2 * BLOCK_SIZE], nonce=JOURNAL_NONCES[0])
    torn = synced[: block_no_to_cipher_off(1)] + new1[:TORN_AT]
    old1 = synced[block_no_to_cipher_off(1) :]
    block0 = synced[block_no_to_cipher_off(0) : block_no_to_cipher_off(1)]
    stale1 = seal_block(keys, bound, 1, True, b"an older, obsolete version", nonce=JOURNAL_NONCES[2])
    records = [
        Record(2, FILE_ID, 1, old1, b"rec.bin"),  # current: the synced block 1 (applied)
        Record(2, FILE_ID, 0, block0, b"rec.bin"),  # current, but block 0 is intact (not applied)
        Record(1, FILE_ID, 1, stale1, b"rec.bin"),  # older epoch after the current ones (ignored)
    ]
    encoded = [r.encode() for r in records]
    journal = b"".join(encoded)
    offsets = [sum(len(e) for e in encoded[:i]) for i in range(len(encoded))]
    return {
        "description": (
            "vcfs journal (crash recovery) vector, built by tests/make_vector.py; see docs/FORMAT.md, "
            "'Recovery'. Same keys, file id and plaintext rule as vector-v1.json. All byte strings are hex."
        ),
        "inputs": {
            "synced_plaintext_len": len(plaintext()),
            "grown_plaintext_len": GROWN_LEN,
            "torn_at": TORN_AT,
            "new_block1_nonce": JOURNAL_NONCES[0].hex(),
            "stale_nonce": JOURNAL_NONCES[2].hex(),
        },
        "torn_backing": torn.hex(),
        "torn_backing_size": len(torn),
        "journal_name": FILE_ID.hex(),
        "journal": journal.hex(),
        "records": [
            {
                "offset": off,
                "epoch": r.epoch,
                "block_no": r.block_no,
                "sealed_len": len(r.sealed),
                "hint": r.hint.decode(),
                "head": enc[:48].hex(),
                "applied": i == 0,
            }
            for i, (off, r, enc) in enumerate(zip(offsets, records, encoded, strict=True))
        ],
        "expected": {
            "recovered_size": len(synced),
            "recovered_sha256": hashlib.sha256(synced).hexdigest(),
            "plaintext_sha256": base["inputs"]["plaintext_sha256"],
        },
    }


def main() -> None:
    vector = build()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(vector, indent=1) + "\n")
    exp = vector["expected"]
    print(f"wrote {OUT.relative_to(ROOT)}: backing file {exp['backing_size']} bytes, sha256 {exp['backing_sha256']}")
    crash = build_journal()
    JOURNAL_OUT.write_text(json.dumps(crash, indent=1) + "\n")
    print(f"wrote {JOURNAL_OUT.relative_to(ROOT)}: torn file {crash['torn_backing_size']} bytes, journal of 3 records")


if __name__ == "__main__":
    main()
