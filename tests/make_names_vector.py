"""Build the encrypted-names test vector (tests/data/names-v1.json) from fixed inputs.

Run:  .venv/bin/python tests/make_names_vector.py

Every value comes from vcfs's own codec (vcfs.core.names, vcfs.core.aead) with fixed inputs;
the only random input of the scheme, a symlink target's nonce, is fixed here. docs/FORMAT.md
("Names", worked example) walks through the vector, and tests/test_names_vector.py decodes
it with an independent decoder and checks that the codec still produces exactly these bytes.
The names secret is wrapped with cryptography's aes_key_wrap_with_padding (RFC 5649), which is
byte-identical to SoftHSM2's C_WrapKey with CKM_AES_KEY_WRAP_PAD for a 32-byte key.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vcfs.core.aead import INFO_NAMES, NAMES_KEY_LEN, NamesKey  # noqa: E402
from vcfs.core.names import NameCodec, _pad, b64decode, sha256  # noqa: E402

OUT = ROOT / "tests" / "data" / "names-v1.json"

KEK = bytes(range(32))
SECRET = bytes(range(0x60, 0x80))
DIR_ID = bytes(range(0x80, 0x90))
SHORT = "call_uid4711_acme-layoffs_2026-11-28.mp4"
LONG = "2026-11-28_Krisensitzung_Geschäftsführung_Betriebsrat_Überstunden_Kündigungen_" * 2 + "会议记录.mp4"
TARGET = "../2026-11-28/call_uid4711_acme-layoffs_2026-11-28.mp4"
TARGET_NONCE = bytes(range(0x90, 0xA0))


def build() -> dict[str, Any]:
    codec = NameCodec(NamesKey(SECRET))
    names_key = HKDF(algorithm=hashes.SHA256(), length=NAMES_KEY_LEN, salt=None, info=INFO_NAMES).derive(SECRET)
    short, long = SHORT.encode(), LONG.encode()
    short_en, long_en = codec.encrypt(short, DIR_ID), codec.encrypt(long, DIR_ID)
    assert long_en.sidecar is not None and short_en.sidecar is None
    stored_target = codec.encrypt_target(TARGET.encode(), TARGET_NONCE)
    return {
        "about": "vcfs encrypted names, scheme 1: see docs/FORMAT.md, section Names",
        "inputs": {
            "kek": KEK.hex(),
            "names_secret": SECRET.hex(),
            "dir_id": DIR_ID.hex(),
            "short_name": SHORT,
            "long_name": LONG,
            "symlink_target": TARGET,
            "target_nonce": TARGET_NONCE.hex(),
        },
        "intermediate": {
            "names_key": names_key.hex(),
            "short_padded": _pad(short).hex(),
            "long_padded": _pad(long).hex(),
            "long_sealed_sha256": sha256(long_en.sidecar).hex(),
            "target_padded": _pad(TARGET.encode()).hex(),
        },
        "expected": {
            "wrapped_secret": aes_key_wrap_with_padding(KEK, SECRET).hex(),
            "short_entry": short_en.entry.decode(),
            "short_sealed": b64decode(short_en.entry).hex(),
            "long_entry": long_en.entry.decode(),
            "long_sidecar_name": (long_en.sidecar_name or b"").decode(),
            "long_sidecar": long_en.sidecar.hex(),
            "stored_target": stored_target.decode(),
        },
    }


def main() -> None:
    OUT.write_text(json.dumps(build(), indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
