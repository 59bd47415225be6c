"""Store-wide crash recovery at mount time: apply every journal a dead daemon left behind.

After kill -9 or a power loss, BACKING/journal/ may hold copies of blocks that were being
rewritten in place. Opening a file with the journal restores its torn blocks (vcfs/recovery.py),
so this only opens each journaled file once, found through the path hint in its records,
before the mount starts serving: sizes in stat() are right at once, and the journal is gone.
A file whose hint no longer leads to it (renamed before the crash) is recovered when it is
next opened, or by ``vcfs fsck --repair``, which matches journals to files by file id.

The caller holds the store lock: only the store's one writer may write restored blocks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from vcfs.cryptfile import open_cryptfile
from vcfs.errors import VcfsError
from vcfs.journal import Journal
from vcfs.keys.base import Wrapped
from vcfs.store import open_backing

log = logging.getLogger("vcfs.sweep")


def recover_store(
    journal: Journal,
    unwrap: Callable[[Wrapped], bytes | bytearray],
    describe: Callable[[bytes], str] = os.fsdecode,
) -> int:
    """Recover every file that has a journal; returns the number of blocks restored.

    ``describe`` names a backing path in log lines (the mount adds the plaintext path).
    """
    restored = 0
    for file_id in journal.entries():
        records = journal.read(file_id)
        if not records:
            # Nothing parses: the crash hit the journal write itself, before any block was
            # written over (a block is rewritten only after its copy is synced).
            journal.remove(file_id)
            continue
        path = journal.tree_path(records[0].hint)
        label = describe(path)
        try:
            fd = open_backing(path)
        except OSError as exc:
            log.info("journal %s: %s: %s; recovered when the file is opened", file_id.hex(), label, exc.strerror)
            continue
        try:
            cf = open_cryptfile(fd, label, unwrap, allow_damaged=True, journal=journal)
        except VcfsError as exc:
            os.close(fd)
            log.error("journal %s: cannot open %s: %s", file_id.hex(), label, exc.message)
            continue
        except BaseException:
            os.close(fd)
            raise
        restored += len(cf.restored)
        cf.close()
    return restored
