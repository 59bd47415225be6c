"""Ingest (write-only) mounts for real: ffmpeg records into a mount that has no HSM at all, a
trusted mount reads the recording back, and ``vcfs keys adopt`` moves files under the KEK while
a trusted mount reads them.

The ingest daemon runs with ``VCFS_HOME`` pointing at an empty directory and ``SOFTHSM2_CONF``
at a file that does not exist, so no token is reachable from it; that it never loaded the
PKCS#11 module is checked in its memory map.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from audit_helpers import lines, verify
from conftest import VCFS, Mounted, force_unmount, is_mounted, require, run_vcfs
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from test_mount_clients import _ffmpeg_record, _require_ffmpeg

from vcfs.config import load_config
from vcfs.core import xwing
from vcfs.core.header import WRAP_PKCS11_AES_KWP, WRAP_XWING_KWP, parse_header, slot_offset
from vcfs.core.layout import HEADER_LEN
from vcfs.ingestnames import read_names_file
from vcfs.keys.base import KeyRef, Wrapped
from vcfs.keys.keystore import keystore_path, load_keystore
from vcfs.keys.setup import HostKeyOptions, open_provider

pytestmark = pytest.mark.mount


@dataclass
class Ingest:
    """An ingest host: its own empty VCFS_HOME, no way to any token, a recipient and a names-key file."""

    backing: Path
    mnt: Path
    home: Path
    pub: Path
    names: Path | None
    audit: Path

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VCFS_HSM_PIN", "CREDENTIALS_DIRECTORY"))}
        env["VCFS_HOME"] = str(self.home)
        env["SOFTHSM2_CONF"] = str(self.home / "no-such-softhsm2.conf")
        return env

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([*VCFS, *args], capture_output=True, text=True, timeout=120, env=self.env)
        if check and res.returncode != 0:
            raise AssertionError(f"vcfs {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def mount(self, *extra: str) -> None:
        names = ["--ingest-names", str(self.names)] if self.names else []
        self.run("mount", "--ingest", str(self.pub), *names, *extra, str(self.backing), str(self.mnt))

    def umount(self) -> None:
        self.run("umount", str(self.mnt))

    def log(self) -> str:
        return "".join(p.read_text() for p in (self.home / "logs").glob("*.log"))


def _make_ingest(store: Path, tmp_path: Path) -> Ingest:
    require(os.path.exists("/dev/fuse"), "/dev/fuse")
    etc = tmp_path / "etc"  # what is copied to the ingest host: outside its VCFS_HOME and the store
    etc.mkdir()
    run_vcfs("keys", "recipient", "new", str(store), "default", "--out", str(etc / "recorder.pub"))
    names = None
    if load_config(store).encrypted_names:
        names = etc / "names.key"
        run_vcfs("keys", "recipient", "names", str(store), "--out", str(names))
    (tmp_path / "ingest-mnt").mkdir()
    return Ingest(
        store, tmp_path / "ingest-mnt", tmp_path / "ingest-home", etc / "recorder.pub", names, tmp_path / "audit"
    )


@pytest.fixture
def ingest(store: Path, tmp_path: Path) -> Iterator[Ingest]:
    host = _make_ingest(store, tmp_path)
    try:
        yield host
    finally:
        if is_mounted(host.mnt):
            force_unmount(host.mnt)


def _daemon_maps(backing: Path) -> str:
    pid = int((backing / "vcfs.lock").read_text().split()[0])
    return Path(f"/proc/{pid}/maps").read_text()


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def _secrets_of(store: Path, backing_file: Path, names_file: Path | None) -> dict[str, bytes]:
    """Every secret a trusted host can learn about one ingest-wrapped file (for the scan below)."""
    cfg = load_config(store)
    ks = load_keystore(keystore_path(cfg.store_id, None), cfg.store_id)
    seed_entry = ks.domains["default"].recipients[1]
    header = parse_header(backing_file.read_bytes()[:HEADER_LEN])
    slot = header.candidates()[0][1]
    assert slot.wrap_alg == WRAP_XWING_KWP
    provider = open_provider(cfg, HostKeyOptions())
    try:
        kek = KeyRef("default", seed_entry.kek_version)
        seed = bytes(provider.unwrap(Wrapped(kek, WRAP_PKCS11_AES_KWP, seed_entry.blob)))
        dek = bytes(provider.unwrap(Wrapped(KeyRef("default", 1), WRAP_XWING_KWP, slot.wrapped)))
    finally:
        provider.close()
    expanded = hashlib.shake_256(seed).digest(96)
    fp, ct = slot.wrapped[:16], slot.wrapped[16:1136]
    shared = xwing.decapsulate(xwing.expand(seed), ct)
    file_id = header.preamble.file_id
    found = {
        "recipient seed": seed,
        "ML-KEM seed d||z": expanded[:64],
        "X25519 private key": expanded[64:96],
        "X-Wing shared secret": shared,
        "DEK wrapping key": _hkdf(shared, fp, b"vcfs v1 xwing dek wrap"),
        "DEK": dek,
        "content key": _hkdf(dek, file_id, b"vcfs v1 content key"),
        "header MAC key": _hkdf(dek, file_id, b"vcfs v1 header mac key"),
    }
    if names_file is not None:
        found["names secret"] = read_names_file(names_file, cfg)["default"]
    return found


def _scan(roots: list[Path], needles: dict[str, bytes]) -> list[str]:
    """Where any of ``needles`` appears (raw, hex or base64) in a file under ``roots``."""
    forms = {
        name: [v, v.hex().encode(), v.hex().upper().encode(), base64.b64encode(v), base64.urlsafe_b64encode(v)]
        for name, v in needles.items()
    }
    hits = []
    for root in roots:
        for path in [root, *root.rglob("*")] if root.exists() else []:
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                hits += [f"{name} in {path}" for name, fs in forms.items() if any(f in data for f in fs)]
    return hits


def test_ingest_mount_records_with_no_hsm_and_a_trusted_mount_reads_it(
    store: Path, ingest: Ingest, tmp_path: Path
) -> None:
    _require_ffmpeg()
    plain = tmp_path / "plain"
    plain.mkdir()
    _ffmpeg_record(plain / "call.mp4", faststart=True)
    want = (plain / "call.mp4").read_bytes()

    ingest.mount("--audit-dir", str(ingest.audit))
    try:
        maps = _daemon_maps(store)
        assert "python" in maps and "softhsm" not in maps  # no PKCS#11 module was loaded
        (ingest.mnt / "rec").mkdir()
        # +faststart: ffmpeg reopens its output for reading while it still holds it open for writing
        _ffmpeg_record(ingest.mnt / "rec" / "call.mp4", faststart=True)
        assert os.listdir(ingest.mnt / "rec") == ["call.mp4"]  # list and stat work
        assert os.stat(ingest.mnt / "rec" / "call.mp4").st_size == len(want)
        with pytest.raises(PermissionError) as exc:  # closed: its DEK is gone from this host
            (ingest.mnt / "rec" / "call.mp4").read_bytes()
        assert exc.value.errno == errno.EACCES
        with pytest.raises(PermissionError), open(ingest.mnt / "rec" / "call.mp4", "r+b"):
            pass
        with open(ingest.mnt / "rec" / "live.bin", "w+b") as f:  # while open: written, read back, rewritten
            f.write(b"a" * 100_000)
            f.seek(10)
            f.write(b"b")
            f.seek(0)
            assert f.read(12) == b"a" * 10 + b"ba"
    finally:
        ingest.umount()
    assert "this is an ingest-only mount: a file's key cannot be opened again" in ingest.log()
    refused = [r for _p, _i, r in lines(ingest.audit) if r.get("event") == "fs.session" and r.get("result") == "EACCES"]
    assert {r["path"] for r in refused} == {"/rec/call.mp4"}
    assert verify(ingest.audit, "--no-hsm")[0] == 0
    res = run_vcfs("audit", "verify", str(ingest.audit), check=False)  # asks for the HSM: says why not
    assert res.returncode == 2 and "--no-hsm" in res.stderr

    trusted = Mounted(store, tmp_path / "mnt")
    trusted.mnt.mkdir()
    trusted.mount()
    try:
        assert (trusted.mnt / "rec" / "call.mp4").read_bytes() == want  # byte-identical to the plain recording
        assert (trusted.mnt / "rec" / "live.bin").read_bytes() == b"a" * 10 + b"b" + b"a" * 99_989
        backing = trusted.backing_of("/rec/call.mp4")
    finally:
        trusted.umount()
    assert run_vcfs("fsck", str(store)).returncode == 0

    # Nothing the ingest host or the store holds can decrypt the recording: no private key material, no
    # DEK, no key derived from either, anywhere under the ingest host's VCFS_HOME, the store or the audit log.
    needles = _secrets_of(store, backing, ingest.names)
    assert _scan([ingest.home, store, ingest.audit], needles) == []
    assert _scan([ingest.names], needles) == (["names secret in " + str(ingest.names)] if ingest.names else [])


def test_adopt_while_a_trusted_mount_reads(store: Path, ingest: Ingest, tmp_path: Path) -> None:
    contents = {f"cam/f{i}.bin": hashlib.sha256(b"%d" % i).digest() * (4000 + 3000 * i) for i in range(4)}
    ingest.mount()
    try:
        (ingest.mnt / "cam").mkdir()
        for rel, data in contents.items():
            (ingest.mnt / rel).write_bytes(data)
    finally:
        ingest.umount()
    trusted = Mounted(store, tmp_path / "mnt")
    trusted.mnt.mkdir()
    trusted.mount()
    try:
        backing = {rel: trusted.backing_of("/" + rel) for rel in contents}
        blocks = {rel: path.read_bytes()[HEADER_LEN:] for rel, path in backing.items()}
        stop = threading.Event()
        errors: list[str] = []
        reads = [0]

        def reader() -> None:
            while not stop.is_set():
                for rel in list(contents)[1:]:
                    try:
                        if (trusted.mnt / rel).read_bytes() != contents[rel]:
                            errors.append(f"{rel}: wrong bytes")
                    except OSError as exc:
                        errors.append(f"{rel}: {exc}")
                    reads[0] += 1

        held = open(trusted.mnt / "cam" / "f0.bin", "rb")  # noqa: SIM115 (open in the mount: adopt must skip it)
        thread = threading.Thread(target=reader)
        thread.start()
        try:
            assert held.read(1000) == contents["cam/f0.bin"][:1000]
            first = run_vcfs("keys", "adopt", str(store), "/cam", "--json", check=False)
            report = json.loads(first.stdout)
            assert first.returncode == 1 and "cam/f0.bin" in report["busy"], report
            assert held.read() == contents["cam/f0.bin"][1000:]
            held.close()
            adopted = report["rewrapped"]
            for _ in range(50):  # the reader may hold another file open at the moment adopt reaches it
                again = json.loads(run_vcfs("keys", "adopt", str(store), "/cam", "--json", check=False).stdout)
                adopted += again["rewrapped"]
                if again["exit_code"] == 0:
                    break
            assert again["exit_code"] == 0 and again["failed"] == [] and adopted == 4, again
        finally:
            if not held.closed:
                held.close()
            stop.set()
            thread.join()
        assert errors == [] and reads[0] > 0
        for rel, path in backing.items():
            raw = path.read_bytes()
            assert raw[HEADER_LEN:] == blocks[rel], rel  # the data blocks were not rewritten
            header = parse_header(raw[:HEADER_LEN])
            (index, slot), *rest = header.candidates()
            assert (slot.wrap_alg, slot.domain, slot.kek_version) == (WRAP_PKCS11_AES_KWP, "default", 1) and not rest
            assert raw[slot_offset(1 - index) : slot_offset(1 - index) + 2016] == bytes(2016)
            assert (trusted.mnt / rel).read_bytes() == contents[rel]
    finally:
        trusted.umount()
    rows = json.loads(run_vcfs("keys", "list", str(store), "--json").stdout)
    assert [r["files"] for r in rows if r["tier"] == "recipient"] == [0]
    assert [r["files"] for r in rows if r["tier"] == "kek"] == [4]


def test_ingest_mount_refuses_what_it_cannot_do_safely(store: Path, ingest: Ingest, tmp_path: Path) -> None:
    names, ingest.names = ingest.names, None
    res = ingest.run("mount", "--ingest", str(ingest.pub), str(store), str(ingest.mnt), check=False)
    assert res.returncode == 2 and "needs its names keys (--ingest-names FILE)" in res.stderr
    ingest.names = names
    pin = tmp_path / "pin"
    pin.write_text("1234")
    pin.chmod(0o600)
    res = ingest.run(
        "mount", "--ingest", str(ingest.pub), "--pin-file", str(pin), str(store), str(ingest.mnt), check=False
    )
    assert res.returncode == 2 and "uses no HSM" in res.stderr
    other = tmp_path / "other"
    run_vcfs("init", str(other), "--plain-names")
    res = ingest.run("mount", "--ingest", str(ingest.pub), str(other), str(ingest.mnt), check=False)
    assert res.returncode == 3 and "belongs to store" in res.stderr
    assert not is_mounted(ingest.mnt)


def test_destroyed_recipient_stops_new_files_on_a_running_ingest_mount(vcfs_home: Path, tmp_path: Path) -> None:
    store = tmp_path / "backing"
    run_vcfs("init", str(store), "--plain-names")  # plain names: the ingest host needs no names-key file
    host = _make_ingest(store, tmp_path)
    assert host.names is None
    host.mount()
    try:
        (host.mnt / "first.bin").write_bytes(b"first")
        run_vcfs("keys", "recipient", "rotate", str(store), "default", "--out", str(tmp_path / "r2.pub"))
        (host.mnt / "second.bin").write_bytes(b"second")  # rotated: this host still has r1's file, which is fine
        run_vcfs("keys", "recipient", "destroy", str(store), "default", "1", "--force")
        with pytest.raises(OSError) as exc:  # a new file for r1 would be unreadable at once
            (host.mnt / "third.bin").write_bytes(b"third")
        assert exc.value.errno == errno.EKEYREVOKED
    finally:
        if is_mounted(host.mnt):
            host.umount()
    assert "recipient default/r1 was destroyed in this store" in host.log()
