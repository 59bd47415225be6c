"""Hostile input: the format parsers and the config loader only ever raise vcfs's own errors.

Hypothesis feeds arbitrary bytes and mutations of a real header (tests/data/vector-v1.json)
to the header, slot, size and block parsers, and mutated TOML to the store-config loader.
Anything but a VcfsError subclass (IndexError, struct.error, UnicodeDecodeError, ValueError,
...) is a bug: the mount and fsck map only VcfsError to a clean errno or message.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import require
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vcfs.config import CONFIG_NAME, load_config
from vcfs.core.aead import derive_file_keys
from vcfs.core.blocks import open_block
from vcfs.core.header import SLOT_LEN, parse_header, parse_slot, slot_offset
from vcfs.core.journal import Record, parse_records
from vcfs.core.layout import HEADER_LEN, cipher_to_plain_size
from vcfs.errors import ConfigError, VcfsError

VECTOR = json.loads((Path(__file__).parent / "data" / "vector-v1.json").read_text())
BACKING = bytes.fromhex(VECTOR["expected"]["backing"])
HEADER = BACKING[:HEADER_LEN]
BLOCK0 = BACKING[4096 : 4096 + 65564]
BLOCK1 = BACKING[4096 + 65564 :]
KEYS = derive_file_keys(bytes.fromhex(VECTOR["inputs"]["dek"]), bytes.fromhex(VECTOR["inputs"]["file_id"]))
BOUND = bytes.fromhex(VECTOR["intermediate"]["aad_prefix"])

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CONFIG = """# vcfs store config
format = 1
store_id = "0123456789abcdef0123456789abcdef"

[features]
encrypted_names = false

[keys]
default_domain = "default"

[keys.domains.default]
module = "/usr/lib/softhsm/libsofthsm2.so"
embedded = true
current = 1

[[keys.domains.default.kek]]
version = 1
uri = "pkcs11:token=vcfs;object=vcfs-kek-default-v1"
mechanism = 8458
check_wrapped = "00ff"
check_value = "aa55"
state = "active"
created = "2026-01-01T00:00:00Z"
changed = ""
"""


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with a few bytes flipped, overwritten, cut, inserted or appended."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "extend"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            data += draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


def _only_vcfs_errors(fn, *args) -> None:  # type: ignore[no-untyped-def]
    with contextlib.suppress(VcfsError):
        fn(*args)


def test_the_vector_itself_parses() -> None:
    """The seeds are real: unmutated they parse and open."""
    header = parse_header(HEADER)
    assert header.slots[0] is not None and header.slots[1] is None
    assert cipher_to_plain_size(len(BACKING)) == VECTOR["inputs"]["plaintext_len"]
    assert len(open_block(KEYS, BOUND, 1, True, BLOCK1)) == 70000 - 65536


@FUZZ
@given(st.one_of(mutated(HEADER), st.binary(max_size=HEADER_LEN + 64)))
def test_parse_header_raises_only_format_errors(data: bytes) -> None:
    _only_vcfs_errors(parse_header, data)


@FUZZ
@given(
    st.one_of(
        mutated(HEADER[slot_offset(0) : slot_offset(0) + SLOT_LEN]),
        st.binary(max_size=SLOT_LEN + 16),
        # short slices of a slot: parse_slot must not unpack past the end
        st.binary(max_size=40),
    )
)
def test_parse_slot_raises_only_format_errors(data: bytes) -> None:
    _only_vcfs_errors(parse_slot, data)


@FUZZ
@given(st.integers(min_value=-(2**70), max_value=2**70))
def test_cipher_to_plain_size_raises_only_truncated(size: int) -> None:
    try:
        plain = cipher_to_plain_size(size)
    except VcfsError:
        return
    assert plain >= 0


@FUZZ
@given(
    st.one_of(mutated(BLOCK1), st.binary(max_size=200)),
    st.integers(min_value=0, max_value=2**64 - 1),
    st.booleans(),
)
def test_open_block_raises_only_block_errors(sealed: bytes, block_no: int, final: bool) -> None:
    try:
        plain = open_block(KEYS, BOUND, block_no, final, sealed)
    except VcfsError:
        return
    # Only the untouched block at its own position and flag may open.
    assert (sealed, block_no, final) == (BLOCK1, 1, True)
    assert len(plain) == 70000 - 65536


JOURNAL = Record(1, bytes.fromhex(VECTOR["inputs"]["file_id"]), 1, BLOCK1, b"rec.bin").encode() * 2


@FUZZ
@given(st.one_of(mutated(JOURNAL), st.binary(max_size=300)))
def test_parse_records_never_raises(data: bytes) -> None:
    """Journal files are read after crashes: any bytes at all parse to records or to nothing."""
    for rec in parse_records(data):
        assert 28 <= len(rec.sealed) <= 65564 and len(rec.file_id) == 16
        assert rec.epoch == parse_records(data)[0].epoch


ATHERIS_RUNS = int(os.environ.get("VCFS_ATHERIS_RUNS", "200000"))


def test_atheris_finds_no_crash_in_the_parsers(tmp_path: Path) -> None:
    """Coverage-guided fuzzing (libFuzzer via atheris) of header, slot, size, block and journal
    parsing, seeded with the vector; tests/fuzz_parsers.py says what counts as a finding."""
    try:
        import atheris  # noqa: F401
    except ImportError:
        require(False, "atheris (pip install atheris)")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    harness = Path(__file__).parent / "fuzz_parsers.py"
    res = subprocess.run(
        [sys.executable, str(harness), f"-runs={ATHERIS_RUNS}", "-seed=1", "-max_len=70000",
         f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"Done {ATHERIS_RUNS} runs" in res.stderr


def _load(tmp: Path, text: bytes) -> None:
    (tmp / CONFIG_NAME).write_bytes(text)
    load_config(tmp)


def test_seed_config_loads(tmp_path: Path) -> None:
    (tmp_path / "files").mkdir()
    (tmp_path / CONFIG_NAME).write_text(CONFIG)
    cfg = load_config(tmp_path)
    assert cfg.default_domain == "default" and cfg.domains["default"].keks[0].version == 1


def _toml_value() -> st.SearchStrategy[object]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(allow_nan=False),
        st.text(max_size=20),
    )
    return st.recursive(
        scalars.filter(lambda v: v is not None),
        lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
        max_leaves=6,
    )


@st.composite
def mutated_config(draw: st.DrawFn) -> dict[str, object]:
    """The seed config as a dict with one value somewhere replaced, removed or retyped."""
    cfg = tomllib.loads(CONFIG)

    def collect(node: object, path: tuple[str | int, ...], out: list[tuple[str | int, ...]]) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            out.append((*path, k))
            collect(v, (*path, k), out)

    for _ in range(draw(st.integers(1, 3))):
        paths: list[tuple[str | int, ...]] = []
        collect(cfg, (), paths)
        path = draw(st.sampled_from(paths))
        parent: object = cfg
        for key in path[:-1]:
            parent = parent[key]  # type: ignore[index]
        if draw(st.booleans()):
            del parent[path[-1]]  # type: ignore[attr-defined]
        else:
            parent[path[-1]] = draw(_toml_value())  # type: ignore[index]
    return cfg


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fuzzconf")
    (path / "files").mkdir()
    return path


@FUZZ
@given(mutated_config())
def test_load_config_structured_mutations_raise_only_config_error(config_dir: Path, cfg: dict[str, object]) -> None:
    import tomli_w

    try:
        text = tomli_w.dumps(cfg).encode()
    except (TypeError, ValueError):
        return  # not representable as TOML
    with contextlib.suppress(ConfigError):
        _load(config_dir, text)


@FUZZ
@given(mutated(CONFIG.encode()))
def test_load_config_byte_mutations_raise_only_config_error(config_dir: Path, text: bytes) -> None:
    with contextlib.suppress(ConfigError):
        _load(config_dir, text)
