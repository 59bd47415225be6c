"""Build tests/data/vector-xwing-wrap.json: one wrap-algorithm-2 blob with fixed inputs, and a
whole backing file whose slot holds it (what an ingest host writes).

Run `python tests/make_xwing_vector.py` (the file is committed). ML-KEM's encapsulation
randomness cannot be fixed through `cryptography`, so the blob is made once and then kept: a
rerun reuses the recorded blob (after checking it still unwraps) and rebuilds only the backing
file, which is a pure function of it. `--new-blob` makes a fresh one. The vector is checked by
unwrapping, as a recipient would (tests/test_xwing_vector.py).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vcfs.core import kemwrap, xwing  # noqa: E402
from vcfs.core.aead import derive_file_keys  # noqa: E402
from vcfs.core.blocks import seal_block  # noqa: E402
from vcfs.core.header import WRAP_XWING_KWP, KeySlot, new_header  # noqa: E402

OUT = ROOT / "tests" / "data" / "vector-xwing-wrap.json"
SEED = bytes(range(0x80, 0xA0))
DEK = bytes(range(0x40, 0x60))
X25519_EPHEMERAL = bytes(range(0xC0, 0xE0))
FILE_ID = bytes(range(0xB0, 0xC0))
DOMAIN, RECIPIENT, GENERATION, SEALS = "default", 1, 1, 65536
PLAIN = b"an ingest host wrote this; only a host with the HSM reads it back\n" * 20  # 1320 bytes: one block
NONCE = b"\x07" * 12


def backing_file(blob: bytes) -> dict[str, Any]:
    """The whole file, a pure function of the blob and the fixed inputs above."""
    keys = derive_file_keys(DEK, FILE_ID)
    header = new_header(FILE_ID, keys, KeySlot(GENERATION, WRAP_XWING_KWP, DOMAIN, RECIPIENT, blob, SEALS))
    sealed = seal_block(keys, header.preamble.bound, 0, True, PLAIN, nonce=NONCE)
    backing = header.encode() + sealed
    slot = header.slots[0]
    assert slot is not None
    return {
        "file_id": FILE_ID.hex(),
        "domain": DOMAIN,
        "recipient_version": RECIPIENT,
        "wrap_alg": WRAP_XWING_KWP,
        "slot_generation": GENERATION,
        "seals": SEALS,
        "plaintext": PLAIN.hex(),
        "nonce": NONCE.hex(),
        "slot0": slot.encode().hex(),
        "slot0_mac": slot.mac.hex(),
        "key_commitment": keys.commitment.hex(),
        "backing_size": len(backing),
        "backing_sha256": hashlib.sha256(backing).hexdigest(),
        "backing": backing.hex(),
    }


def main() -> None:
    key = xwing.expand(SEED)
    old = json.loads(OUT.read_text()) if OUT.exists() and "--new-blob" not in sys.argv else None
    blob = bytes.fromhex(old["blob"]) if old else kemwrap.wrap_to(key.public, DEK, x25519_ephemeral=X25519_EPHEMERAL)
    assert kemwrap.unwrap_with(key, blob) == DEK
    out = {
        "description": "wrap algorithm 2 (docs/FORMAT.md, 'Wrap algorithm 2'), built by tests/make_xwing_vector.py",
        "recipient_seed": SEED.hex(),
        "recipient_public_key": key.public.hex(),
        "fingerprint": kemwrap.fingerprint(key.public).hex(),
        "x25519_ephemeral": X25519_EPHEMERAL.hex(),
        "blob": blob.hex(),
        "dek": DEK.hex(),
        "file": backing_file(blob),
    }
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}: backing file {out['file']['backing_size']} bytes")


if __name__ == "__main__":
    main()
