"""Encrypted names through a real mount: nothing readable at rest, long names, tampering, tools.

Stores made by ``vcfs init`` encrypt names, so every mounted test in the suite already runs
with encrypted names; these tests look at what the backing store holds and at what happens
when someone moves names, directory ids or sidecars around in it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import Mounted, run_vcfs
from test_names_vector import ind_decode_target, ind_list_dir, ind_names_key

from vcfs.config import load_config
from vcfs.keys.setup import HostKeyOptions, open_provider
from vcfs.namekeys import unwrap_names_secret

pytestmark = pytest.mark.mount

# Distinctive names: what a recording platform's names leak (ids, customers, dates, people).
NAMES = [
    "call_uid4711_acme-layoffs_2026-11-28.mp4",
    "Überstunden-Besprechung_Geschäftsführung.mkv",
    "会议记录_董事会_机密.wav",
    "🎥zoom-recording-🔥-Q3-forecast.webm",
    "customer-HOOLI-merger-talks",
    "x" * 100 + "-SECRETPROJECT-" + "y" * 140,  # 255 bytes: a long name
    "é" * 120 + "LONGUNICODE",  # 251 bytes
]
TARGET = "../customer-HOOLI-merger-talks/call_uid4711_acme-layoffs_2026-11-28.mp4"


def _fragments(name: str) -> set[bytes]:
    """The whole name, each token of 6+ bytes, and 12-byte windows all along it.

    Shorter fragments would turn up in random base64 names by chance (a 4-letter word, any
    case, about once per 10^6 characters); 6 bytes exact and 8 in any case are safe.
    """
    raw = name.encode()
    out = {raw} | {t.encode() for t in name.replace("-", "_").replace(".", "_").split("_") if len(t.encode()) >= 6}
    out |= {raw[i : i + 12] for i in range(0, max(1, len(raw) - 11), 3)}
    return {f for f in out if len(set(f)) > 2}  # skip runs like "xxxxxx"


def _all_backing_bytes(backing: Path) -> list[tuple[str, bytes]]:
    """(where, bytes) of every name, symlink target, file content and xattr in the backing store."""
    out: list[tuple[str, bytes]] = []
    for dirpath, dirnames, filenames in os.walk(os.fsencode(backing)):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            out.append((f"name {path!r}", name))
            if os.path.islink(path):
                out.append((f"target {path!r}", os.readlink(path)))
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    out.append((f"content {path!r}", f.read()))
            for attr in os.listxattr(path, follow_symlinks=False):
                out.append((f"xattr {path!r}", attr.encode() + os.getxattr(path, attr, follow_symlinks=False)))
    return out


def _populate(m: Path) -> None:
    (m / NAMES[4]).mkdir()
    (m / NAMES[4] / NAMES[0]).write_bytes(b"recording 0")
    for i, name in enumerate(NAMES[1:], 1):
        if i != 4:
            (m / NAMES[4] / name).write_bytes(f"recording {i}".encode())
    (m / NAMES[5]).mkdir()
    (m / NAMES[5] / NAMES[6]).write_bytes(b"deep")
    os.symlink(TARGET, m / NAMES[5] / "latest")
    os.symlink(NAMES[6], m / NAMES[1])  # a symlink whose name and target are both distinctive
    os.link(m / NAMES[4] / NAMES[0], m / NAMES[5] / NAMES[2])
    os.rename(m / NAMES[4] / NAMES[3], m / NAMES[5] / NAMES[3])


def test_no_name_fragment_anywhere_in_the_backing_store(mounted: Mounted) -> None:
    m = mounted.mnt
    _populate(m)
    with pytest.raises(OSError) as info:
        os.setxattr(m / NAMES[4] / NAMES[0], "user.customer", b"HOOLI-secret-xattr")
    assert info.value.errno == errno.EOPNOTSUPP  # xattrs are refused: nothing to leak
    mounted.umount()
    fragments = set().union(*(_fragments(n) for n in [*NAMES, TARGET]), {b"HOOLI-secret-xattr", b"latest"})
    scanned = _all_backing_bytes(mounted.backing)
    assert sum(1 for where, _ in scanned if where.startswith("target")) == 2
    for where, data in scanned:
        for frag in fragments:
            assert frag not in data, f"{frag!r} in {where}"
            if frag.isascii() and len(frag) >= 8:
                assert frag.lower() not in data.lower(), f"{frag!r} (any case) in {where}"
    mounted.mount()
    assert sorted(os.listdir(m)) == sorted([NAMES[1], NAMES[4], NAMES[5]])
    assert (m / NAMES[5] / NAMES[2]).read_bytes() == b"recording 0"
    assert os.readlink(m / NAMES[5] / "latest") == TARGET
    assert os.lstat(m / NAMES[5] / "latest").st_size == len(TARGET)
    assert (m / NAMES[5] / NAMES[3]).read_bytes() == b"recording 3"


def test_xattrs_are_refused_and_none_reach_the_backing_store(mounted: Mounted) -> None:
    f = mounted.mnt / "rec.mp4"
    f.write_bytes(b"x")
    calls = [
        lambda: os.setxattr(f, "user.note", b"v"),
        lambda: os.getxattr(f, "user.note"),
        lambda: os.listxattr(f),
        lambda: os.removexattr(f, "user.note"),
    ]
    for call in calls:
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EOPNOTSUPP
    assert [a for a in os.listxattr(mounted.backing_of("rec.mp4")) if a.startswith("user.")] == []


def _renameat2(old: Path, new: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), ctypes.c_uint(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _fsck(m: Mounted, *extra: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    res = run_vcfs("fsck", str(m.backing), "--json", *extra, check=False)
    assert "Traceback" not in res.stderr
    return res.returncode, json.loads(res.stdout)


def test_long_names_through_every_operation(mounted: Mounted) -> None:
    m = mounted.mnt
    long_a, long_b, long_dir = "a" * 255, "b" * 200, "D" * 255
    (m / long_dir).mkdir()
    (m / long_dir / long_a).write_bytes(b"A")
    (m / "short").write_bytes(b"S")
    os.link(m / long_dir / long_a, m / long_b)  # a hard link with another long name
    os.symlink("t" * 3000, m / long_dir / "link")
    os.mkfifo(m / ("f" * 250))
    assert os.readlink(m / long_dir / "link") == "t" * 3000
    with pytest.raises(OSError) as info:
        os.symlink("t" * 3100, m / "toolong")
    assert info.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError) as info:
        (m / ("n" * 256)).write_bytes(b"")
    assert info.value.errno == errno.ENAMETOOLONG
    # long <-> short across directories, exchange, noreplace
    long_c = "c" * 230
    os.rename(m / long_dir / long_a, m / "now-short")  # A: long_b, now-short
    os.rename(m / "short", m / long_dir / long_c)  # S: long_dir/long_c
    _renameat2(m / long_b, m / long_dir / long_c, 2)  # RENAME_EXCHANGE of two long names in two directories
    assert (m / long_b).read_bytes() == b"S" and (m / long_dir / long_c).read_bytes() == b"A"
    with pytest.raises(FileExistsError):
        _renameat2(m / "now-short", m / long_dir / long_c, 1)  # RENAME_NOREPLACE
    os.rename(m / long_dir / long_c, m / long_c)  # A: now-short, long_c
    assert sorted(os.listdir(m)) == sorted([long_dir, long_b, "now-short", "f" * 250, long_c])
    assert os.listdir(m / long_dir) == ["link"]
    assert (m / long_c).read_bytes() == b"A" and (m / "now-short").stat().st_nlink == 2
    # renaming a directory over an empty one, then removing what is left
    (m / "empty").mkdir()
    os.rename(m / long_dir, m / "empty")
    assert os.listdir(m / "empty") == ["link"]
    os.unlink(m / "empty" / "link")
    os.rmdir(m / "empty")
    for name in (long_b, "now-short", long_c, "f" * 250):
        os.unlink(m / name)
    assert os.listdir(m) == []
    mounted.umount()
    code, report = _fsck(mounted)
    assert code == 0 and report["problems"] == []
    assert sorted(p.name for p in mounted.tree.iterdir()) == ["vcfs.dirid"]  # no sidecar or leftover remains


def _write_two_dirs(mounted: Mounted) -> tuple[Path, Path, Path]:
    m = mounted.mnt
    (m / "a").mkdir()
    (m / "b").mkdir()
    (m / "a" / "x.mp4").write_bytes(b"xxx")
    (m / "b" / "y.mp4").write_bytes(b"yyy")
    x, a, b = mounted.backing_of("a/x.mp4"), mounted.backing_of("a"), mounted.backing_of("b")
    mounted.umount()
    return x, a, b


@pytest.mark.parametrize("how", ["move", "copy"])
def test_name_moved_or_copied_to_another_directory_is_skipped_and_logged(
    mounted: Mounted, vcfs_home: Path, how: str
) -> None:
    x, _a, b = _write_two_dirs(mounted)
    planted = b / x.name
    (shutil.move if how == "move" else shutil.copy2)(x, planted)
    mounted.mount()
    m = mounted.mnt
    assert os.listdir(m / "b") == ["y.mp4"]  # the planted entry does not decrypt in b
    assert not (m / "b" / "x.mp4").exists()
    assert os.listdir(m / "a") == ([] if how == "move" else ["x.mp4"])
    logs = "".join(p.read_text() for p in (vcfs_home / "logs").glob("*.log"))
    assert str(planted) in logs and "does not decrypt in this directory" in logs
    mounted.umount()
    code, report = _fsck(mounted)
    assert code == 2
    names = [p for p in report["problems"] if p["kind"] == "name"]
    assert [p["backing"] for p in names] == [str(planted.relative_to(mounted.tree))]
    res = run_vcfs("fsck", str(mounted.backing), check=False)
    assert str(planted.relative_to(mounted.tree)) in res.stdout  # the text report names the backing path too
    mounted.mount()
    os.unlink(m / "b" / "y.mp4")
    with pytest.raises(OSError) as info:
        os.rmdir(m / "b")  # what does not decrypt is not deleted
    assert info.value.errno == errno.ENOTEMPTY


def test_directory_id_copied_from_another_directory_is_detected(mounted: Mounted, vcfs_home: Path) -> None:
    _x, a, b = _write_two_dirs(mounted)
    original = (b / "vcfs.dirid").read_bytes()
    os.chmod(b / "vcfs.dirid", 0o644)
    shutil.copyfile(a / "vcfs.dirid", b / "vcfs.dirid")
    mounted.mount()
    m = mounted.mnt
    assert os.listdir(m / "b") == []  # y.mp4 does not decrypt under a's id
    assert not (m / "b" / "y.mp4").exists()
    assert "does not decrypt in this directory" in "".join(p.read_text() for p in (vcfs_home / "logs").glob("*.log"))
    mounted.umount()
    code, report = _fsck(mounted)
    assert code == 2 and {p["kind"] for p in report["problems"]} == {"name"}
    (b / "vcfs.dirid").unlink()
    mounted.mount()
    with pytest.raises(OSError) as info:
        os.listdir(m / "b")
    assert info.value.errno == errno.EIO  # a directory without its id file answers EIO
    mounted.umount()
    (b / "vcfs.dirid").write_bytes(original)
    mounted.mount()
    assert (m / "b" / "y.mp4").read_bytes() == b"yyy"


def test_swapped_long_name_sidecars_are_detected(mounted: Mounted) -> None:
    m = mounted.mnt
    one, two = "1" * 200, "2" * 200
    (m / one).write_bytes(b"one")
    (m / two).write_bytes(b"two")
    p1, p2 = mounted.backing_of(one), mounted.backing_of(two)
    mounted.umount()
    s1, s2 = p1.with_suffix(".name"), p2.with_suffix(".name")
    d1, d2 = s1.read_bytes(), s2.read_bytes()
    for s in (s1, s2):
        os.chmod(s, 0o644)
    s1.write_bytes(d2)
    s2.write_bytes(d1)
    mounted.mount()
    assert os.listdir(m) == []
    mounted.umount()
    code, report = _fsck(mounted)
    assert (
        code == 2
        and sorted(p["detail"] for p in report["problems"]) == ["long-name sidecar does not belong to this entry"] * 2
    )


def test_independent_decoder_reads_a_real_store(mounted: Mounted) -> None:
    """The decoder written from FORMAT.md alone lists a store written by the mount."""
    _populate(mounted.mnt)
    want = {}
    for dirpath, dirnames, filenames in os.walk(mounted.mnt):
        for n in dirnames + filenames:
            want[os.path.relpath(os.path.join(dirpath, n), mounted.mnt)] = n
    mounted.umount()
    cfg = load_config(mounted.backing)
    provider = open_provider(cfg, HostKeyOptions())
    try:
        key = ind_names_key(unwrap_names_secret(provider, "default", cfg.names_keys["default"]))
    finally:
        provider.close()
    got: dict[str, str] = {}
    targets: dict[str, str] = {}

    def walk(backing: Path, plain: str) -> None:
        for entry, name in ind_list_dir(key, backing).items():
            path, rel = backing / entry, os.path.join(plain, name)
            got[rel] = name
            if path.is_symlink():
                targets[rel] = ind_decode_target(key, os.fsencode(os.readlink(path))).decode()
            elif path.is_dir():
                walk(path, rel)

    walk(mounted.tree, "")
    assert got == want
    assert targets == {os.path.join(NAMES[5], "latest"): TARGET, NAMES[1]: NAMES[6]}


def test_path_tool_and_decrypt_restore_real_names(mounted: Mounted, tmp_path: Path) -> None:
    m = mounted.mnt
    (m / "2026").mkdir()
    (m / "2026" / NAMES[0]).write_bytes(b"rec")
    (m / "2026" / NAMES[5]).write_bytes(b"long")
    backing = run_vcfs("path", str(mounted.backing), f"2026/{NAMES[5]}").stdout.strip()
    assert Path(backing).exists() and backing.endswith(".long") and "SECRETPROJECT" not in backing
    assert run_vcfs("path", str(mounted.backing), "--backing", backing).stdout.strip() == f"/2026/{NAMES[5]}"
    res = json.loads(run_vcfs("path", str(mounted.backing), f"/2026/{NAMES[0]}", "--json").stdout)
    assert res["plain"] == f"/2026/{NAMES[0]}" and Path(res["backing"]) == mounted.backing_of(f"2026/{NAMES[0]}")
    res = run_vcfs("path", str(mounted.backing), "/2026/missing.mp4", check=False)
    assert res.returncode == 2 and "/2026/missing.mp4 does not exist" in res.stderr
    res = run_vcfs("path", str(mounted.backing), "--backing", str(mounted.tree / "vcfs.dirid"), check=False)
    assert res.returncode == 2 and "vcfs's own file" in res.stderr and "Traceback" not in res.stderr
    res = run_vcfs("path", str(mounted.backing), check=False)
    assert res.returncode == 2 and "either a plaintext PATH or --backing" in res.stderr
    out = tmp_path / "out"
    out.mkdir()
    run_vcfs("decrypt", str(mounted.backing_of(f"2026/{NAMES[5]}")), str(out))
    assert (out / NAMES[5]).read_bytes() == b"long"  # into a directory: under its real name


def test_rewrap_moves_the_names_key_to_the_current_kek(mounted: Mounted) -> None:
    (mounted.mnt / NAMES[0]).write_bytes(b"r")
    run_vcfs("keys", "rotate", str(mounted.backing), "default")
    assert load_config(mounted.backing).names_keys["default"].kek_version == 1
    res = json.loads(run_vcfs("keys", "rewrap", str(mounted.backing), "--json").stdout)
    assert res["names_key_rewrapped"] == ["default"] and res["rewrapped"] == 1
    assert load_config(mounted.backing).names_keys["default"].kek_version == 2
    assert os.listdir(mounted.mnt) == [NAMES[0]]  # the running mount keeps its names
    run_vcfs("keys", "destroy", str(mounted.backing), "default", "1")
    mounted.umount()
    mounted.mount()
    assert (mounted.mnt / NAMES[0]).read_bytes() == b"r"


def test_fsck_repair_removes_leftovers_of_interrupted_operations(mounted: Mounted) -> None:
    (mounted.mnt / "d").mkdir()
    d = mounted.backing_of("d")
    mounted.umount()
    (mounted.tree / "vcfs.tmp.0123456789abcdef").mkdir()  # an rmdir cut short by a crash
    (mounted.tree / "vcfs.tmp.0123456789abcdef" / "vcfs.dirid").write_bytes(os.urandom(16))
    (d / ("A" * 43 + ".name")).write_bytes(os.urandom(200))  # a sidecar whose long entry is gone
    code, report = _fsck(mounted)
    assert code == 2 and [p["kind"] for p in report["problems"]] == ["name", "name"]
    code, report = _fsck(mounted, "--repair")
    assert code == 1 and all(p["repaired"] for p in report["problems"])
    assert _fsck(mounted)[0] == 0
    assert sorted(p.name for p in mounted.tree.iterdir()) == sorted(["vcfs.dirid", d.name])


def test_missing_names_key_or_root_id_is_a_clear_error(mounted: Mounted) -> None:
    mounted.umount()
    conf = mounted.backing / "vcfs.conf"
    text = conf.read_text()
    conf.write_text(text.split("[names]")[0])
    res = run_vcfs("mount", str(mounted.backing), str(mounted.mnt), check=False)
    assert res.returncode == 3 and "store config: missing names" in res.stderr
    wrapped = load_config_text_value(text, "wrapped")
    conf.write_text(text.replace(wrapped, wrapped[:-2] + ("00" if wrapped[-2:] != "00" else "11")))
    res = run_vcfs("mount", str(mounted.backing), str(mounted.mnt), check=False)
    assert res.returncode == 4 and "names key of key domain 'default' does not unwrap" in res.stderr
    conf.write_text(text.replace("encrypted_names = true", "encrypted_names = false"))
    res = run_vcfs("mount", str(mounted.backing), str(mounted.mnt), check=False)
    assert res.returncode == 3 and "holds encrypted names" in res.stderr  # no downgrade to names in the clear
    conf.write_text(text)
    os.unlink(mounted.tree / "vcfs.dirid")
    res = run_vcfs("mount", str(mounted.backing), str(mounted.mnt), check=False)
    assert res.returncode == 7 and "directory has no vcfs.dirid file" in res.stderr and "Traceback" not in res.stderr


def load_config_text_value(text: str, key: str) -> str:
    line = next(line for line in text.splitlines() if line.startswith(f"{key} = "))
    return line.split('"')[1]


def test_plain_names_store_mounts_reads_and_keeps_the_old_layout(vcfs_home: Path, tmp_path: Path) -> None:
    """Stores made before encrypted names (and with --plain-names) keep readable names and work as before."""
    backing, mnt = tmp_path / "plain", tmp_path / "mnt"
    out = run_vcfs("init", str(backing), "--plain-names").stdout
    assert "names and symlink targets: plain" in out
    text = (backing / "vcfs.conf").read_text()
    assert "encrypted_names = false" in text and "[names" not in text  # the layout every older store has
    assert sorted(p.name for p in (backing / "files").iterdir()) == []
    mnt.mkdir()
    m = Mounted(backing, mnt)
    m.mount()
    try:
        (mnt / "2026").mkdir()
        (mnt / "2026" / NAMES[0]).write_bytes(b"plain")
        os.symlink(f"2026/{NAMES[0]}", mnt / "latest")
        (mnt / "name.with.dots").write_bytes(b"")
        (mnt / "vcfs.dirid").write_bytes(b"just a user file")  # no name is reserved in a plain store
        m.umount()
        assert (backing / "files" / "2026" / NAMES[0]).exists()
        assert os.readlink(backing / "files" / "latest") == f"2026/{NAMES[0]}"
        code, report = _fsck(m)
        assert code == 0 and report["problems"] == [] and report["files"] == 3
        path = run_vcfs("path", str(backing), f"/2026/{NAMES[0]}").stdout.strip()
        assert path == str(backing / "files" / "2026" / NAMES[0])
        run_vcfs("export", str(backing), str(tmp_path / "out"))
        assert (tmp_path / "out" / "vcfs.dirid").read_bytes() == b"just a user file"
        res = json.loads(run_vcfs("keys", "rewrap", str(backing), "--json").stdout)
        assert res["failed"] == [] and res["names_key_rewrapped"] == []
        m.mount()
        assert (mnt / "latest").read_bytes() == b"plain"
        assert sorted(os.listdir(mnt)) == ["2026", "latest", "name.with.dots", "vcfs.dirid"]
    finally:
        if os.path.ismount(mnt):
            m.umount()
