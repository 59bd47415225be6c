"""Working on a store without mounting it: open its keys, walk its tree, open its files.

Shared by fsck and export/decrypt so they see the store exactly as the mount does (same
config parsing, same key checks, same CryptFile engine).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vcfs.config import CONFIG_NAME, StoreConfig, load_config
from vcfs.cryptfile import CryptFile, open_cryptfile
from vcfs.errors import ConfigError, UsageError
from vcfs.keys.provider import Pkcs11Provider
from vcfs.keys.setup import HostKeyOptions, open_provider
from vcfs.storelayout import TREE_DIR, tree_path


@dataclass
class OfflineStore:
    backing: Path
    config: StoreConfig
    provider: Pkcs11Provider

    @property
    def tree(self) -> Path:
        return tree_path(self.backing)

    def open_file(self, path: Path, writable: bool = False, allow_damaged: bool = False) -> CryptFile:
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            return open_cryptfile(fd, str(path), self.provider.unwrap, allow_damaged=allow_damaged)
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
    path = backing_file.resolve()
    for parent in path.parents:
        if parent.name == TREE_DIR and (parent.parent / CONFIG_NAME).exists():
            return parent.parent, path.relative_to(parent)
    raise ConfigError(f"{backing_file} is not inside a vcfs store (no {CONFIG_NAME} above a {TREE_DIR}/ directory)")


def walk(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Every entry under ``root`` (itself excluded), parents before children, sorted by name."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            try:
                yield path, path.lstat()
            except FileNotFoundError:
                continue


def subtree(store: OfflineStore, subpath: str | None) -> Path:
    if not subpath:
        return store.tree
    root = (store.tree / subpath.lstrip("/")).resolve()
    if store.tree.resolve() not in (root, *root.parents):
        raise UsageError(f"{subpath} is outside the store")
    if not root.exists():
        raise UsageError(f"{subpath} does not exist in the store")
    return root
