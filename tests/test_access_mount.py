"""Access policy and audit trail on real mounts, driven by real processes under other uids.

Callers are real processes started with ``setpriv --reuid/--regid --clear-groups`` (uid 2001:
the recorder, 2002: a reviewer, 2003: anyone else) running real programs; one principal is
defined by its executable, a copy of /bin/cat at a path of its own. The daemon is the real
vcfs daemon; its audit log is read back and checked with the real ``vcfs audit verify``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from audit_helpers import lines, verify, wait_for
from conftest import Mounted, is_mounted, open_to_other_users, require, run_vcfs

from vcfs.core.layout import block_no_to_cipher_off
from vcfs.runpaths import pid_file

pytestmark = pytest.mark.mount

RECORDER, REVIEWER, OTHER = 2001, 2002, 2003


@dataclass
class Guarded(Mounted):
    policy: Path | None = None
    audit: Path | None = None
    log_file: Path | None = None

    def mount(self) -> None:
        extra = ["--policy", str(self.policy)] if self.policy else []
        extra += ["--audit-dir", str(self.audit)] if self.audit else []
        extra += ["--log-file", str(self.log_file)] if self.log_file else []
        run_vcfs("mount", str(self.backing), str(self.mnt), *extra)

    def daemon_pid(self) -> int:
        return int(pid_file(self.mnt).read_text())

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        assert self.audit is not None
        recs = [rec for _p, _i, rec in lines(self.audit)]
        return [r for r in recs if event is None or r["event"] == event]


@pytest.fixture
def guarded(store: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guarded]:
    require(os.geteuid() == 0, "root (setpriv to other uids, allow_other)")
    require(os.path.exists("/dev/fuse"), "/dev/fuse")
    require(shutil.which("setpriv") is not None, "setpriv (util-linux)")
    open_to_other_users(tmp_path, tmp_path_factory)  # other uids must reach the mount point and the programs
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = Guarded(store, mnt, tmp_path / "policy.toml", tmp_path / "audit", tmp_path / "daemon.log")
    try:
        yield m
    finally:
        m.cleanup()


def as_user(uid: int, *cmd: str | Path) -> subprocess.CompletedProcess[str]:
    argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *map(str, cmd)]
    return subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=120)


def ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, f"{res.args} failed ({res.returncode}): {res.stderr}"
    return res.stdout


def refused(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode != 0 and "Permission denied" in res.stderr, f"{res.args}: {res.returncode} {res.stderr}"


def _viewer(tmp_path: Path) -> Path:
    exe = tmp_path / "bin" / "review-cat"
    exe.parent.mkdir(exist_ok=True)
    shutil.copy2(os.path.realpath("/bin/cat"), exe)
    os.chmod(exe.parent, 0o755)
    return exe


def _policy(viewer: Path, extra: str = "") -> str:
    return f"""
[policy.principals.recorder]
uids = [{RECORDER}]

[policy.principals.reviewer]
uids = [{REVIEWER}]
exes = ["{viewer}"]

[policy.principals.admin]
uids = [0]

[[policy.rules]]
paths = ["/rec/**"]
principals = ["recorder"]
allow = ["recorder"]

[[policy.rules]]
paths = ["/rec/**"]
principals = ["reviewer"]
allow = ["reader"]

[[policy.rules]]
paths = ["/**"]
principals = ["admin"]
allow = ["all"]
{extra}
"""


def test_operations_are_allowed_and_denied_per_principal_and_denials_are_audited(
    guarded: Guarded, tmp_path: Path
) -> None:
    viewer = _viewer(tmp_path)
    assert guarded.policy is not None
    guarded.policy.write_text(_policy(viewer))
    guarded.mount()
    rec = guarded.mnt / "rec"
    rec.mkdir()
    for d in (rec, guarded.mnt):
        d.chmod(0o777)  # POSIX lets everyone in: only the policy decides
    (guarded.mnt / "top.txt").write_text("admin only\n")
    clip = rec / "clip.txt"
    # the recorder creates, writes and appends; reading, listing, deleting, renaming, chmod are refused
    ok(as_user(RECORDER, "sh", "-c", f"umask 0; echo take-1 > {clip}"))
    ok(as_user(RECORDER, "sh", "-c", f"echo take-2 >> {clip}"))
    ok(as_user(RECORDER, "touch", "-m", "-d", "2026-01-02 03:04:05", clip))  # times: part of writing
    refused(as_user(RECORDER, "cat", clip))
    refused(as_user(RECORDER, "ls", rec))
    refused(as_user(RECORDER, "rm", clip))
    refused(as_user(RECORDER, "mv", clip, rec / "moved.txt"))
    refused(as_user(RECORDER, "chmod", "600", clip))
    refused(as_user(RECORDER, "sh", "-c", f"echo x > {guarded.mnt / 'outside.txt'}"))
    # the reviewer reads, but only through its own program, and only under /rec
    assert ok(as_user(REVIEWER, viewer, clip)) == "take-1\ntake-2\n"  # also warms the page cache
    refused(as_user(REVIEWER, "cat", clip))  # same uid, other program: cached pages are no way in
    refused(as_user(OTHER, viewer, clip))  # same program, other uid
    refused(as_user(REVIEWER, viewer, guarded.mnt / "top.txt"))
    refused(as_user(REVIEWER, "sh", "-c", f"echo x >> {clip}"))
    # admin may do everything
    os.rename(clip, rec / "renamed.txt")
    (rec / "renamed.txt").unlink()
    guarded.umount()

    sh = os.path.basename(os.path.realpath("/bin/sh"))  # dash on Debian
    denied = {(r["uid"], os.path.basename(r["exe"]), r["op"], r["path"]) for r in guarded.records("fs.denied")}
    assert denied == {
        (RECORDER, "cat", "read", "/rec/clip.txt"),
        (RECORDER, "ls", "list", "/rec"),
        (RECORDER, "rm", "delete", "/rec/clip.txt"),
        (RECORDER, "mv", "rename", "/rec/clip.txt"),
        (RECORDER, "chmod", "setattr", "/rec/clip.txt"),
        (RECORDER, sh, "create", "/outside.txt"),
        (REVIEWER, "cat", "read", "/rec/clip.txt"),
        (OTHER, "review-cat", "read", "/rec/clip.txt"),
        (REVIEWER, "review-cat", "read", "/top.txt"),
        (REVIEWER, sh, "write", "/rec/clip.txt"),
    }
    assert all(r["result"] == "ok" for r in guarded.records("fs.rename") + guarded.records("fs.unlink"))
    sessions = guarded.records("fs.session")
    reads = [s for s in sessions if s["uid"] == REVIEWER and s["exe"] == str(viewer) and s["path"] == "/rec/clip.txt"]
    assert reads and reads[0]["read"] == len("take-1\ntake-2\n") and reads[0]["as"] == ["reviewer"]
    writes = [s for s in sessions if s["uid"] == RECORDER and s["path"] == "/rec/clip.txt"]
    # bytes the kernel handed to the daemon: the append may come back as its whole (cached) page
    assert writes[0]["written"] == 7 and writes[1]["written"] in (7, 14) and writes[1]["flags"] == ["append"]
    assert len(writes) == 3 and all(w["as"] == ["recorder"] for w in writes)  # echo, echo >>, touch
    assert all(r["pid"] > 0 and r["tid"] > 0 and r["ts"].endswith("Z") for r in sessions)
    assert guarded.records("mount") and guarded.records("unmount")
    rc, report = verify(guarded.audit)  # type: ignore[arg-type]
    assert rc == 0, report
    # the same, as a person would ask for it
    shown = run_vcfs("audit", "show", "--json", "--uid", str(RECORDER), "--event", "fs.denied", str(guarded.audit))
    assert len(shown.stdout.splitlines()) == 6
    summary = json.loads(run_vcfs("audit", "report", "--json", "--since", "1h", str(guarded.audit)).stdout)
    assert sum(d["count"] for d in summary["denials"]) == 10


def _record(out: Path, *, faststart: bool) -> list[str]:
    cmd = [
        "ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
        "testsrc=duration=3:size=320x240:rate=25", "-vf", "noise=alls=12:allf=t", "-c:v", "mpeg4", "-q:v", "4",
        "-threads", "1", "-fflags", "+bitexact",
    ]  # fmt: skip
    return [*cmd, *(["-movflags", "+faststart"] if faststart else []), str(out)]


def test_recorder_records_with_faststart_but_cannot_read_back_a_finished_file(guarded: Guarded, tmp_path: Path) -> None:
    require(shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None, "ffmpeg")
    ffmpeg = os.path.realpath(shutil.which("ffmpeg") or "")
    assert guarded.policy is not None
    guarded.policy.write_text(
        _policy(_viewer(tmp_path)).replace(f"uids = [{RECORDER}]", f'uids = [{RECORDER}]\nexes = ["{ffmpeg}"]')
    )
    guarded.mount()
    (guarded.mnt / "rec").mkdir(mode=0o777)
    os.chmod(guarded.mnt / "rec", 0o777)
    clip = guarded.mnt / "rec" / "clip.mp4"
    ok(as_user(RECORDER, *_record(clip, faststart=True)))  # re-opens its output read-only to move the index
    ok(subprocess.run(_record(tmp_path / "plain.mp4", faststart=True), capture_output=True, text=True))
    assert clip.read_bytes() == (tmp_path / "plain.mp4").read_bytes()  # root (admin) may read
    refused(as_user(RECORDER, "cat", clip))  # a plain reader under the recorder's uid
    probe = as_user(RECORDER, "ffmpeg", "-nostdin", "-v", "error", "-i", clip, "-f", "null", "-")
    assert probe.returncode != 0 and "Permission denied" in probe.stderr  # nor the recorder program itself
    guarded.umount()
    mine = [s for s in guarded.records("fs.session") if s["path"] == "/rec/clip.mp4" and s["uid"] == RECORDER]
    assert {tuple(s["flags"]) for s in mine} >= {("create", "trunc"), ()}
    assert any(s.get("readback") for s in mine) and all(s["result"] == "ok" for s in mine)
    assert {(r["exe"], r["op"]) for r in guarded.records("fs.denied")} == {("/usr/bin/cat", "read"), (ffmpeg, "read")}
    assert verify(guarded.audit)[0] == 0  # type: ignore[arg-type]


def _wait_reload(g: Guarded, count: int) -> dict[str, Any]:
    wait_for(lambda: len(g.records("policy.reload")) >= count, what="the policy reload record")
    return g.records("policy.reload")[count - 1]


def test_sighup_reloads_the_policy_and_a_broken_file_keeps_the_old_one(guarded: Guarded, tmp_path: Path) -> None:
    viewer = _viewer(tmp_path)
    assert guarded.policy is not None
    guarded.policy.write_text(_policy(viewer))
    guarded.mount()
    (guarded.mnt / "rec").mkdir(mode=0o777)
    os.chmod(guarded.mnt / "rec", 0o777)
    pid = guarded.daemon_pid()
    refused(as_user(OTHER, "sh", "-c", f"echo a > {guarded.mnt / 'rec' / 'other-1'}"))
    # a syntax error, then a file that parses but is wrong: both refused with their line
    broken = _policy(viewer) + "\n[[policy.rules]\n"
    guarded.policy.write_text(broken)
    os.kill(pid, signal.SIGHUP)
    first = _wait_reload(guarded, 1)
    assert first["result"] == "rejected" and f"line {len(broken.splitlines())}" in first["error"]
    bad = _policy(viewer, f'[policy.principals.other]\nuids = [{OTHER}]\n[[policy.rules]]\npaths = ["/rec/**"]\n'
                          'principals = ["other"]\nallow = ["crete"]\n')  # fmt: skip
    guarded.policy.write_text(bad)
    os.kill(pid, signal.SIGHUP)
    second = _wait_reload(guarded, 2)
    line = bad.splitlines().index('allow = ["crete"]') + 1
    assert second["result"] == "rejected" and second["problems"] == [
        f"line {line}: policy.rules[3].allow[0]: unknown operation 'crete' (operations: create, write, read, readback, "
        "list, delete, rename, setattr; roles: recorder, reader, all)"
    ]  # fmt: skip
    refused(as_user(OTHER, "sh", "-c", f"echo a > {guarded.mnt / 'rec' / 'other-2'}"))  # the old policy holds
    ok(as_user(RECORDER, "sh", "-c", f"echo a > {guarded.mnt / 'rec' / 'rec-1'}"))
    # a good file takes effect without a remount
    guarded.policy.write_text(bad.replace('"crete"', '"create", "write"'))
    os.kill(pid, signal.SIGHUP)
    third = _wait_reload(guarded, 3)
    assert third["result"] == "ok" and len(third["sha256"]) == 64
    ok(as_user(OTHER, "sh", "-c", f"echo a > {guarded.mnt / 'rec' / 'other-3'}"))
    guarded.umount()
    assert guarded.log_file is not None and "policy reload refused" in guarded.log_file.read_text()
    assert verify(guarded.audit)[0] == 0  # type: ignore[arg-type]


def test_alerts_fire_on_bulk_and_off_hours_reads_and_stay_quiet_while_recording(
    guarded: Guarded, tmp_path: Path
) -> None:
    viewer = _viewer(tmp_path)
    now = datetime.now(UTC)
    start, end = now + timedelta(hours=2), now + timedelta(hours=3)  # working hours that exclude now
    alerts = f"""
[alerts]
working_hours = "{start:%H}:00-{end:%H}:00"
working_days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
timezone = "UTC"
bulk_read_files = 5
bulk_read_bytes = "1 MiB"
known_uids = [{REVIEWER}, 0]
known_exes = ["{viewer}", "{os.path.realpath("/bin/cat")}"]
"""
    assert guarded.policy is not None
    guarded.policy.write_text(_policy(viewer) + alerts)
    guarded.mount()
    (guarded.mnt / "rec").mkdir(mode=0o777)
    os.chmod(guarded.mnt / "rec", 0o777)
    # a normal recording workload: segments written (and read back) by the recorder at night
    for i in range(8):
        seg = guarded.mnt / "rec" / f"seg-{i}.ts"
        ok(as_user(RECORDER, "sh", "-c", f"head -c 300000 /dev/urandom > {seg}"))
    if shutil.which("ffmpeg"):
        ok(as_user(RECORDER, *_record(guarded.mnt / "rec" / "clip.mp4", faststart=True)))
    wait_for(lambda: len(guarded.records("fs.session")) >= 8, what="the recording sessions")
    time.sleep(0.5)  # a batch period: anything the recording triggered is on disk now
    assert guarded.records("alert") == []
    # now someone reads everything, outside working hours
    for i in range(8):
        ok(as_user(REVIEWER, viewer, guarded.mnt / "rec" / f"seg-{i}.ts"))
    guarded.umount()
    fired = {r["rule"] for r in guarded.records("alert")}
    assert fired == {"off_hours", "bulk_read_files", "bulk_read_bytes"}, guarded.records("alert")
    assert all(r["principal"] == f"uid={REVIEWER} exe={viewer}" for r in guarded.records("alert"))
    assert guarded.log_file is not None
    daemon_log = guarded.log_file.read_text()
    assert "audit alert (bulk_read_files)" in daemon_log and "audit alert (off_hours)" in daemon_log
    assert verify(guarded.audit)[0] == 0  # type: ignore[arg-type]


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "audit-disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs-vcfs-audit", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def test_full_audit_disk_fails_closed_keeps_recording_and_recovers(
    guarded: Guarded, tiny_disk: Path, tmp_path: Path
) -> None:
    guarded.policy = None  # plain POSIX: only the audit trail's state decides here
    guarded.audit = tiny_disk / "audit"
    guarded.mount()
    (guarded.mnt / "old.bin").write_bytes(b"x" * 70000)
    filler = _fill(tiny_disk)
    log_file = guarded.log_file
    assert log_file is not None
    for i in range(400):  # records that no longer fit (the log's last page may still have room for a few)
        (guarded.mnt / f"new-{i}").write_bytes(b"y" * 1000)
        if "cannot write the audit log" in log_file.read_text():
            break
    wait_for(lambda: "cannot write the audit log" in log_file.read_text(), what="the degraded notice")
    assert "fail-closed" in log_file.read_text()
    with pytest.raises(PermissionError):
        (guarded.mnt / "old.bin").read_bytes()  # reading plaintext unaudited is refused
    with pytest.raises(PermissionError):
        (guarded.mnt / "old.bin").unlink()
    payload = os.urandom(3 * 65536 + 5)
    (guarded.mnt / "recording.bin").write_bytes(payload)  # recording goes on
    filler.unlink()
    wait_for(lambda: "writable again" in log_file.read_text(), what="recovery")
    assert (guarded.mnt / "old.bin").read_bytes() == b"x" * 70000
    assert (guarded.mnt / "recording.bin").read_bytes() == payload
    guarded.umount()
    degraded = guarded.records("audit.degraded")
    assert len(degraded) == 1 and degraded[0]["error"] == "No space left on device" and degraded[0]["lost"] == 0
    assert degraded[0]["mode"] == "fail-closed" and degraded[0]["since"] < degraded[0]["until"]
    denied = [r for r in guarded.records("fs.denied") if r["reason"] == "audit log unavailable"]
    assert {r["op"] for r in denied} == {"read", "delete"}
    assert any(s["path"] == "/recording.bin" and s["written"] == len(payload) for s in guarded.records("fs.session"))
    rc, report = verify(guarded.audit)
    assert rc == 0, report


def test_audit_dir_inside_the_store_is_refused(guarded: Guarded) -> None:
    guarded.policy = None
    guarded.audit = guarded.backing / "audit"
    res = run_vcfs("mount", str(guarded.backing), str(guarded.mnt), "--audit-dir", str(guarded.audit), check=False)
    assert res.returncode == 2 and "inside the backing store" in res.stderr and "Traceback" not in res.stderr
    assert not is_mounted(guarded.mnt)


def test_a_bad_policy_file_refuses_the_mount(guarded: Guarded) -> None:
    assert guarded.policy is not None
    guarded.policy.write_text('[policy]\n[[policy.rules]]\npaths = ["/**"]\nprincipals = ["*"]\nallow = ["fly"]\n')
    res = run_vcfs("mount", str(guarded.backing), str(guarded.mnt), "--policy", str(guarded.policy), check=False)
    assert res.returncode == 3 and "line 5: policy.rules[0].allow[0]: unknown operation 'fly'" in res.stderr
    assert "Traceback" not in res.stderr and not is_mounted(guarded.mnt)


def test_block_authentication_failures_are_audited_and_a_burst_alerts(guarded: Guarded) -> None:
    assert guarded.policy is not None
    guarded.policy.write_text("[alerts]\nauth_failure_burst = 2\nfirst_read = false\n")
    guarded.mount()
    data = os.urandom(5 * 65536)
    (guarded.mnt / "cam.bin").write_bytes(data)
    guarded.umount()
    raw = bytearray((guarded.backing_of("cam.bin")).read_bytes())
    raw[block_no_to_cipher_off(3) + 9] ^= 1
    (guarded.backing_of("cam.bin")).write_bytes(raw)
    guarded.mount()
    for _ in range(3):
        with pytest.raises(OSError):
            (guarded.mnt / "cam.bin").read_bytes()
    guarded.umount()
    failures = guarded.records("block.auth_failed")
    assert len(failures) >= 3 and failures[0]["path"] == "/cam.bin" and failures[0]["detail"]["block"] == 3
    assert [r["rule"] for r in guarded.records("alert")] == ["auth_failure_burst"]
    sessions = [s for s in guarded.records("fs.session") if s["path"] == "/cam.bin" and s["mode"] == "r"]
    assert sessions and all(s["result"] == "EIO" for s in sessions[-3:])
    assert verify(guarded.audit)[0] == 0  # type: ignore[arg-type]


def test_a_dry_run_policy_records_what_it_would_deny(guarded: Guarded, tmp_path: Path) -> None:
    assert guarded.policy is not None
    guarded.policy.write_text("[policy]\nenforce = false\n" + _policy(_viewer(tmp_path)))
    guarded.mount()
    (guarded.mnt / "rec").mkdir(mode=0o777)
    os.chmod(guarded.mnt / "rec", 0o777)
    ok(as_user(RECORDER, "sh", "-c", f"umask 0; echo hi > {guarded.mnt / 'rec' / 'a'}"))
    assert ok(as_user(RECORDER, "cat", guarded.mnt / "rec" / "a")) == "hi\n"  # let through
    guarded.umount()
    would = guarded.records("fs.denied")
    assert [(r["op"], r["enforced"]) for r in would] == [("read", False)]
