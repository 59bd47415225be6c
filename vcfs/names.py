"""Names over the backing tree: directory ids, long-name sidecars, listings, and the directory
operations that keep them consistent (docs/FORMAT.md, "Names"). Storage layer, beside store.py.

One small interface, two implementations: ``PlainNames`` (stores made with ``--plain-names``
and every store made before names were encrypted: a backing name is the plaintext name) and
``EncryptedNames``. The mount (through vcfs/namespace.py), fsck, export and the path tool (through
vcfs/namepaths.py) all go through it, so they agree on every rule.

Crash safety (encrypted names): a directory appears under its name only once its id file is
written and synced (it is built under a ``vcfs.tmp.*`` name and renamed into place); rmdir and
replacing an empty directory first rename it to a ``vcfs.tmp.*`` name; a long name's sidecar
is written (atomically) before its entry and removed after it. An interrupted operation thus
leaves at most a ``vcfs.tmp.*`` leftover or an orphan sidecar, which no listing shows and
``vcfs fsck --repair`` removes, never a visible entry without its id file or sidecar.

Concurrency: within one mount the kernel serialises namespace operations in a directory (it
holds the directory's lock while the request runs) and the store lock allows one daemon, so
nothing here takes locks of its own; the caches are safe to share between worker threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import secrets
import stat
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from vcfs.core.names import (
    DIR_ID_LEN,
    DIR_ID_NAME,
    TMP_PREFIX,
    EntryName,
    Kind,
    NameCodec,
    classify,
    is_entry,
    sidecar_of,
)
from vcfs.errors import ConfigError, NameAuthError
from vcfs.store import fsync_dir

log = logging.getLogger("vcfs.names")

# <linux/fs.h>; the same values as pyfuse3.RENAME_NOREPLACE / RENAME_EXCHANGE.
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
CACHE_SIZE = 65536  # decrypted (and encrypted) names kept per direction: a few MiB at most

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100

KeysFor = Callable[[bytes], NameCodec]  # plaintext directory path -> the names key of its entries
_K = TypeVar("_K")
_V = TypeVar("_V")


def renameat2(old: bytes, new: bytes, flags: int) -> None:
    if _libc.renameat2(_AT_FDCWD, old, _AT_FDCWD, new, ctypes.c_uint(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _rename_noreplace(old: bytes, new: bytes) -> None:
    try:
        renameat2(old, new, RENAME_NOREPLACE)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        if os.path.lexists(new):  # a backing filesystem without renameat2 flags (NFS, ...)
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST)) from None
        os.rename(old, new)


class _Lru(Generic[_K, _V]):
    """A bounded map, least recently used out first.

    No lock: each OrderedDict operation is atomic under the GIL, and the only race (two threads
    evicting, or a lookup of a key evicted meanwhile) costs at most a cache miss.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._data: OrderedDict[_K, _V] = OrderedDict()

    def get(self, key: _K) -> _V | None:
        value = self._data.get(key)
        if value is not None:
            try:  # noqa: SIM105 (contextlib.suppress costs a microsecond, once per name listed)
                self._data.move_to_end(key)
            except KeyError:
                pass
        return value

    def put(self, key: _K, value: _V) -> None:
        data = self._data
        known = key in data
        data[key] = value  # a new key goes to the end by itself
        try:
            if known:
                data.move_to_end(key)
            elif len(data) > self._size:
                data.popitem(last=False)
        except KeyError:
            pass


@dataclass(frozen=True, slots=True)
class DirKey:
    """What encrypting a name in one directory needs: its id and its domain's names key."""

    dir_id: bytes
    codec: NameCodec | None


PLAIN_DIR = DirKey(b"", None)


@dataclass(frozen=True, slots=True)
class Listed:
    name: bytes  # plaintext name
    entry: bytes  # backing name
    ino: int = 0  # backing inode number as the directory listing gave it (d_ino): lstat in this order


def _scan(dir_path: bytes) -> list[tuple[bytes, int]]:
    """(name, d_ino) of every entry, by name: one getdents pass, no stat."""
    with os.scandir(dir_path) as it:
        return sorted((e.name, e.inode()) for e in it)


@dataclass(frozen=True, slots=True)
class BadName:
    entry: bytes  # backing name that is not an authentic name of this directory
    reason: str


class NameLayer(Protocol):
    encrypted: bool

    def dir_key(self, dir_path: bytes, plain_dir: bytes) -> DirKey: ...
    def entry(self, dk: DirKey, name: bytes) -> EntryName: ...
    def name_of(self, dir_path: bytes, dk: DirKey, entry: bytes) -> bytes: ...
    def list_dir(self, dir_path: bytes, dk: DirKey) -> tuple[list[Listed], list[BadName]]: ...
    def prepare(self, dir_path: bytes, en: EntryName) -> None: ...
    def unprepare(self, dir_path: bytes, en: EntryName) -> None: ...
    def mkdir(self, dir_path: bytes, en: EntryName, mode: int) -> bytes: ...
    def rmdir(self, dir_path: bytes, en: EntryName) -> None: ...
    def unlink(self, dir_path: bytes, en: EntryName) -> None: ...
    def rename(self, old_dir: bytes, old: EntryName, new_dir: bytes, new: EntryName, flags: int) -> None: ...
    def store_target(self, dk: DirKey, target: bytes) -> bytes: ...
    def load_target(self, dk: DirKey, stored: bytes) -> bytes: ...


def _rename(old: bytes, new: bytes, flags: int) -> None:
    if flags:
        renameat2(old, new, flags)
    else:
        os.rename(old, new)


class PlainNames:
    """Backing names are plaintext names; the backing tree is the plaintext tree."""

    encrypted = False

    def dir_key(self, dir_path: bytes, plain_dir: bytes) -> DirKey:
        return PLAIN_DIR

    def entry(self, dk: DirKey, name: bytes) -> EntryName:
        return EntryName(name)

    def name_of(self, dir_path: bytes, dk: DirKey, entry: bytes) -> bytes:
        return entry

    def list_dir(self, dir_path: bytes, dk: DirKey) -> tuple[list[Listed], list[BadName]]:
        return [Listed(n, n, ino) for n, ino in _scan(dir_path)], []

    def prepare(self, dir_path: bytes, en: EntryName) -> None:
        return None

    def unprepare(self, dir_path: bytes, en: EntryName) -> None:
        return None

    def mkdir(self, dir_path: bytes, en: EntryName, mode: int) -> bytes:
        path = os.path.join(dir_path, en.entry)
        os.mkdir(path, stat.S_IMODE(mode))
        return path

    def rmdir(self, dir_path: bytes, en: EntryName) -> None:
        os.rmdir(os.path.join(dir_path, en.entry))

    def unlink(self, dir_path: bytes, en: EntryName) -> None:
        os.unlink(os.path.join(dir_path, en.entry))

    def rename(self, old_dir: bytes, old: EntryName, new_dir: bytes, new: EntryName, flags: int) -> None:
        _rename(os.path.join(old_dir, old.entry), os.path.join(new_dir, new.entry), flags)

    def store_target(self, dk: DirKey, target: bytes) -> bytes:
        return target

    def load_target(self, dk: DirKey, stored: bytes) -> bytes:
        return stored


def _tmp_name() -> bytes:
    return TMP_PREFIX + secrets.token_hex(8).encode()


def _write_synced(path: bytes, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_small(path: bytes, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        return os.read(fd, limit + 1)
    finally:
        os.close(fd)


_DIR_ID_HINT = "restore the directory's id file from a backup of the store: without it no name in it decrypts"


def read_dir_id(dir_path: bytes) -> bytes:
    """The 16-byte id of a backing directory; NameAuthError if its id file is missing or malformed."""
    try:
        data = _read_small(os.path.join(dir_path, DIR_ID_NAME), DIR_ID_LEN)
    except FileNotFoundError:
        if not os.path.isdir(dir_path):
            raise
        raise NameAuthError(
            f"{os.fsdecode(dir_path)}: directory has no {DIR_ID_NAME.decode()} file",
            hint=_DIR_ID_HINT,
        ) from None
    except OSError as exc:
        raise NameAuthError(f"{os.fsdecode(dir_path)}: cannot read its directory id: {exc.strerror}") from None
    if len(data) != DIR_ID_LEN:
        raise NameAuthError(
            f"{os.fsdecode(dir_path)}: {DIR_ID_NAME.decode()} is {len(data)} bytes, expected {DIR_ID_LEN}",
            hint=_DIR_ID_HINT,
        )
    return data


def write_dir_id(dir_path: bytes) -> None:
    """Give a new backing directory its random id (synced: an empty id file would lose every name)."""
    _write_synced(os.path.join(dir_path, DIR_ID_NAME), os.urandom(DIR_ID_LEN), 0o444)
    fsync_dir(os.fsdecode(dir_path))


def check_layout(names: NameLayer, tree: bytes) -> None:
    """Refuse a tree with encrypted names when the config says names are plain.

    Editing ``features.encrypted_names`` in the config must not make vcfs write new names in
    the clear into a store whose names are encrypted.
    """
    if names.encrypted:
        return
    marker = os.path.join(tree, DIR_ID_NAME)
    try:
        st = os.lstat(marker)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode) and st.st_size == DIR_ID_LEN:
        raise ConfigError(
            f"the store config says names are plain, but {os.fsdecode(tree)} holds encrypted names",
            hint="features.encrypted_names in vcfs.conf was changed: restore vcfs.conf from a backup",
        )


def remove_leftover(path: bytes) -> None:
    """Delete a ``vcfs.tmp.*`` leftover: a file, or a directory holding only vcfs's own files."""
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        os.unlink(path)
        return
    for name in os.listdir(path):
        if is_entry(name) or classify(name) is Kind.FOREIGN:
            raise OSError(errno.ENOTEMPTY, f"{os.fsdecode(path)} holds entries; not removing it")
        remove_leftover(os.path.join(path, name))
    os.rmdir(path)


class EncryptedNames:
    """Encrypted backing names (docs/FORMAT.md, "Names"), with bounded caches of both directions."""

    encrypted = True

    def __init__(self, keys_for: KeysFor, cache_size: int = CACHE_SIZE) -> None:
        self._keys_for = keys_for
        self._enc: _Lru[tuple[NameCodec, bytes, bytes], EntryName] = _Lru(cache_size)
        self._dec: _Lru[tuple[NameCodec, bytes, bytes], bytes] = _Lru(cache_size)
        self._targets: _Lru[tuple[NameCodec, bytes], bytes] = _Lru(cache_size // 16)

    def dir_key(self, dir_path: bytes, plain_dir: bytes) -> DirKey:
        return DirKey(read_dir_id(dir_path), self._keys_for(plain_dir))

    @staticmethod
    def _codec(dk: DirKey) -> NameCodec:
        if dk.codec is None:
            raise NameAuthError("no names key for this directory")
        return dk.codec

    def entry(self, dk: DirKey, name: bytes) -> EntryName:
        codec = self._codec(dk)
        key = (codec, dk.dir_id, name)
        en = self._enc.get(key)
        if en is None:
            en = codec.encrypt(name, dk.dir_id)
            self._enc.put(key, en)
        return en

    def name_of(self, dir_path: bytes, dk: DirKey, entry: bytes, kind: Kind | None = None) -> bytes:
        """Decrypt one backing name of the directory at ``dir_path`` (reads the sidecar of a long one)."""
        codec = self._codec(dk)
        key = (codec, dk.dir_id, entry)
        name = self._dec.get(key)
        if name is not None:
            return name
        kind = classify(entry) if kind is None else kind
        sidecar = None
        if kind is Kind.LONG:
            try:
                sidecar = _read_small(os.path.join(dir_path, sidecar_of(entry)), 4096)
            except FileNotFoundError:
                sidecar = None
        name = codec.decrypt(entry, dk.dir_id, sidecar, kind)
        self._dec.put(key, name)
        return name

    def list_dir(self, dir_path: bytes, dk: DirKey) -> tuple[list[Listed], list[BadName]]:
        good: list[Listed] = []
        bad: list[BadName] = []
        for entry, ino in _scan(dir_path):
            kind = classify(entry)
            if kind in (Kind.SIDECAR, Kind.DIR_ID, Kind.TMP):
                continue
            if kind is Kind.FOREIGN:
                bad.append(BadName(entry, "not a name vcfs writes"))
                continue
            try:
                good.append(Listed(self.name_of(dir_path, dk, entry, kind), entry, ino))
            except NameAuthError as exc:
                bad.append(BadName(entry, exc.message))
        return good, bad

    def prepare(self, dir_path: bytes, en: EntryName) -> None:
        """Before an entry is created under ``en``: write its sidecar (long names), atomically."""
        if en.sidecar is None or en.sidecar_name is None:
            return
        path = os.path.join(dir_path, en.sidecar_name)
        try:
            if _read_small(path, len(en.sidecar)) == en.sidecar:
                return
        except FileNotFoundError:
            pass
        tmp = os.path.join(dir_path, _tmp_name())
        _write_synced(tmp, en.sidecar, 0o444)
        os.replace(tmp, path)

    def unprepare(self, dir_path: bytes, en: EntryName) -> None:
        """After ``en`` was removed, or its creation failed: drop its sidecar if nothing uses it."""
        if en.sidecar_name is None or os.path.lexists(os.path.join(dir_path, en.entry)):
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(dir_path, en.sidecar_name))

    def mkdir(self, dir_path: bytes, en: EntryName, mode: int) -> bytes:
        final = os.path.join(dir_path, en.entry)
        if os.path.lexists(final):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST))
        tmp = os.path.join(dir_path, _tmp_name())
        os.mkdir(tmp, 0o700)
        try:
            write_dir_id(tmp)
            inherited = os.lstat(tmp).st_mode & stat.S_ISGID
            os.chmod(tmp, stat.S_IMODE(mode) | inherited)
            self.prepare(dir_path, en)
            _rename_noreplace(tmp, final)
        except BaseException:
            remove_leftover(tmp)
            self.unprepare(dir_path, en)
            raise
        return final

    @staticmethod
    def _check_empty(path: bytes) -> None:
        """ENOTEMPTY unless the backing directory holds nothing but vcfs's own files.

        Entries that do not decrypt count as content: what cannot be read is not deleted.
        """
        if any(is_entry(n) or classify(n) is Kind.FOREIGN for n in os.listdir(path)):
            raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY))

    def rmdir(self, dir_path: bytes, en: EntryName) -> None:
        victim = os.path.join(dir_path, en.entry)
        if not stat.S_ISDIR(os.lstat(victim).st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        self._check_empty(victim)
        aside = os.path.join(dir_path, _tmp_name())
        os.rename(victim, aside)  # the name disappears in one step; a crash leaves only a leftover
        remove_leftover(aside)
        self.unprepare(dir_path, en)

    def unlink(self, dir_path: bytes, en: EntryName) -> None:
        os.unlink(os.path.join(dir_path, en.entry))
        self.unprepare(dir_path, en)

    def _replace_dir(self, old: bytes, new: bytes, new_dir: bytes) -> bool:
        """rename(2) of a directory onto an empty one: the backing one still holds its id file.

        The empty target is first renamed aside, then the source takes its name; returns False
        when this is not such a rename (plain rename(2) then gives the right result or errno).
        """
        try:
            nst = os.lstat(new)
        except FileNotFoundError:
            return False
        ost = os.lstat(old)
        if not (stat.S_ISDIR(nst.st_mode) and stat.S_ISDIR(ost.st_mode)) or os.path.samestat(ost, nst):
            return False
        self._check_empty(new)
        aside = os.path.join(new_dir, _tmp_name())
        os.rename(new, aside)
        try:
            os.rename(old, new)
        except BaseException:
            os.rename(aside, new)
            raise
        remove_leftover(aside)
        return True

    def rename(self, old_dir: bytes, old: EntryName, new_dir: bytes, new: EntryName, flags: int) -> None:
        """Move an entry; only its name is re-encrypted (content and a directory's id move with it)."""
        old_path, new_path = os.path.join(old_dir, old.entry), os.path.join(new_dir, new.entry)
        if flags & RENAME_EXCHANGE:
            renameat2(old_path, new_path, flags)  # both names stay in use: their sidecars stay valid
            return
        self.prepare(new_dir, new)
        try:
            if flags or not self._replace_dir(old_path, new_path, new_dir):
                _rename(old_path, new_path, flags)
        except BaseException:
            self.unprepare(new_dir, new)
            raise
        self.unprepare(old_dir, old)

    def store_target(self, dk: DirKey, target: bytes) -> bytes:
        return self._codec(dk).encrypt_target(target)

    def load_target(self, dk: DirKey, stored: bytes) -> bytes:
        codec = self._codec(dk)
        target = self._targets.get((codec, stored))
        if target is None:
            target = codec.decrypt_target(stored)
            self._targets.put((codec, stored), target)
        return target
