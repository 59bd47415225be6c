"""Names inside a backing directory. One place, so fsck, restore and the mount agree.

    BACKING/vcfs.conf    store config (TOML, no secrets)
    BACKING/vcfs.lock    held (flock) by the one daemon serving the store; holds its pid
    BACKING/files/       the encrypted tree: one backing file per plaintext file,
                         directories and symlinks mirrored
    BACKING/journal/     copies of blocks being rewritten in place, per file id (crash safety)
    BACKING/renew/       transient: re-encrypted copies during DEK renewal (vcfs/renew.py)
Keeping the tree in its own directory means no plaintext name is reserved for vcfs.
"""

from __future__ import annotations

from pathlib import Path

TREE_DIR = "files"
LOCK_NAME = "vcfs.lock"


def tree_path(backing: Path) -> Path:
    return backing / TREE_DIR


def lock_path(backing: Path) -> Path:
    return backing / LOCK_NAME


QUARANTINE_DIR = "quarantine"  # fsck --repair keeps removed ciphertext here
JOURNAL_DIR = "journal"  # see vcfs/journal.py
RENEW_DIR = "renew"  # DEK renewal writes a file's re-encrypted copy here, then swaps it in


def renew_path(backing: Path) -> Path:
    return backing / RENEW_DIR
