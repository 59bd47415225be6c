"""POSIX conformance, pjdfstest style: the same calls on a plain directory and on the mount.

Each case is a short script of system calls run in a fresh directory. What it records is the
result (a value or the errno name) of every call and, after every call, the state of the
watched paths: mode, owner, link count, size, and which of atime, mtime and ctime the call
changed. The traces from the plain directory and from the mount must be equal. Cases cover
chmod, chown, link, mkdir, open, rename, rmdir, symlink, truncate, unlink and utimensat, with
their error paths (ENOENT, EEXIST, ENOTDIR, EISDIR, ENOTEMPTY, EINVAL, ELOOP, ENAMETOOLONG,
EPERM, EACCES, EXDEV-free renames, ...). They run as root and, in a forked child after
setresuid/setresgid to an unprivileged user with no groups, as that user, where permission
checks decide.

How a timestamp change is seen: before each call the watched paths get old atime/mtime (set
through the same root) and the test waits past the timestamp granularity, so a call that
updates a time moves it to "now". Differences inherent to a FUSE overlay are not hidden
here; they are listed in docs/RELIABILITY.md, "Conformance", and this file checks each of
them explicitly in ``INHERENT``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Mounted, open_to_other_users

pytestmark = pytest.mark.mount

OLD = 1_000_000_000_000_000_000  # ns: 2001-09-09, far from "now"
TICK = 0.02  # seconds: past the kernel's timestamp granularity (jiffies)
NOBODY = 65534
_libc = ctypes.CDLL(None, use_errno=True)


class Case:
    """A recorder of calls and of what they did to the watched paths."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.trace: list[Any] = []
        self.watch: list[str] = []

    def p(self, name: str) -> str:
        return os.path.join(self.root, name)

    def _times(self) -> dict[str, tuple[int, int, int] | None]:
        out: dict[str, tuple[int, int, int] | None] = {}
        for name in self.watch:
            try:
                st = os.lstat(self.p(name))
                out[name] = (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)
            except OSError:
                out[name] = None
        return out

    def _state(self, before: dict[str, tuple[int, int, int] | None]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.watch:
            try:
                st = os.lstat(self.p(name))
            except OSError as exc:
                out[name] = errno.errorcode[exc.errno or 0]
                continue
            old = before.get(name)
            times = (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)
            was = old or (0, 0, 0)
            changed = "".join(f for f, t, w in zip("amc", times, was, strict=True) if not old or t != w)
            kind = stat.S_IFMT(st.st_mode)
            size = st.st_size if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode) else None
            out[name] = (oct(st.st_mode), st.st_uid, st.st_gid, st.st_nlink, size, changed, kind)
        return out

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one call; record its result (or errno) and what it changed."""
        for name in self.watch:  # make any time the call sets visible
            with contextlib.suppress(OSError):
                os.utime(self.p(name), ns=(OLD, OLD), follow_symlinks=False)
        time.sleep(TICK)
        before = self._times()
        try:
            result: Any = fn()
            if isinstance(result, os.stat_result):
                result = (oct(result.st_mode), result.st_nlink, result.st_size)
            if isinstance(result, int) and what.startswith("open"):
                os.close(result)
                result = "fd"
        except OSError as exc:
            result = errno.errorcode[exc.errno or 0]
        self.trace.append((what, result, self._state(before)))
        return result


def _renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), ctypes.c_uint(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _write(path: str, data: bytes = b"data") -> None:
    with open(path, "wb") as f:
        f.write(data)


# ---- the cases: each gets a Case rooted in a fresh directory ------------------------------


def case_chmod(c: Case) -> None:
    _write(c.p("f"))
    os.symlink("f", c.p("l"))
    os.mkdir(c.p("d"))
    c.watch = ["f", "l", "d", "."]
    c.call("chmod 0600", lambda: os.chmod(c.p("f"), 0o600))
    c.call("chmod via symlink", lambda: os.chmod(c.p("l"), 0o640))
    c.call("chmod setuid/setgid/sticky", lambda: os.chmod(c.p("f"), 0o7755))
    c.call("chmod dir", lambda: os.chmod(c.p("d"), 0o700))
    c.call("chmod same mode", lambda: os.chmod(c.p("d"), 0o700))
    c.call("chmod missing", lambda: os.chmod(c.p("nope"), 0o600))
    c.call("chmod through a file", lambda: os.chmod(c.p("f/x"), 0o600))
    c.call("chmod long name", lambda: os.chmod(c.p("n" * 256), 0o600))


def case_chown(c: Case) -> None:
    _write(c.p("f"))
    os.chmod(c.p("f"), 0o6755)
    os.symlink("f", c.p("l"))
    c.watch = ["f", "l"]
    me, grp = os.getuid(), os.getgid()
    c.call("chown to self", lambda: os.chown(c.p("f"), me, grp))
    c.call("chown -1 -1", lambda: os.chown(c.p("f"), -1, -1))
    c.call("chown to other user", lambda: os.chown(c.p("f"), 4242, -1))
    c.call("chown group", lambda: os.chown(c.p("f"), -1, 4343))
    c.call("lchown symlink", lambda: os.chown(c.p("l"), 4444, 4444, follow_symlinks=False))
    c.call("chown missing", lambda: os.chown(c.p("nope"), me, grp))


def case_link(c: Case) -> None:
    _write(c.p("f"))
    os.mkdir(c.p("d"))
    c.watch = ["f", "g", "d", "."]
    c.call("link", lambda: os.link(c.p("f"), c.p("g")))
    c.call("link to existing", lambda: os.link(c.p("f"), c.p("g")))
    c.call("link a directory", lambda: os.link(c.p("d"), c.p("d2")))
    c.call("link missing", lambda: os.link(c.p("nope"), c.p("x")))
    c.call("link into missing dir", lambda: os.link(c.p("f"), c.p("nodir/x")))
    c.call("stat link", lambda: os.stat(c.p("g")))
    c.call("unlink one link", lambda: os.unlink(c.p("g")))


def case_mkdir(c: Case) -> None:
    c.watch = [".", "d"]
    c.call("mkdir 0755", lambda: os.mkdir(c.p("d"), 0o755))
    c.call("mkdir existing", lambda: os.mkdir(c.p("d")))
    c.call("mkdir 0700", lambda: os.mkdir(c.p("d/e"), 0o700))
    c.call("mkdir odd mode 0123", lambda: os.mkdir(c.p("d/o"), 0o123))
    c.call("mkdir sticky", lambda: os.mkdir(c.p("d/s"), 0o1777))
    c.call("mkdir in missing dir", lambda: os.mkdir(c.p("nope/x")))
    c.call("mkdir long name", lambda: os.mkdir(c.p("n" * 256)))
    _write(c.p("f"))
    c.call("mkdir over file", lambda: os.mkdir(c.p("f")))
    c.call("mkdir under file", lambda: os.mkdir(c.p("f/x")))


def case_open(c: Case) -> None:
    _write(c.p("f"), b"0123456789")
    os.mkdir(c.p("d"))
    os.symlink("f", c.p("l"))
    c.watch = ["f", "n", ".", "d"]
    c.call("open O_CREAT new 0640", lambda: os.open(c.p("n"), os.O_CREAT | os.O_WRONLY, 0o640))
    c.call("open O_CREAT|O_EXCL existing", lambda: os.open(c.p("f"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    c.call("open O_TRUNC", lambda: os.open(c.p("f"), os.O_WRONLY | os.O_TRUNC))
    c.call("open O_RDONLY", lambda: os.open(c.p("f"), os.O_RDONLY))
    c.call("open missing", lambda: os.open(c.p("nope"), os.O_RDONLY))
    c.call("open dir O_WRONLY", lambda: os.open(c.p("d"), os.O_WRONLY))
    c.call("open file O_DIRECTORY", lambda: os.open(c.p("f"), os.O_RDONLY | os.O_DIRECTORY))
    c.call("open symlink O_NOFOLLOW", lambda: os.open(c.p("l"), os.O_RDONLY | os.O_NOFOLLOW))
    c.call("open through a file", lambda: os.open(c.p("f/x"), os.O_RDONLY))
    c.call("open long name", lambda: os.open(c.p("n" * 256), os.O_CREAT | os.O_WRONLY))
    c.call("open O_CREAT trailing slash", lambda: os.open(c.p("t/"), os.O_CREAT | os.O_WRONLY))
    os.chmod(c.p("n"), 0o400)
    c.call("open read-only file for writing", lambda: os.open(c.p("n"), os.O_WRONLY))


def case_rename(c: Case) -> None:
    _write(c.p("a"))
    _write(c.p("b"))
    os.mkdir(c.p("d"))
    os.mkdir(c.p("e"))
    _write(c.p("e/x"))
    os.mkdir(c.p("d/sub"))
    c.watch = ["a", "b", "c", "d", "e", ".", "d/a"]
    c.call("rename file over file", lambda: os.rename(c.p("a"), c.p("b")))
    c.call("rename file to new name", lambda: os.rename(c.p("b"), c.p("c")))
    c.call("rename into dir", lambda: os.rename(c.p("c"), c.p("d/a")))
    c.call("rename to itself", lambda: os.rename(c.p("d/a"), c.p("d/a")))
    c.call("rename file over dir", lambda: os.rename(c.p("d/a"), c.p("e")))
    c.call("rename dir over file", lambda: os.rename(c.p("e"), c.p("d/a")))
    c.call("rename dir over non-empty dir", lambda: os.rename(c.p("d"), c.p("e")))
    c.call("rename dir into itself", lambda: os.rename(c.p("d"), c.p("d/sub/x")))
    c.call("rename missing", lambda: os.rename(c.p("nope"), c.p("x")))
    c.call("rename . ", lambda: os.rename(c.p("d/."), c.p("x")))
    _write(c.p("a"))
    c.call("renameat2 NOREPLACE existing", lambda: _renameat2(c.p("a"), c.p("d/a"), 1))
    c.call("renameat2 EXCHANGE", lambda: _renameat2(c.p("a"), c.p("d"), 2))
    c.call("rename dir over empty dir", lambda: os.rename(c.p("a"), c.p("e/x")))


def case_rmdir(c: Case) -> None:
    os.makedirs(c.p("d/e"))
    _write(c.p("f"))
    c.watch = [".", "d"]
    c.call("rmdir non-empty", lambda: os.rmdir(c.p("d")))
    c.call("rmdir file", lambda: os.rmdir(c.p("f")))
    c.call("rmdir missing", lambda: os.rmdir(c.p("nope")))
    c.call("rmdir dot", lambda: os.rmdir(c.p("d/.")))
    c.call("rmdir", lambda: os.rmdir(c.p("d/e")))
    c.call("rmdir parent", lambda: os.rmdir(c.p("d")))


def case_symlink(c: Case) -> None:
    _write(c.p("f"))
    c.watch = [".", "s", "f"]
    c.call("symlink", lambda: os.symlink("f", c.p("s")))
    c.call("readlink", lambda: os.readlink(c.p("s")))
    c.call("symlink existing", lambda: os.symlink("f", c.p("s")))
    c.call("symlink dangling", lambda: os.symlink("nowhere", c.p("dang")))
    c.call("open dangling", lambda: os.open(c.p("dang"), os.O_RDONLY))
    # 3023 bytes: the longest target a store with encrypted names keeps (docs/FORMAT.md "Names");
    # a plain filesystem takes up to 4095, see test_symlink_target_limit_with_encrypted_names.
    c.call("symlink 3023-byte target", lambda: os.symlink("t" * 3023, c.p("long")))
    c.call("symlink 4096-byte target", lambda: os.symlink("t" * 4096, c.p("longer")))
    c.call("readlink long", lambda: len(os.readlink(c.p("long"))))
    c.call("readlink of a file", lambda: os.readlink(c.p("f")))
    os.symlink("loop", c.p("loop"))
    c.call("open a loop", lambda: os.open(c.p("loop"), os.O_RDONLY))


def case_truncate(c: Case) -> None:
    _write(c.p("f"), b"x" * 100_000)
    os.mkdir(c.p("d"))
    c.watch = ["f"]
    c.call("truncate smaller", lambda: os.truncate(c.p("f"), 70_000))
    c.call("truncate larger", lambda: os.truncate(c.p("f"), 200_000))
    c.call("truncate same size", lambda: os.truncate(c.p("f"), 200_000))
    c.call("truncate to 0", lambda: os.truncate(c.p("f"), 0))
    c.call("truncate negative", lambda: os.truncate(c.p("f"), -1))
    c.call("truncate dir", lambda: os.truncate(c.p("d"), 0))
    c.call("truncate missing", lambda: os.truncate(c.p("nope"), 0))
    os.chmod(c.p("f"), 0o444)
    c.call("truncate read-only file", lambda: os.truncate(c.p("f"), 5))


def case_unlink(c: Case) -> None:
    _write(c.p("f"))
    os.link(c.p("f"), c.p("g"))
    os.mkdir(c.p("d"))
    os.symlink("f", c.p("l"))
    c.watch = [".", "g", "f"]
    c.call("unlink with a second link", lambda: os.unlink(c.p("f")))
    c.call("unlink dir", lambda: os.unlink(c.p("d")))
    c.call("unlink missing", lambda: os.unlink(c.p("nope")))
    c.call("unlink symlink", lambda: os.unlink(c.p("l")))
    c.call("unlink last link", lambda: os.unlink(c.p("g")))


def case_read(c: Case) -> None:
    """Not one of the calls above: here only to pin down how atime behaves (see INHERENT)."""
    _write(c.p("f"), b"x" * 5000)
    c.watch = ["f"]
    c.call("read", lambda: len(Path(c.p("f")).read_bytes()))


def case_utimensat(c: Case) -> None:
    _write(c.p("f"))
    os.symlink("f", c.p("l"))
    c.watch = ["f", "l"]
    c.call("utimens explicit ns", lambda: os.utime(c.p("f"), ns=(1_234_567_891_123_456_789, 987_654_321_987_654_321)))
    c.call("stat ns", lambda: (os.stat(c.p("f")).st_atime_ns, os.stat(c.p("f")).st_mtime_ns))
    c.call("utimens now", lambda: os.utime(c.p("f")))
    c.call("utimens symlink nofollow", lambda: os.utime(c.p("l"), ns=(5, 6), follow_symlinks=False))
    c.call("utimens missing", lambda: os.utime(c.p("nope"), ns=(5, 6)))
    c.call("utimens negative time", lambda: os.utime(c.p("f"), ns=(-1_000_000_000, -1_000_000_000)))


CASES: dict[str, Callable[[Case], None]] = {
    "chmod": case_chmod,
    "chown": case_chown,
    "link": case_link,
    "mkdir": case_mkdir,
    "open": case_open,
    "rename": case_rename,
    "rmdir": case_rmdir,
    "symlink": case_symlink,
    "truncate": case_truncate,
    "unlink": case_unlink,
    "utimensat": case_utimensat,
    "read": case_read,
}

# Differences inherent to a FUSE overlay with the kernel's writeback cache (docs/RELIABILITY.md,
# "Conformance"). Each is checked as it is, so a kernel that changes shows up here:
# (case, call, watched path) -> (what changes on a plain directory, what changes on the mount).
INHERENT: dict[tuple[str, str, str], tuple[str, str]] = {
    # The kernel keeps mtime/ctime of files itself and stamps them only when the size changes;
    # it also ignores the times the daemon reports for such files, so vcfs cannot add them.
    ("truncate", "truncate same size", "f"): ("mc", ""),
    # Reads are mostly served from the kernel's page cache and never reach the daemon, and the
    # kernel keeps no atime of its own for FUSE: reads do not move atime (as with noatime).
    ("read", "read", "f"): ("a", ""),
}


def run_case(name: str, root: str) -> list[Any]:
    os.mkdir(root)
    c = Case(root)
    CASES[name](c)
    return c.trace


def run_as(uid: int, name: str, root: str) -> list[Any]:
    """run_case in a forked child that dropped to ``uid`` (no groups); the trace comes back as JSON."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            with os.fdopen(write, "w") as out:
                json.dump(run_case(name, root), out)
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"child for {name} as uid {uid} failed"
    return json.loads(data)


def _normalize(trace: list[Any]) -> list[Any]:
    return json.loads(json.dumps(trace))


def test_same_results_as_a_plain_directory_as_root(mounted: Mounted, tmp_path: Path) -> None:
    os.umask(0o022)
    for name in CASES:
        plain = run_case(name, str(tmp_path / f"plain-{name}"))
        mount = run_case(name, str(mounted.mnt / name))
        _compare(name, _normalize(plain), _normalize(mount))


def test_same_results_as_a_plain_directory_as_a_user(
    mounted: Mounted, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    os.umask(0o022)
    open_to_other_users(tmp_path, tmp_path_factory)  # let the user reach its directories
    plain_parent, mount_parent = tmp_path / "plain-parent", mounted.mnt / "user"
    for d in (plain_parent, mount_parent):
        d.mkdir()
        os.chown(d, NOBODY, NOBODY)
    for name in CASES:
        plain = run_as(NOBODY, name, str(plain_parent / name))
        mount = run_as(NOBODY, name, str(mount_parent / name))
        _compare(name, plain, mount)


def _compare(name: str, plain: list[Any], mount: list[Any]) -> None:
    for p, m in zip(plain, mount, strict=True):
        for (case, call, path), (on_plain, on_mount) in INHERENT.items():
            if case == name and p[0] == call:
                assert p[2][path][5] == on_plain, f"{call}: plain directory changed {p[2][path][5]!r}"
                assert m[2][path][5] == on_mount, f"{call}: mount changed {m[2][path][5]!r}"
                m[2][path][5] = on_plain  # the known difference; the rest must still agree
    diffs = [(p[0], p[1:], m[1:]) for p, m in zip(plain, mount, strict=True) if p != m]
    assert not diffs, f"{name}: mount differs from a plain directory:\n" + "\n".join(
        f"  {what}:\n    plain {p}\n    mount {m}" for what, p, m in diffs
    )


def test_symlink_target_limit_with_encrypted_names(mounted: Mounted) -> None:
    """The one documented difference of encrypted names: targets of 3024-4095 bytes are refused
    (ENAMETOOLONG), because the stored, encrypted target must fit the backing symlink."""
    with pytest.raises(OSError) as err:
        os.symlink("t" * 3024, mounted.mnt / "too-long")
    assert err.value.errno == errno.ENAMETOOLONG
    os.symlink("t" * 3023, mounted.mnt / "longest")
    assert os.readlink(mounted.mnt / "longest") == "t" * 3023
