"""Recipient keys without a mount: lifecycle against a real SoftHSM2 token, ingest-wrapped files
made with the real engine, and what tampering with them turns into.

An ingest-wrapped file is made here the way an ingest mount makes one: CryptFile under the
IngestProvider of the recipient's public file (no HSM), then read back offline through the
store's provider, which unwraps the recipient seed in the HSM.
"""

from __future__ import annotations

import json
import os
import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_vcfs

from vcfs.config import load_config
from vcfs.core import kemwrap, xwing
from vcfs.core.header import WRAP_PKCS11_AES_KWP, WRAP_XWING_KWP, parse_header, slot_offset
from vcfs.core.layout import HEADER_LEN
from vcfs.cryptfile import create_cryptfile, open_cryptfile
from vcfs.errors import ConfigError, HeaderAuthError, KeyDestroyedError, KeyProviderError
from vcfs.ingest import IngestKeys, check_recipient, open_ingest_provider
from vcfs.ingestnames import read_names_file
from vcfs.keys.base import KeyRef, Wrapped
from vcfs.keys.keystore import keystore_path
from vcfs.keys.recipient import IngestOnlyError, IngestProvider, load_public, parse_public
from vcfs.keys.setup import HostKeyOptions, open_provider
from vcfs.offline import open_store

DATA = bytes(range(256)) * 700  # 179200 bytes: three blocks


def _new_recipient(store: Path, out: Path, action: str = "new") -> Path:
    run_vcfs("keys", "recipient", action, str(store), "default", "--out", str(out))
    return out


def _keystore(store: Path) -> dict[str, object]:
    return tomllib.loads(keystore_path(load_config(store).store_id, None).read_text())


def _backing_path(store: Path, name: str) -> Path:
    """Where a file called ``name`` in the root lives in the store (names are encrypted)."""
    offline = open_store(store, HostKeyOptions())
    try:
        tree = os.fsencode(offline.tree)
        return offline.tree / os.fsdecode(offline.names.entry(offline.names.dir_key(tree, b"/"), name.encode()).entry)
    finally:
        offline.close()


def _ingest_file(store: Path, pub: Path, name: str = "rec.bin", data: bytes = DATA, synced: bool = False) -> Path:
    """A backing file as an ingest mount writes it: DEK wrapped to the recipient, no HSM.

    ``synced``: fsync before the close, as a recorder does; only then does the close write the
    exact seal count into the second slot (a never-synced small file keeps its first one)."""
    provider = IngestProvider([load_public(pub)])
    path = _backing_path(store, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    ref = provider.current("default")
    cf = create_cryptfile(fd, name, lambda dek: provider.wrap(ref, dek))
    cf.write(0, data)
    if synced:
        cf.fsync()
    cf.close()
    return path


@pytest.fixture
def recipient(store: Path, tmp_path: Path) -> Path:
    return _new_recipient(store, tmp_path / "rec.pub")


def _read(store: Path, path: Path) -> bytes:
    provider = open_provider(load_config(store), HostKeyOptions())
    try:
        fd = os.open(path, os.O_RDONLY)
        cf = open_cryptfile(fd, str(path), provider.unwrap)
        try:
            return cf.read(0, cf.size)
        finally:
            cf.close()
    finally:
        provider.close()


# ---- recipient keys in the store -------------------------------------------------------------


def test_recipient_new_stores_only_a_wrapped_seed(store: Path, recipient: Path) -> None:
    pub = load_public(recipient)
    cfg = load_config(store)
    assert cfg.features["recipients"] is True
    entry = cfg.domains["default"].recipients[0]
    assert (entry.version, entry.fingerprint, cfg.domains["default"].recipient_current) == (1, pub.fingerprint, 1)
    ks = _keystore(store)
    assert ks["format"] == 2  # a vcfs that knows only format 1 refuses it rather than dropping the seeds
    seed = ks["domains"]["default"]["recipient"][0]  # type: ignore[index]
    assert seed["kek_version"] == 1 and len(bytes.fromhex(seed["seed"])) == 40  # RFC 5649 of 32 bytes
    # The seed in the clear: unwrapped through the HSM it expands to the published public key.
    provider = open_provider(cfg, HostKeyOptions())
    try:
        clear = provider.unwrap(Wrapped(KeyRef("default", 1), WRAP_PKCS11_AES_KWP, bytes.fromhex(seed["seed"])))
    finally:
        provider.close()
    assert xwing.expand(clear).public == pub.public
    assert b"seed" not in (store / "vcfs.conf").read_bytes()  # nothing of the private key inside the store
    for where in (store, keystore_path(cfg.store_id, None).parent):
        for path in where.rglob("*"):
            if path.is_file():
                blob = path.read_bytes()
                assert bytes(clear) not in blob and bytes(clear).hex().encode() not in blob, path


def test_public_file_is_checked(store: Path, recipient: Path, tmp_path: Path) -> None:
    text = recipient.read_text()
    fp = load_public(recipient).fingerprint.hex()
    with pytest.raises(ConfigError, match="fingerprint does not match the key"):
        parse_public(text.replace(fp, "00" * 16), "edited.pub")
    with pytest.raises(ConfigError, match="not a vcfs recipient public key"):
        parse_public("kind = 'x'\n", "other.pub")
    other = tmp_path / "other-store"
    run_vcfs("init", str(other))
    with pytest.raises(ConfigError, match="belongs to store"):
        check_recipient(load_public(recipient), load_config(other), recipient)


def test_new_refuses_a_second_and_rotate_makes_the_next_current(store: Path, recipient: Path, tmp_path: Path) -> None:
    res = run_vcfs("keys", "recipient", "new", str(store), "default", "--out", str(tmp_path / "x.pub"), check=False)
    assert res.returncode == 2 and "already has recipient default/r1" in res.stderr
    r2 = _new_recipient(store, tmp_path / "r2.pub", "rotate")
    assert load_public(r2).version == 2 and load_config(store).domains["default"].recipient_current == 2
    exported = tmp_path / "again.pub"
    run_vcfs("keys", "recipient", "export", str(store), "default", "1", "--out", str(exported))
    assert load_public(exported) == load_public(recipient)
    rows = json.loads(run_vcfs("keys", "list", str(store), "--json").stdout)
    mine = {r["version"]: r for r in rows if r["tier"] == "recipient"}
    assert mine[1]["current"] is False and mine[2]["current"] is True and mine[2]["kek"] == 1


def test_trusted_side_reads_ingest_files_and_rewrap_keeps_seeds_readable(
    store: Path, recipient: Path, tmp_path: Path
) -> None:
    path = _ingest_file(store, recipient)
    header = parse_header(path.read_bytes()[:HEADER_LEN])
    slot = header.candidates()[0][1]
    assert (slot.wrap_alg, slot.kek_version, len(slot.wrapped)) == (WRAP_XWING_KWP, 1, kemwrap.BLOB_LEN)
    assert _read(store, path) == DATA
    run_vcfs("keys", "rotate", str(store), "default")
    # KEK v1 still wraps the seed (and the names key): destroying it is refused, even with --force
    res = run_vcfs("keys", "destroy", str(store), "default", "1", "--force", check=False)
    assert res.returncode == 2 and "still wraps" in res.stderr
    report = json.loads(run_vcfs("keys", "rewrap", str(store), "--json").stdout)
    assert report["recipient_keys_rewrapped"] == ["default/r1"] and report["ingest"] == 1
    assert _keystore(store)["domains"]["default"]["recipient"][0]["kek_version"] == 2  # type: ignore[index]
    assert parse_header(path.read_bytes()[:HEADER_LEN]).candidates()[0][1].wrap_alg == WRAP_XWING_KWP  # not adopted
    run_vcfs("keys", "destroy", str(store), "default", "1")
    assert _read(store, path) == DATA  # the seed moved to KEK v2 with the rewrap
    run_vcfs("decrypt", str(path), str(tmp_path / "out.bin"))
    assert (tmp_path / "out.bin").read_bytes() == DATA
    run_vcfs("export", str(store), str(tmp_path / "export"))
    assert (tmp_path / "export" / "rec.bin").read_bytes() == DATA
    assert json.loads(run_vcfs("fsck", str(store), "--json").stdout)["problems"] == []


def test_adopt_offline_moves_the_file_under_the_kek_and_erases_the_recipient_slot(store: Path, recipient: Path) -> None:
    path = _ingest_file(store, recipient)
    before = path.read_bytes()
    report = json.loads(run_vcfs("keys", "adopt", str(store), "--json").stdout)
    assert (report["rewrapped"], report["exit_code"]) == (1, 0)
    after = path.read_bytes()
    assert after[HEADER_LEN:] == before[HEADER_LEN:]  # header only
    header = parse_header(after[:HEADER_LEN])
    (index, slot), *others = header.candidates()
    assert (slot.wrap_alg, slot.kek_version) == (WRAP_PKCS11_AES_KWP, 1) and not others
    assert after[slot_offset(1 - index) : slot_offset(1 - index) + 2016] == bytes(2016)  # recipient's slot erased
    assert _read(store, path) == DATA
    again = json.loads(run_vcfs("keys", "adopt", str(store), "--json").stdout)
    assert (again["rewrapped"], again["already"]) == (0, 1)  # resumable: a rerun does nothing
    # now the KEK lifecycle applies: the recipient can go without shredding the file
    run_vcfs("keys", "recipient", "rotate", str(store), "default", "--out", str(recipient.with_name("r2.pub")))
    run_vcfs("keys", "recipient", "destroy", str(store), "default", "1")
    assert _read(store, path) == DATA


def test_destroy_recipient_shreds_what_is_still_wrapped_to_it(store: Path, recipient: Path, tmp_path: Path) -> None:
    path = _ingest_file(store, recipient)
    res = run_vcfs("keys", "recipient", "destroy", str(store), "default", "1", check=False)
    assert res.returncode == 2 and "is current" in res.stderr
    _new_recipient(store, tmp_path / "r2.pub", "rotate")
    res = run_vcfs("keys", "recipient", "destroy", str(store), "default", "1", check=False)
    assert res.returncode == 2 and "1 files are still wrapped to recipient default/r1" in res.stderr
    out = run_vcfs("keys", "recipient", "destroy", str(store), "default", "1", "--force").stdout
    assert "1 files wrapped to it are now unreadable" in out
    seed = _keystore(store)["domains"]["default"]["recipient"][0]  # type: ignore[index]
    assert (seed["state"], seed["seed"]) == ("destroyed", "")
    with pytest.raises(KeyDestroyedError, match=r"recipient default/r1 was destroyed \(crypto-shredded\)"):
        _read(store, path)
    res = run_vcfs("decrypt", str(path), str(tmp_path / "out"), check=False)
    assert res.returncode == 4 and "crypto-shredded" in res.stderr and not (tmp_path / "out").exists()
    # an ingest host still given r1's public file is refused: its new files would be unreadable
    with pytest.raises(KeyDestroyedError, match="was destroyed in this store"):
        open_ingest_provider(load_config(store), (recipient,))


# ---- tampering ------------------------------------------------------------------------------


@pytest.fixture
def ingest_file(store: Path, recipient: Path) -> Iterator[Path]:
    yield _ingest_file(store, recipient)


@pytest.fixture(scope="module")
def tamper_base(vcfs_home: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One store with one ingest-wrapped file; each tamper test works on a copy (same keystore)."""
    base = tmp_path_factory.mktemp("tamper")
    store = base / "backing"
    run_vcfs("init", str(store))
    path = _ingest_file(store, _new_recipient(store, base / "rec.pub"), synced=True)  # both slots written
    return store, path.relative_to(store)


BLOB = 25 + len("default")  # where a slot's wrapped blob starts: fingerprint (16), KEM ct (1120), wrap (40)


def _flip(path: Path, offsets: list[int], value: int | None = None) -> None:
    raw = bytearray(path.read_bytes())
    for off in offsets:
        raw[off] = raw[off] ^ 0x01 if value is None else value
    path.write_bytes(raw)


def _in_both_slots(rel: int) -> list[int]:
    """A slot field in both slots: the close after a sync wrote the exact seal count into the second one, and a
    reader that finds one slot damaged rightly falls back to the other (same DEK, same wrapping)."""
    return [slot_offset(0) + rel, slot_offset(1) + rel]


@pytest.mark.parametrize(
    ("offsets", "error", "message"),
    [
        (_in_both_slots(BLOB + 3), HeaderAuthError, "wrapped to another recipient key"),  # recipient fingerprint
        (_in_both_slots(BLOB + 16 + 500), HeaderAuthError, "KEM ciphertext or wrapped key was modified"),  # ML-KEM
        (_in_both_slots(BLOB + 16 + 1100), HeaderAuthError, "KEM ciphertext or wrapped key was modified"),  # X25519
        (_in_both_slots(BLOB + 16 + 1125), HeaderAuthError, "KEM ciphertext or wrapped key was modified"),  # RFC 5649
        (_in_both_slots(13), KeyProviderError, "recipient default/r0 is not known"),  # recipient id 1 -> 0
        ([20], HeaderAuthError, "key commitment mismatch"),  # file id in the preamble
        (_in_both_slots(16), HeaderAuthError, "slot MAC mismatch"),  # seal count
        (_in_both_slots(1990), HeaderAuthError, "slot MAC mismatch"),  # the MAC itself
    ],
)
def test_tampered_ingest_header_fails_with_a_named_error(
    tamper_base: tuple[Path, Path], tmp_path: Path, offsets: list[int], error: type[Exception], message: str
) -> None:
    store = tmp_path / "backing"
    shutil.copytree(tamper_base[0], store)
    ingest_file = store / tamper_base[1]
    assert _read(store, ingest_file) == DATA
    assert all(s is not None for s in parse_header(ingest_file.read_bytes()[:HEADER_LEN]).slots)
    _flip(ingest_file, offsets)
    with pytest.raises(error, match=message):
        _read(store, ingest_file)


def test_recipient_id_pointing_at_another_recipient_fails_authentication(
    store: Path, ingest_file: Path, tmp_path: Path
) -> None:
    _new_recipient(store, tmp_path / "r2.pub", "rotate")
    _flip(ingest_file, _in_both_slots(13), 2)  # recipient 1 -> 2, which exists
    with pytest.raises(HeaderAuthError, match="fingerprint mismatch"):
        _read(store, ingest_file)
    res = run_vcfs("decrypt", str(ingest_file), "-", check=False)
    assert res.returncode == 7 and "vcfs: error:" in res.stderr and "Traceback" not in res.stderr


def test_keystore_seed_of_another_recipient_is_refused(store: Path, recipient: Path, tmp_path: Path) -> None:
    """A keystore whose seed is not the recipient the config names (swapped or restored from elsewhere)."""
    path = _ingest_file(store, recipient)
    _new_recipient(store, tmp_path / "r2.pub", "rotate")
    ks_path = keystore_path(load_config(store).store_id, None)
    text = ks_path.read_text()
    doc = tomllib.loads(text)
    seeds = doc["domains"]["default"]["recipient"]
    ks_path.write_text(text.replace(seeds[0]["seed"], seeds[1]["seed"]))  # r1's entry now holds r2's seed
    with pytest.raises(KeyProviderError, match="not the key the store names"):
        _read(store, path)


# ---- ingest-side pieces ---------------------------------------------------------------------


def test_ingest_keys_never_unwrap_and_cache_nothing(store: Path, recipient: Path) -> None:
    provider = open_ingest_provider(load_config(store), (recipient,))
    keys = IngestKeys(store, provider)
    path = _backing_path(store, "new.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    cf = create_cryptfile(fd, "new.bin", keys.wrap_for("default"))
    keys.opened(cf)
    cf.write(0, b"recording")
    cf.close()
    keys.closed(cf.opened_with)
    assert len(keys.cache) == 0
    with pytest.raises(IngestOnlyError, match="cannot be opened again once the file was closed") as exc:
        keys.unwrap(cf.opened_with)
    assert exc.value.errno == 13  # EACCES through the mount
    assert _read(store, path) == b"recording"


def test_names_file_is_a_checked_secret(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "names.key"
    run_vcfs("keys", "recipient", "names", str(store), "--out", str(out))
    assert out.stat().st_mode & 0o777 == 0o600
    cfg = load_config(store)
    assert set(read_names_file(out, cfg)) == {"default"}
    out.chmod(0o644)
    with pytest.raises(KeyProviderError, match="readable by group or others"):
        read_names_file(out, cfg)
    out.chmod(0o600)
    other = tmp_path / "other"
    run_vcfs("init", str(other))
    with pytest.raises(ConfigError, match="belongs to store"):
        read_names_file(out, load_config(other))
    plain = tmp_path / "plain"
    run_vcfs("init", str(plain), "--plain-names")
    res = run_vcfs("keys", "recipient", "names", str(plain), "--out", str(tmp_path / "n2"), check=False)
    assert res.returncode == 2 and "plain names" in res.stderr
