"""Build tests/data/vector-xwing-wrap.json: one wrap-algorithm-2 blob with fixed inputs.

Run once (`python tests/make_xwing_vector.py`); the file is committed. ML-KEM's encapsulation
randomness cannot be fixed through `cryptography`, so the recorded ciphertext is whatever this
run produced; the vector is checked by unwrapping, as a recipient would.
"""

from __future__ import annotations

import json
from pathlib import Path

from vcfs.core import kemwrap, xwing

SEED = bytes(range(0x80, 0xA0))
DEK = bytes(range(0x40, 0x60))
X25519_EPHEMERAL = bytes(range(0xC0, 0xE0))


def main() -> None:
    key = xwing.expand(SEED)
    blob = kemwrap.wrap_to(key.public, DEK, x25519_ephemeral=X25519_EPHEMERAL)
    assert kemwrap.unwrap_with(key, blob) == DEK
    out = {
        "recipient_seed": SEED.hex(),
        "recipient_public_key": key.public.hex(),
        "fingerprint": kemwrap.fingerprint(key.public).hex(),
        "x25519_ephemeral": X25519_EPHEMERAL.hex(),
        "blob": blob.hex(),
        "dek": DEK.hex(),
    }
    path = Path(__file__).parent / "data" / "vector-xwing-wrap.json"
    path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
