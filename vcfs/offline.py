"""Working on a store without mounting it: open its keys, walk its tree, open its files.

Shared by fsck, export/decrypt and the path tool so they see the store exactly as the mount
does (same config parsing, same key checks, same name layer, same CryptFile engine).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vcfs.config import CONFIG_NAME, StoreConfig, load_config
from vcfs.core.names import is_entry
from vcfs.cryptfile import CryptFile, open_cryptfile
from vcfs.errors import ConfigError, UsageError
from vcfs.journal import Journal
from vcfs.keys.provider import Pkcs11Provider
from vcfs.keys.setup import HostKeyOptions, open_provider
from vcfs.longpath import LongPath
from vcfs.namekeys import name_layer
from vcfs.namepaths import resolve, unresolve
from vcfs.names import NameLayer, PlainNames, check_layout
from vcfs.store import open_noatime
from vcfs.storelayout import TREE_DIR, tree_path


@dataclass
class OfflineStore:
    backing: Path
    config: StoreConfig
    provider: Pkcs11Provider
    names: NameLayer = field(default_factory=PlainNames)

    @property
    def tree(self) -> Path:
        return tree_path(self.backing)

    @property
    def journal(self) -> Journal:
        return Journal(self.backing)

    def backing_of(self, plain: str) -> Path:
        """The backing path of the entry at plaintext path ``plain`` (UsageError if there is none)."""
        return Path(os.fsdecode(resolve(self.names, os.fsencode(self.tree), plain)))

    def plain_of(self, backing: Path) -> str:
        """The plaintext path (``/a/b``) of a backing path inside the tree."""
        return os.fsdecode(unresolve(self.names, os.fsencode(self.tree), os.fsencode(backing)))

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
    provider = open_provider(cfg, opts)
    try:
        names = name_layer(cfg, provider, skip=provider.is_down)  # a down domain's names: on first use
        check_layout(names, os.fsencode(tree_path(backing)))
        return OfflineStore(backing, cfg, provider, names)
    except BaseException:
        provider.close()
        raise


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


def subtree(store: OfflineStore, subpath: str | None) -> tuple[Path, str]:
    """The backing path and the normalised plaintext path (``/a/b``) of a plaintext ``subpath``."""
    if not subpath:
        return store.tree, "/"
    plain = "/" + "/".join(p for p in subpath.split("/") if p and p != ".")
    if not store.names.encrypted:
        root = (store.tree / subpath.lstrip("/")).resolve()
        if store.tree.resolve() not in (root, *root.parents):
            raise UsageError(f"{subpath} is outside the store")
        if not root.exists():
            raise UsageError(f"{subpath} does not exist in the store")
        return root, plain
    return store.backing_of(plain), plain


def data_files(backing: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Every backing file that holds a file's data (header and blocks), skipping vcfs's own
    files (directory ids, long-name sidecars) in stores with encrypted names. No keys needed."""
    encrypted = load_config(backing).encrypted_names
    for path, st in walk(tree_path(backing)):
        if stat.S_ISREG(st.st_mode) and not (encrypted and not is_entry(os.fsencode(path.name))):
            yield path, st
