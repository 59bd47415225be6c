"""Plaintext paths and backing paths, offline: map one to the other, walk a tree by plaintext name.

Used by fsck, export, decrypt and ``vcfs path``; the mount keeps its own view of names in
vcfs/namespace.py. Everything goes through a name layer (vcfs/names.py), so a store with
plain names is walked by the same code as one with encrypted names.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from vcfs.core.names import LONG_SUFFIX, SIDECAR_SUFFIX, Kind, classify, is_entry
from vcfs.errors import NameAuthError, UsageError
from vcfs.names import PLAIN_DIR, DirKey, NameLayer


def _components(plain: str) -> list[bytes]:
    parts = [os.fsencode(p) for p in plain.split("/") if p and p != "."]
    if b".." in parts:
        raise UsageError(f"{plain}: '..' is not allowed in a path inside the store")
    return parts


def resolve(names: NameLayer, tree: bytes, plain: str) -> bytes:
    """The backing path of the existing entry at plaintext path ``plain`` ("/" is the tree itself)."""
    path, plain_dir = tree, b"/"
    for part in _components(plain):
        en = names.entry(names.dir_key(path, plain_dir), part)
        path = os.path.join(path, en.entry)
        plain_dir = os.path.join(plain_dir, part)
        if not os.path.lexists(path):
            raise UsageError(f"{os.fsdecode(plain_dir)} does not exist in the store")
    return path


def unresolve(names: NameLayer, tree: bytes, backing: bytes) -> bytes:
    """The plaintext path of the backing entry ``backing`` (a path under ``tree``)."""
    rel = os.path.relpath(os.path.abspath(backing), os.path.abspath(tree))
    if rel == b".":
        return b"/"
    if rel.startswith(b".."):
        raise UsageError(f"{os.fsdecode(backing)} is not inside the store's tree {os.fsdecode(tree)}")
    path, plain = tree, b"/"
    for part in rel.split(b"/"):
        if names.encrypted and not is_entry(part):
            kind = classify(part)
            what = "vcfs's own file" if kind is not Kind.FOREIGN else "not a name vcfs writes"
            raise UsageError(f"{os.fsdecode(os.path.join(path, part))} is {what} ({kind.value}), not an entry")
        name = names.name_of(path, names.dir_key(path, plain), part)
        path, plain = os.path.join(path, part), os.path.join(plain, name)
    return plain


@dataclass(frozen=True, slots=True)
class Walked:
    """One backing entry met while walking a tree: its plaintext path, or why it has none."""

    backing: bytes
    st: os.stat_result | None
    plain: bytes | None = None  # None: undecryptable (see ``problem``)
    problem: str | None = None
    parent: DirKey = PLAIN_DIR  # of the directory holding it (decrypts a symlink target)


def walk(names: NameLayer, start: bytes, plain_start: bytes) -> Iterator[Walked]:
    """Every entry below the backing directory ``start`` (plaintext path ``plain_start``), parents
    first, each directory's entries in backing-name order. Bad names and directories whose id
    cannot be read are yielded with a ``problem`` (and a directory whose id is bad is not entered)."""
    try:
        dk = names.dir_key(start, plain_start)
        good, bad = names.list_dir(start, dk)
    except NameAuthError as exc:
        yield Walked(start, None, plain_start, exc.message)
        return
    except FileNotFoundError:
        return
    for b in bad:
        path = os.path.join(start, b.entry)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        yield Walked(path, st, None, b.reason, dk)
    for item in good:
        path = os.path.join(start, item.entry)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        plain = os.path.join(plain_start, item.name)
        yield Walked(path, st, plain, None, dk)
        if stat.S_ISDIR(st.st_mode):
            yield from walk(names, path, plain)


def leftovers(names: NameLayer, dir_path: bytes) -> list[bytes]:
    """vcfs's own files in a backing directory that nothing uses: interrupted-operation leftovers
    and sidecars whose long entry is gone."""
    if not names.encrypted:
        return []
    here = set(os.listdir(dir_path))
    out = []
    for name in sorted(here):
        kind = classify(name)
        if kind is Kind.TMP or (kind is Kind.SIDECAR and name[: -len(SIDECAR_SUFFIX)] + LONG_SUFFIX not in here):
            out.append(os.path.join(dir_path, name))
    return out
