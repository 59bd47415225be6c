"""The name layer over a real backing directory, without a mount or an HSM (vcfs/names.py).

What is checked here is what the mount relies on: directory ids, sidecars and leftovers stay
consistent through every operation, also when one is cut short, and paths map both ways.
The names key is a fixed test key (the HSM only wraps it; that part is tested with SoftHSM2
in test_names_mount.py).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from vcfs import names as names_mod
from vcfs.core.aead import NamesKey
from vcfs.core.names import DIR_ID_NAME, NameCodec
from vcfs.errors import NameAuthError, UsageError
from vcfs.namepaths import leftovers, resolve, unresolve, walk
from vcfs.names import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    EncryptedNames,
    read_dir_id,
    write_dir_id,
)

CODEC = NameCodec(NamesKey(bytes(range(32))))
LONG = b"L" * 200


@pytest.fixture
def tree(tmp_path: Path) -> bytes:
    root = tmp_path / "files"
    root.mkdir()
    write_dir_id(os.fsencode(root))
    return os.fsencode(root)


@pytest.fixture
def layer() -> EncryptedNames:
    return EncryptedNames(lambda _plain_dir: CODEC, cache_size=8)


def _names(layer: EncryptedNames, path: bytes, plain: bytes = b"/") -> list[bytes]:
    good, bad = layer.list_dir(path, layer.dir_key(path, plain))
    assert bad == []
    return sorted(g.name for g in good)


def _create(layer: EncryptedNames, dir_path: bytes, name: bytes, data: bytes = b"") -> bytes:
    en = layer.entry(layer.dir_key(dir_path, b"/"), name)
    layer.prepare(dir_path, en)
    path = os.path.join(dir_path, en.entry)
    with open(path, "xb") as f:
        f.write(data)
    return path


def test_mkdir_gives_every_directory_an_id_and_refuses_existing_names(layer: EncryptedNames, tree: bytes) -> None:
    dk = layer.dir_key(tree, b"/")
    for name in (b"short", LONG):
        path = layer.mkdir(tree, layer.entry(dk, name), 0o750)
        assert len(read_dir_id(path)) == 16 and os.stat(path).st_mode & 0o777 == 0o750
        with pytest.raises(FileExistsError):
            layer.mkdir(tree, layer.entry(dk, name), 0o755)
    assert _names(layer, tree) == sorted([b"short", LONG])
    assert leftovers(layer, tree) == []
    ids = {read_dir_id(os.path.join(tree, layer.entry(dk, n).entry)) for n in (b"short", LONG)}
    assert len(ids) == 2


def test_mkdir_cut_short_leaves_no_visible_directory(
    layer: EncryptedNames, tree: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(old: bytes, new: bytes) -> None:
        raise OSError(errno.ENOSPC, "no space")

    monkeypatch.setattr(names_mod, "_rename_noreplace", fail)
    with pytest.raises(OSError):
        layer.mkdir(tree, layer.entry(layer.dir_key(tree, b"/"), LONG), 0o755)
    assert sorted(os.listdir(tree)) == [DIR_ID_NAME]  # no temp dir, no sidecar


def test_rmdir_refuses_content_it_cannot_read_and_leaves_nothing(layer: EncryptedNames, tree: bytes) -> None:
    dk = layer.dir_key(tree, b"/")
    d = layer.mkdir(tree, layer.entry(dk, LONG), 0o755)
    Path(os.fsdecode(d), "planted-by-someone").write_bytes(b"")
    with pytest.raises(OSError) as info:
        layer.rmdir(tree, layer.entry(dk, LONG))
    assert info.value.errno == errno.ENOTEMPTY
    os.unlink(os.path.join(d, b"planted-by-someone"))
    layer.rmdir(tree, layer.entry(dk, LONG))
    assert sorted(os.listdir(tree)) == [DIR_ID_NAME]
    f = _create(layer, tree, b"file")
    with pytest.raises(NotADirectoryError):
        layer.rmdir(tree, layer.entry(dk, b"file"))
    assert os.path.exists(f)


def test_renames_keep_sidecars_exactly_where_names_use_them(layer: EncryptedNames, tree: bytes) -> None:
    dk = layer.dir_key(tree, b"/")
    sub = layer.mkdir(tree, layer.entry(dk, b"sub"), 0o755)
    sk = layer.dir_key(sub, b"/sub")
    _create(layer, tree, LONG, b"long")
    _create(layer, tree, b"short", b"short")
    layer.rename(tree, layer.entry(dk, LONG), sub, layer.entry(sk, b"now-short"), 0)
    layer.rename(tree, layer.entry(dk, b"short"), sub, layer.entry(sk, LONG), 0)
    assert _names(layer, tree) == [b"sub"] and sorted(os.listdir(tree)) == sorted(
        [DIR_ID_NAME, b"" + layer.entry(dk, b"sub").entry]
    )
    assert _names(layer, sub, b"/sub") == sorted([LONG, b"now-short"])
    with pytest.raises(FileExistsError):
        layer.rename(sub, layer.entry(sk, b"now-short"), sub, layer.entry(sk, LONG), RENAME_NOREPLACE)
    layer.rename(sub, layer.entry(sk, b"now-short"), sub, layer.entry(sk, LONG), RENAME_EXCHANGE)
    assert Path(os.fsdecode(resolve(layer, tree, "/sub/" + LONG.decode()))).read_bytes() == b"long"
    assert Path(os.fsdecode(resolve(layer, tree, "/sub/now-short"))).read_bytes() == b"short"
    layer.rename(sub, layer.entry(sk, LONG), sub, layer.entry(sk, b"now-short"), 0)  # over an existing entry
    assert _names(layer, sub, b"/sub") == [b"now-short"] and leftovers(layer, sub) == []
    assert [n for n in os.listdir(sub) if n.endswith(b".name")] == []


def test_directory_renamed_over_an_empty_one(layer: EncryptedNames, tree: bytes) -> None:
    dk = layer.dir_key(tree, b"/")
    a = layer.mkdir(tree, layer.entry(dk, b"a"), 0o755)
    _create(layer, a, b"inside", b"x")
    b = layer.mkdir(tree, layer.entry(dk, b"b"), 0o755)
    _create(layer, b, b"blocker")
    with pytest.raises(OSError) as info:
        layer.rename(tree, layer.entry(dk, b"a"), tree, layer.entry(dk, b"b"), 0)
    assert info.value.errno == errno.ENOTEMPTY
    os.unlink(os.fsencode(resolve(layer, tree, "/b/blocker")))
    layer.rename(tree, layer.entry(dk, b"a"), tree, layer.entry(dk, b"b"), 0)
    assert _names(layer, tree) == [b"b"] and leftovers(layer, tree) == []
    assert Path(os.fsdecode(resolve(layer, tree, "/b/inside"))).read_bytes() == b"x"


def test_paths_map_both_ways_and_walk_reports_bad_names(layer: EncryptedNames, tree: bytes) -> None:
    dk = layer.dir_key(tree, b"/")
    d = layer.mkdir(tree, layer.entry(dk, LONG), 0o755)
    f = _create(layer, d, b"rec.mp4")
    assert resolve(layer, tree, f"/{LONG.decode()}/rec.mp4") == f
    assert unresolve(layer, tree, f) == b"/" + LONG + b"/rec.mp4"
    assert unresolve(layer, tree, tree) == b"/"
    with pytest.raises(UsageError, match="does not exist"):
        resolve(layer, tree, "/nope")
    with pytest.raises(UsageError, match=r"'\.\.'"):
        resolve(layer, tree, "/a/../b")
    with pytest.raises(UsageError, match="own file"):
        unresolve(layer, tree, os.path.join(d, DIR_ID_NAME))
    other = layer.mkdir(tree, layer.entry(dk, b"other"), 0o755)
    os.rename(f, os.path.join(other, os.path.basename(f)))  # moved into another directory
    with pytest.raises(NameAuthError):
        unresolve(layer, tree, os.path.join(other, os.path.basename(f)))
    seen = {(w.plain, w.problem is not None) for w in walk(layer, tree, b"/")}
    assert (b"/" + LONG, False) in seen and (b"/other", False) in seen and (None, True) in seen


def test_caches_stay_bounded(layer: EncryptedNames, tree: bytes) -> None:
    for i in range(40):
        _create(layer, tree, f"n{i}".encode())
    assert len(_names(layer, tree)) == 40
    assert len(layer._enc._data) <= 8 and len(layer._dec._data) <= 8
