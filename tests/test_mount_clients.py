"""Real clients on a real mount: ffmpeg recording, cp -a, tar, rsync; remounts; no plaintext at rest.

Each test compares what a client produced through vcfs with what the same client produced
in (or from) a plain directory, byte for byte and, for copies, with modes, owners, mtimes,
symlink targets and hard-link groups.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import Mounted, require

from vcfs.core.layout import BLOCK_SIZE, plain_to_cipher_size

pytestmark = pytest.mark.mount


def _remount(m: Mounted) -> None:
    m.umount()
    m.mount()


def _run(*cmd: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


# ---- a source tree with everything copy tools have to preserve ---------------------------------

FILES: dict[str, tuple[int, int]] = {
    # relative path: (size, mode)
    "empty": (0, 0o644),
    "one-byte": (1, 0o600),
    "a/block": (BLOCK_SIZE, 0o640),
    "a/block-plus-one": (BLOCK_SIZE + 1, 0o444),
    "a/b/big.bin": (1_600_000, 0o755),
    "a/b/c/deep/bigger.bin": (3 * 1024 * 1024 + 17, 0o600),
    "a/b/c/deep/note.txt": (300, 0o664),
    "hard1": (70000, 0o640),
    "odd perms.dat": (5000, 0o4711),
}
DIRS: dict[str, int] = {"a": 0o755, "a/b": 0o2750, "a/b/c": 0o700, "a/b/c/deep": 0o755, "empty-dir": 0o1777}


def _content(rel: str, size: int) -> bytes:
    seed = hashlib.sha256(rel.encode()).digest()
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


def _make_tree(root: Path) -> None:
    root.mkdir()
    for rel in DIRS:
        (root / rel).mkdir(parents=True, exist_ok=True)
    for rel, (size, _mode) in FILES.items():
        (root / rel).write_bytes(_content(rel, size))
    os.link(root / "hard1", root / "a" / "b" / "hard2")
    os.symlink("b/big.bin", root / "a" / "link-to-big")
    os.symlink("a/b", root / "dir-link")
    os.symlink("../nowhere/at/all", root / "a" / "dangling")
    if os.geteuid() == 0:
        os.chown(root / "a" / "block", 1000, 1000)
        os.lchown(root / "a" / "dangling", 1001, 1002)
        os.chown(root / "a" / "b" / "c", 1003, 1004)
    for rel, (_size, mode) in FILES.items():
        os.chmod(root / rel, mode)
    base = 1_600_000_000_000_000_000
    for i, rel in enumerate(sorted(FILES)):
        os.utime(root / rel, ns=(base + i * 1_000_000_007, base + i * 3_000_000_011))
    for i, rel in enumerate(["a/link-to-big", "dir-link", "a/dangling"]):
        os.utime(root / rel, ns=(base, base + 777 + i), follow_symlinks=False)
    for i, rel in enumerate(sorted(DIRS, key=len, reverse=True)):  # children first
        os.chmod(root / rel, DIRS[rel])
        os.utime(root / rel, ns=(base, base + 5_000_000_000 * (i + 1) + 123))


Snapshot = tuple[dict[str, tuple[object, ...]], list[list[str]]]


def _snapshot(root: Path, mtimes: bool = True, atime_free: bool = True) -> Snapshot:
    entries: dict[str, tuple[object, ...]] = {}
    by_inode: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            entry: list[object] = [stat.S_IFMT(st.st_mode), oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid]
            if mtimes:
                entry.append(st.st_mtime_ns)
            if stat.S_ISLNK(st.st_mode):
                entry.append(os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                data = p.read_bytes()
                entry += [st.st_size, len(data), hashlib.sha256(data).hexdigest()]
                by_inode.setdefault(st.st_ino, []).append(rel)
            entries[rel] = tuple(entry)
    links = sorted(sorted(group) for group in by_inode.values() if len(group) > 1)
    return entries, links


def _assert_same_tree(got: Path, want: Path) -> None:
    g, w = _snapshot(got), _snapshot(want)
    assert set(g[0]) == set(w[0]), f"entries differ: extra {set(g[0]) - set(w[0])}, missing {set(w[0]) - set(g[0])}"
    for rel in sorted(w[0]):
        assert g[0][rel] == w[0][rel], f"{rel}: {g[0][rel]} != {w[0][rel]}"
    assert g[1] == w[1], f"hard links: {g[1]} != {w[1]}"


def test_source_tree_is_what_the_clients_must_preserve(tmp_path: Path) -> None:
    """Guard for the fixture tree itself: it has the features the client tests rely on."""
    _make_tree(tmp_path / "src")
    entries, links = _snapshot(tmp_path / "src")
    assert links == [["a/b/hard2", "hard1"]]
    assert entries["a/dangling"][-1] == "../nowhere/at/all"
    assert entries["odd perms.dat"][1] == oct(0o4711)
    assert entries["empty-dir"][1] == oct(0o1777)
    assert len({e[4] for e in entries.values()}) > 10  # distinct mtimes


# ---- ffmpeg ----------------------------------------------------------------------------------


def _ffmpeg_record(out: Path, faststart: bool) -> None:
    cmd = [
        "ffmpeg",
        "-nostdin",
        "-loglevel",
        "error",
        "-y",
        "-f",
        "lavfi",
        "-i",
        "testsrc=duration=4:size=320x240:rate=25",
        "-f",
        "lavfi",
        "-i",
        "sine=duration=4",
        "-vf",
        "noise=alls=12:allf=t",  # incompressible-ish: the file spans ~30 blocks
        "-c:v",
        "mpeg4",
        "-q:v",
        "4",
        "-c:a",
        "aac",
        "-threads",
        "1",
        "-fflags",
        "+bitexact",
        "-flags:v",
        "+bitexact",
        "-flags:a",
        "+bitexact",
        "-map_metadata",
        "-1",
    ]
    if faststart:
        cmd += ["-movflags", "+faststart"]  # rewrites the file: moov moved in front of mdat
    _run(*cmd, out)


def _require_ffmpeg() -> None:
    have = shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None
    require(have, "ffmpeg (apt-get install ffmpeg)")
    encoders = _run("ffmpeg", "-hide_banner", "-encoders").stdout
    require(" mpeg4 " in encoders and " aac " in encoders, "ffmpeg with the mpeg4 and aac encoders")


def _ffprobe_duration(path: Path) -> float:
    res = _run("ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "default=nw=1:nk=1", path)
    return float(res.stdout.strip())


def test_ffmpeg_recording_is_byte_identical_and_playable(mounted: Mounted, tmp_path: Path) -> None:
    _require_ffmpeg()
    plain = tmp_path / "plain"
    plain.mkdir()
    (mounted.mnt / "rec").mkdir()
    for name, faststart in [("faststart.mp4", True), ("plain.mp4", False)]:
        _ffmpeg_record(plain / name, faststart)
        _ffmpeg_record(mounted.mnt / "rec" / name, faststart)
        want = (plain / name).read_bytes()
        assert len(want) > 10 * BLOCK_SIZE
        assert (mounted.mnt / "rec" / name).read_bytes() == want, name
    _remount(mounted)
    for name in ("faststart.mp4", "plain.mp4"):
        rec = mounted.mnt / "rec" / name
        assert rec.read_bytes() == (plain / name).read_bytes(), name
        assert rec.stat().st_size == (plain / name).stat().st_size
        assert abs(_ffprobe_duration(rec) - 4.0) < 0.2
        # decode every frame from the mount: any unreadable block would surface here
        res = _run("ffmpeg", "-nostdin", "-v", "error", "-i", rec, "-f", "null", "-")
        assert res.stderr.strip() == ""
    # remux from the mount into the mount (reader and writer on one filesystem)
    _run(
        "ffmpeg",
        "-nostdin",
        "-loglevel",
        "error",
        "-y",
        "-i",
        mounted.mnt / "rec" / "plain.mp4",
        "-c",
        "copy",
        "-fflags",
        "+bitexact",
        "-map_metadata",
        "-1",
        "-f",
        "matroska",
        mounted.mnt / "rec" / "remux.mkv",
    )
    _run(
        "ffmpeg",
        "-nostdin",
        "-loglevel",
        "error",
        "-y",
        "-i",
        plain / "plain.mp4",
        "-c",
        "copy",
        "-fflags",
        "+bitexact",
        "-map_metadata",
        "-1",
        "-f",
        "matroska",
        plain / "remux.mkv",
    )
    assert (mounted.mnt / "rec" / "remux.mkv").read_bytes() == (plain / "remux.mkv").read_bytes()


# ---- cp -a, tar, rsync ---------------------------------------------------------------------------


def test_cp_a_round_trip(mounted: Mounted, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _make_tree(src)
    _run("cp", "-a", src, mounted.mnt / "copy")
    _assert_same_tree(mounted.mnt / "copy", src)
    _remount(mounted)  # what was stored, not what the kernel still caches
    _assert_same_tree(mounted.mnt / "copy", src)
    _run("cp", "-a", mounted.mnt / "copy", tmp_path / "back")
    _assert_same_tree(tmp_path / "back", src)
    # a second cp -a over the existing copy (overwrites files in place with O_TRUNC)
    (src / "a" / "b" / "big.bin").write_bytes(_content("changed", 200_000))
    os.utime(src / "a" / "b" / "big.bin", ns=(1_700_000_000_000_000_000, 1_700_000_000_123_456_789))
    _run("cp", "-a", f"{src}/.", mounted.mnt / "copy")
    os.utime(src / "a" / "b", ns=(1, os.stat(mounted.mnt / "copy" / "a" / "b").st_mtime_ns))
    _remount(mounted)
    assert (mounted.mnt / "copy" / "a" / "b" / "big.bin").read_bytes() == _content("changed", 200_000)
    _assert_same_tree(mounted.mnt / "copy", src)


def test_tar_out_of_and_into_the_mount(mounted: Mounted, tmp_path: Path) -> None:
    require(shutil.which("tar") is not None, "tar")
    src = tmp_path / "src"
    _make_tree(src)
    # into the mount: extract an archive made from a plain tree
    _run("tar", "--format=posix", "-C", src, "-cf", tmp_path / "in.tar", ".")
    (mounted.mnt / "x").mkdir()
    _run("tar", "-C", mounted.mnt / "x", "-xpf", tmp_path / "in.tar")
    _remount(mounted)
    _assert_same_tree(mounted.mnt / "x", src)
    # out of the mount: archive the extracted tree, extract it into a plain directory
    _run("tar", "--format=posix", "-C", mounted.mnt / "x", "-cf", tmp_path / "out.tar", ".")
    (tmp_path / "out").mkdir()
    _run("tar", "-C", tmp_path / "out", "-xpf", tmp_path / "out.tar")
    _assert_same_tree(tmp_path / "out", src)
    # and an archive written into the mount is the same archive
    _run("tar", "--format=posix", "-C", src, "-cf", mounted.mnt / "in-mount.tar", ".")
    listing_plain = _run("tar", "-tvf", tmp_path / "in.tar").stdout
    listing_mount = _run("tar", "-tvf", mounted.mnt / "in-mount.tar").stdout
    assert listing_mount == listing_plain
    _run("tar", "--compare", "-C", src, "-f", mounted.mnt / "in-mount.tar")


def test_rsync_round_trip_and_delta_update(mounted: Mounted, tmp_path: Path) -> None:
    require(shutil.which("rsync") is not None, "rsync (apt-get install rsync)")
    src = tmp_path / "src"
    _make_tree(src)
    _run("rsync", "-aH", f"{src}/", f"{mounted.mnt / 'r'}/")
    _remount(mounted)
    _assert_same_tree(mounted.mnt / "r", src)
    # a delta update: rsync reads the old file in the mount as its basis and renames a temp file over it
    big = src / "a" / "b" / "c" / "deep" / "bigger.bin"
    data = bytearray(big.read_bytes())
    data[BLOCK_SIZE * 7 : BLOCK_SIZE * 7 + 10] = b"0123456789"
    data += b"appended by the second run"
    big.write_bytes(data)
    os.utime(big, ns=(1_650_000_000_000_000_000, 1_650_000_000_000_000_001))
    os.utime(big.parent, ns=(1, os.stat(mounted.mnt / "r" / "a" / "b" / "c" / "deep").st_mtime_ns))
    res = _run("rsync", "-aH", "--no-whole-file", "--stats", f"{src}/", f"{mounted.mnt / 'r'}/")
    assert "Matched data:" in res.stdout and "Matched data: 0 bytes" not in res.stdout  # the basis was read
    _remount(mounted)
    _assert_same_tree(mounted.mnt / "r", src)
    _run("rsync", "-aH", f"{mounted.mnt / 'r'}/", f"{tmp_path / 'back'}/")
    _assert_same_tree(tmp_path / "back", src)


# ---- remounts ------------------------------------------------------------------------------------


def test_files_survive_unmount_and_remount(mounted: Mounted, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _make_tree(src)
    shutil.copytree(src, mounted.mnt / "t", symlinks=True, copy_function=shutil.copy2)
    want = _snapshot(mounted.mnt / "t")
    mounted.umount()
    assert not os.listdir(mounted.mnt)  # really unmounted
    for rel, (size, _mode) in FILES.items():
        backing = mounted.backing_of(f"t/{rel}")
        assert backing.stat().st_size == plain_to_cipher_size(size), rel
    mounted.mount()
    assert _snapshot(mounted.mnt / "t") == want
    # change things, remount again, and again
    with open(mounted.mnt / "t" / "a" / "b" / "big.bin", "ab") as f:
        f.write(b"more")
    os.truncate(mounted.mnt / "t" / "hard1", BLOCK_SIZE + 1)
    expected_big = _content("a/b/big.bin", FILES["a/b/big.bin"][0]) + b"more"
    for _ in range(2):
        _remount(mounted)
        assert (mounted.mnt / "t" / "a" / "b" / "big.bin").read_bytes() == expected_big
        assert (mounted.mnt / "t" / "hard1").read_bytes() == _content("hard1", 70000)[: BLOCK_SIZE + 1]
        # copytree copies hard links as separate files: the other one is untouched
        assert (mounted.mnt / "t" / "a" / "b" / "hard2").read_bytes() == _content("hard1", 70000)
        assert (mounted.mnt / "t" / "empty").read_bytes() == b""
        assert os.readlink(mounted.mnt / "t" / "a" / "dangling") == "../nowhere/at/all"


# ---- no plaintext at rest --------------------------------------------------------------------------


def _backing_bytes(backing: Path) -> list[tuple[Path, bytes]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(backing):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            if p.is_symlink():
                out.append((p, os.fsencode(os.readlink(p))))
            elif p.is_file():
                out.append((p, p.read_bytes()))
    return out


def test_no_plaintext_in_the_backing_store(mounted: Mounted, tmp_path: Path) -> None:
    markers = [f"MARKER-{secrets.token_hex(12)}".encode() for _ in range(6)]
    m = mounted.mnt
    # many copies, in a multi-block file
    (m / "many.bin").write_bytes(b"".join(markers[0] + b"|" for _ in range(20000)))
    # straddling every block boundary of a file, and at its very start and end
    straddle = bytearray(_content("straddle", 6 * BLOCK_SIZE))
    half = len(markers[1]) // 2
    for b in range(1, 6):
        straddle[b * BLOCK_SIZE - half : b * BLOCK_SIZE - half + len(markers[1])] = markers[1]
    straddle[: len(markers[1])] = markers[1]
    straddle[-len(markers[1]) :] = markers[1]
    (m / "straddle.bin").write_bytes(straddle)
    # a tiny file holding only a marker; a recorder-style file appended in small pieces
    (m / "tiny").write_bytes(markers[2])
    with open(m / "appended.log", "ab") as f:
        for i in range(3000):
            f.write(markers[3] + f" line {i}\n".encode())
            if i % 500 == 0:
                f.flush()
                os.fsync(f.fileno())
    # rewritten in place and truncated: no old or new marker may remain readable at rest
    p = m / "rewritten.bin"
    p.write_bytes(markers[4] * 10000)
    with open(p, "r+b") as f:
        f.seek(BLOCK_SIZE - 5)
        f.write(markers[5] * 100)
    os.truncate(p, 2 * BLOCK_SIZE + 3)
    video_windows: list[bytes] = []
    if shutil.which("ffmpeg"):
        _ffmpeg_record(m / "video.mp4", faststart=True)
        _ffmpeg_record(tmp_path / "video.mp4", faststart=True)
        video = (tmp_path / "video.mp4").read_bytes()
        assert (m / "video.mp4").read_bytes() == video
        for frac in (0.0, 0.1, 0.33, 0.5, 0.77, 0.95):
            off = int(len(video) * frac)
            while len(set(video[off : off + 32])) < 12:  # skip runs of zeros or padding
                off += 32
            video_windows.append(video[off : off + 32])
        video_windows.append(video[-32:])
    many = mounted.backing_of("many.bin")
    mounted.umount()
    files = _backing_bytes(mounted.backing)
    assert any(path == many for path, _ in files)
    assert sum(len(data) for _, data in files) > 2_000_000
    for path, data in files:
        for marker in markers:
            assert marker not in data, f"marker in plaintext in {path}"
            assert marker[7:].lower() not in data.lower(), f"marker payload in {path}"
        for i, window in enumerate(video_windows):
            assert window not in data, f"video bytes (window {i}) in plaintext in {path}"
    mounted.mount()  # and the data is all still there, decrypted
    assert (m / "tiny").read_bytes() == markers[2]
    assert (m / "straddle.bin").read_bytes() == straddle
    assert (m / "rewritten.bin").stat().st_size == 2 * BLOCK_SIZE + 3
