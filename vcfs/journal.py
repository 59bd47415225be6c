"""The store's journal: BACKING/journal/<file id hex>, one small file per file being rewritten.

Storage only (no cryptography): the records are codec'd by vcfs.core.journal, and CryptFile
decides what goes in (docs/RELIABILITY.md, "Crash"). What this module promises:

- ``FileJournal.save(..., durable=True)`` returns only once the records are on disk
  (fdatasync; the first time also an fsync of the journal directory, so the file's name
  survives a power loss). ``durable=False`` only writes them: enough against kill -9, which
  never loses a completed write. Only then may the caller overwrite the blocks it saved.
- ``FileJournal.reset`` is free: the next save rewrites the file from offset 0 under a higher
  epoch, and readers ignore whatever older records follow (vcfs.core.journal.parse_records).
- A journal file is removed only once the blocks it protects are durable (the caller syncs
  the backing file first), or after recovery applied it.

A file is found by its file id, not its path, so renames and hard links need no bookkeeping.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from vcfs.core.journal import Record, parse_records
from vcfs.store import fsync_dir, pwrite_all
from vcfs.storelayout import JOURNAL_DIR, TREE_DIR

_FILE_ID_HEX = 32


class Journal:
    """The journal directory of one store."""

    def __init__(self, backing: Path) -> None:
        self.dir = backing / JOURNAL_DIR
        self._tree = os.fsencode(backing / TREE_DIR) + b"/"
        self._dir_ready = False

    def path(self, file_id: bytes) -> Path:
        return self.dir / file_id.hex()

    def hint(self, backing_path: str | bytes) -> bytes:
        """The path of a backing file relative to the tree, as recovery's first guess."""
        raw = os.fsencode(backing_path)
        return raw[len(self._tree) :] if raw.startswith(self._tree) else raw

    def tree_path(self, hint: bytes) -> bytes:
        return self._tree + hint

    def ensure_dir(self) -> None:
        """Create BACKING/journal/ (and make its name durable) once per process."""
        if self._dir_ready:
            return
        try:
            self.dir.mkdir(mode=0o700)
            fsync_dir(str(self.dir.parent))
        except FileExistsError:
            pass
        self._dir_ready = True

    def create(self, file_id: bytes) -> int:
        """Open a fresh journal file for ``file_id`` (the directory is made if it went missing)."""
        for attempt in (1, 2):
            self.ensure_dir()
            try:
                return os.open(self.path(file_id), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                if attempt == 2:
                    raise
                self._dir_ready = False  # removed behind our back: make it again
        raise AssertionError("unreachable")

    def read(self, file_id: bytes) -> list[Record]:
        """The current records for ``file_id`` (none if it has no journal file)."""
        try:
            data = self.path(file_id).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [r for r in parse_records(data) if r.file_id == file_id]

    def remove(self, file_id: bytes) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(file_id).unlink()

    def entries(self) -> list[bytes]:
        """File ids that have a journal file."""
        try:
            names = os.listdir(self.dir)
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for name in sorted(names):
            if len(name) == _FILE_ID_HEX:
                with contextlib.suppress(ValueError):
                    out.append(bytes.fromhex(name))
        return out

    def for_file(self, file_id: bytes, backing_path: str | bytes) -> FileJournal:
        return FileJournal(self, file_id, self.hint(backing_path))


class FileJournal:
    """The journal of one open file. Not thread-safe: CryptFile calls it under its lock."""

    def __init__(self, journal: Journal, file_id: bytes, hint: bytes) -> None:
        self._journal = journal
        self.file_id = file_id
        self.hint = hint
        self._fd = -1
        self._created = False  # this session created the journal file
        self._dir_synced = False
        self.epoch = 1
        self._end = 0  # bytes of current-epoch records
        self._durable = False  # a current record was synced: it guards fsynced data

    def for_id(self, file_id: bytes) -> FileJournal:
        """The journal of the same backing file under a new file id (after DEK renewal)."""
        return FileJournal(self._journal, file_id, self.hint)

    @property
    def live(self) -> bool:
        """True if a current record guards fsynced data: the journal must stay until the backing
        file is synced."""
        return self._durable

    def mark(self) -> tuple[int, int]:
        return (self.epoch, self._end)

    def save(self, blocks: list[tuple[int, bytes]], durable: bool = True) -> None:
        """Append one record per (block number, sealed bytes); with ``durable``, sync them."""
        data = b"".join(Record(self.epoch, self.file_id, b, sealed, self.hint).encode() for b, sealed in blocks)
        if self._fd < 0:
            self._fd = self._journal.create(self.file_id)
            self._created = True
        pwrite_all(self._fd, data, self._end)
        self._end += len(data)
        if durable:
            os.fdatasync(self._fd)
            if not self._dir_synced:
                fsync_dir(str(self._journal.dir))
                self._dir_synced = True
            self._durable = True

    def reset(self, mark: tuple[int, int] | None = None) -> None:
        """Forget the records (the blocks they protect are synced); with ``mark``, only if none
        was added since ``mark()`` returned it."""
        if mark is not None and mark != self.mark():
            return
        if self._end:
            self.epoch += 1
            self._end = 0
            self._durable = False

    def discard(self) -> None:
        """Close and delete the journal file. The caller has synced what it protected."""
        self.close()
        if self._created:
            self._journal.remove(self.file_id)
            self._created = self._dir_synced = False
        self._end = 0
        self._durable = False

    def close(self) -> None:
        """Close the file but keep it on disk (its records may still be needed)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
