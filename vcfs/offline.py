"""Working on a store without mounting it: open its keys, walk its tree, open its files.

Shared by fsck and export/decrypt so they see the store exactly as the mount does (same
config parsing, same key checks, same CryptFile engine).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vcfs.config import CONFIG_NAME, StoreConfig, load_config
from vcfs.cryptfile import CryptFile, open_cryptfile
from vcfs.errors import ConfigError, UsageError
from vcfs.journal import Journal
from vcfs.keys.provider import Pkcs11Provider
from vcfs.keys.setup import HostKeyOptions, open_provider
from vcfs.longpath import LongPath
from vcfs.store import open_noatime
from vcfs.storelayout import TREE_DIR, tree_path


@dataclass
class OfflineStore:
    backing: Path
    config: StoreConfig
    provider: Pkcs11Provider

    @property
    def tree(self) -> Path:
        return tree_path(self.backing)

    @property
    def journal(self) -> Journal:
        return Journal(self.backing)

    def open_file(self, path: Path, writable: bool = False, allow_damaged: bool = False) -> CryptFile:
        """Open a backing file; blocks a crash tore come from the journal (on disk only if
        ``writable``, which needs the store lock)."""
        fd = open_noatime(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            return open_cryptfile(fd, str(path), self.provider.unwrap, allow_damaged, self.journal)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        self.provider.close()


def open_store(backing: Path, opts: HostKeyOptions) -> OfflineStore:
    cfg = load_config(backing)
    return OfflineStore(backing, cfg, open_provider(cfg, opts))


def find_store(backing_file: Path) -> tuple[Path, Path]:
    """The store holding ``backing_file`` and the file's path inside the tree."""
    path = LongPath(backing_file).resolve()
    for parent in path.parents:
        if parent.name == TREE_DIR and (parent.parent / CONFIG_NAME).exists():
            return parent.parent, path.relative_to(parent)
    raise ConfigError(f"{backing_file} is not inside a vcfs store (no {CONFIG_NAME} above a {TREE_DIR}/ directory)")


def walk(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Every entry under ``root`` (itself excluded), parents before children, sorted by name.

    The paths are LongPaths, usable however deep the tree is (vcfs/longpath.py); entries that
    vanish during the walk (a live store) are skipped.
    """
    stack = [LongPath(root)]
    while stack:
        directory = stack.pop()
        try:
            names = sorted(os.listdir(directory))
        except (FileNotFoundError, NotADirectoryError):
            continue
        subdirs = []
        for name in names:
            path = directory / name
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            yield path, st
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(path)
        stack.extend(reversed(subdirs))


def subtree(store: OfflineStore, subpath: str | None) -> Path:
    if not subpath:
        return store.tree
    root = (store.tree / subpath.lstrip("/")).resolve()
    if store.tree.resolve() not in (root, *root.parents):
        raise UsageError(f"{subpath} is outside the store")
    if not root.exists():
        raise UsageError(f"{subpath} does not exist in the store")
    return root
