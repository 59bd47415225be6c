"""Offline restore: decrypt a whole store, a subtree or one backing file without mounting.

A file that fails authentication part-way is never written out as if complete: the
authentic prefix goes to NAME.vcfs-partial and the problem is reported, so a restore never
hands back garbage under a recording's real name.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

from vcfs.core.layout import BLOCK_SIZE
from vcfs.core.names import NAME_MAX
from vcfs.errors import IntegrityError, UsageError, VcfsError
from vcfs.longpath import LongPath
from vcfs.namepaths import Walked
from vcfs.namepaths import walk as walk_names
from vcfs.offline import OfflineStore, subtree

CHUNK = 16 * BLOCK_SIZE
PARTIAL_SUFFIX = ".vcfs-partial"


@dataclass
class ExportReport:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    problems: list[dict[str, str]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 2 if self.problems else 0

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "exit_code": self.exit_code}


def decrypt_to(store: OfflineStore, backing_file: Path, out: BinaryIO) -> int:
    """Stream one file's plaintext to ``out``; raises at the first unauthentic block."""
    cf = store.open_file(backing_file)
    try:
        done = 0
        while done < cf.size:
            try:
                chunk = cf.read(done, CHUNK)
            except IntegrityError:
                # Keep every authentic block before the damaged one; the damaged one raises.
                end = min(done + CHUNK, cf.size)
                while done < end:
                    block = cf.read(done, BLOCK_SIZE)
                    out.write(block)
                    done += len(block)
                continue
            out.write(chunk)
            done += len(chunk)
        return done
    finally:
        cf.close()


def _export_file(store: OfflineStore, src: Path, plain: str, dest: Path, report: ExportReport) -> None:
    tmp = partial_path(dest)
    try:
        with open(tmp, "wb") as out:
            report.bytes += decrypt_to(store, src, out)
    except (IntegrityError, VcfsError) as exc:
        report.problems.append({"path": plain, "backing": _rel(store, src), "error": exc.message, "partial": str(tmp)})
        return
    os.replace(tmp, dest)
    report.files += 1


def partial_path(dest: Path) -> Path:
    """Where the authentic prefix of ``dest`` goes: NAME.vcfs-partial, NAME cut to fit 255 bytes."""
    room = NAME_MAX - len(PARTIAL_SUFFIX)
    return dest.with_name(os.fsdecode(os.fsencode(dest.name)[:room]) + PARTIAL_SUFFIX)


def _rel(store: OfflineStore, path: Path) -> str:
    return str(path.relative_to(store.tree))


def _copy_meta(st: os.stat_result, dest: Path) -> None:
    if os.geteuid() == 0:
        os.lchown(dest, st.st_uid, st.st_gid)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dest, stat.S_IMODE(st.st_mode))
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _entries(store: OfflineStore, root: Path, plain_root: str) -> tuple[list[Walked], str]:
    """What to restore below ``root`` (plaintext ``plain_root``), and the plaintext base it is relative to."""
    st = root.lstat()
    if not stat.S_ISDIR(st.st_mode):
        parent = os.fsencode(root.parent)
        dk = store.names.dir_key(parent, os.fsencode(os.path.dirname(plain_root)))
        return [Walked(os.fsencode(root), st, os.fsencode(plain_root), None, dk)], os.path.dirname(plain_root)
    return list(walk_names(store.names, os.fsencode(root), os.fsencode(plain_root))), plain_root


def export(
    store: OfflineStore, subpath: str | None, dest: Path, progress: Callable[[int, int], None] | None = None
) -> ExportReport:
    """Restore the tree (or the subtree at plaintext ``subpath``) into ``dest`` under its real names."""
    root, plain_root = subtree(store, subpath)
    dest = LongPath(dest)  # targets as deep as the tree they restore
    report = ExportReport()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UsageError(f"{dest} exists and is not an empty directory", hint="export into a new directory")
    entries, base = _entries(store, root, plain_root)
    dest.mkdir(parents=True, exist_ok=True)
    total = sum(w.st.st_size for w in entries if w.st is not None and stat.S_ISREG(w.st.st_mode)) or 1
    done = 0
    dirs: list[tuple[os.stat_result, LongPath]] = []
    for w in entries:
        src = Path(os.fsdecode(w.backing))
        if w.plain is None or w.st is None or w.problem is not None:
            report.problems.append({"path": _rel(store, src), "backing": _rel(store, src), "error": w.problem or ""})
            continue
        plain, st = os.fsdecode(w.plain), w.st
        target = dest / os.path.relpath(plain, base)
        if stat.S_ISDIR(st.st_mode):
            target.mkdir()
            dirs.append((st, target))
            report.dirs += 1
            continue
        if stat.S_ISLNK(st.st_mode):
            try:
                link = store.names.load_target(w.parent, os.readlink(os.fsencode(src)))
            except VcfsError as exc:
                report.problems.append({"path": plain, "backing": _rel(store, src), "error": exc.message})
                continue
            os.symlink(link, target)
            report.symlinks += 1
        elif stat.S_ISREG(st.st_mode):
            _export_file(store, src, plain, target, report)
            done += st.st_size
            if not target.exists():
                continue
        else:
            continue  # fifos and sockets carry no recording
        _copy_meta(st, target)
        if progress:
            progress(done, total)
    for st, target in reversed(dirs):  # after their contents, so mtimes stick
        _copy_meta(st, target)
    return report


def decrypt_file(store: OfflineStore, backing_file: Path, out_path: str) -> int:
    backing_file = LongPath(backing_file)
    if out_path == "-":
        return decrypt_to(store, backing_file, os.fdopen(os.dup(1), "wb"))
    out = Path(out_path)
    if out.exists():
        raise UsageError(f"{out} exists; refusing to overwrite it")
    tmp = partial_path(out)
    try:
        with open(tmp, "wb") as f:
            size = decrypt_to(store, backing_file, f)
    except VcfsError as exc:
        exc.hint = f"the authentic part before the damage is in {tmp}"
        raise
    os.replace(tmp, out)
    return size
