"""atheris (libFuzzer, coverage-guided) harness for the format parsers.

Run by tests/test_fuzz.py::test_atheris_finds_no_crash_in_the_parsers as a subprocess (libFuzzer
ends its process when done), or by hand for a longer run:

    .venv/bin/python tests/fuzz_parsers.py -runs=1000000 CORPUS_DIR

The first input byte picks the parser; the rest is its input. Any exception other than the
format's own (VcfsError subclasses) is a finding: atheris prints it and exits non-zero. The
block target also checks that nothing but the untouched vector block at its own position
and flag ever opens.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from vcfs.core.aead import derive_file_keys
    from vcfs.core.blocks import open_block
    from vcfs.core.header import parse_header, parse_slot
    from vcfs.core.journal import parse_records
    from vcfs.core.layout import cipher_to_plain_size
    from vcfs.errors import VcfsError

VECTOR = json.loads((Path(__file__).parent / "data" / "vector-v1.json").read_text())
BACKING = bytes.fromhex(VECTOR["expected"]["backing"])
KEYS = derive_file_keys(bytes.fromhex(VECTOR["inputs"]["dek"]), bytes.fromhex(VECTOR["inputs"]["file_id"]))
BOUND = bytes.fromhex(VECTOR["intermediate"]["aad_prefix"])
BLOCK1 = BACKING[4096 + 65564 :]
TARGETS = ("header", "slot", "size", "block", "journal")


def one_input(data: bytes) -> None:
    if not data:
        return
    target, rest = TARGETS[data[0] % len(TARGETS)], data[1:]
    try:
        if target == "header":
            parse_header(rest)
        elif target == "slot":
            parse_slot(rest)
        elif target == "size":
            assert cipher_to_plain_size(int.from_bytes(rest[:9], "big", signed=True)) >= 0
        elif target == "block":
            block_no, final, sealed = int.from_bytes(rest[:8], "big"), bool(rest[8:9] == b"\1"), rest[9:]
            open_block(KEYS, BOUND, block_no, final, sealed)
            assert (block_no, final, sealed) == (1, True, BLOCK1), "a forged block opened"
        else:
            for rec in parse_records(rest):
                assert 28 <= len(rec.sealed) <= 65564 and len(rec.file_id) == 16
    except VcfsError:
        pass


def seeds() -> dict[str, bytes]:
    """Starting points for the corpus: each target's valid input."""
    head = BACKING[:4096]
    return {
        "header": bytes([0]) + head,
        "slot": bytes([1]) + head[64:2080],
        "size": bytes([2]) + len(BACKING).to_bytes(9, "big"),
        "block": bytes([3]) + (1).to_bytes(8, "big") + b"\1" + BLOCK1,
        "journal": bytes([4]) + _journal_seed(),
    }


def _journal_seed() -> bytes:
    from vcfs.core.journal import Record

    file_id = bytes.fromhex(VECTOR["inputs"]["file_id"])
    return Record(1, file_id, 1, BLOCK1, b"rec.bin").encode() + Record(1, file_id, 0, BLOCK1[:100]).encode()


if __name__ == "__main__":
    corpus = [a for a in sys.argv[1:] if not a.startswith("-")]
    for directory in corpus:
        for name, seed in seeds().items():
            (Path(directory) / f"seed-{name}").write_bytes(seed)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
