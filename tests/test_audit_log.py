"""The audit log against a real SoftHSM2 token: chain, checkpoints, anchor, rotation, resume, tampering.

Logs are written by the real writer (vcfs.audit.log.AuditLog) in this process and checked by
the real ``vcfs audit verify`` in a subprocess, which logs in to the same token. Each tamper
case edits the files the way someone with write access to the log directory (but no HSM
access) could, and asserts that verify exits 2 and names the right record.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from audit_helpers import lines, open_log, verify, wait_for
from conftest import run_vcfs

from vcfs import events
from vcfs.access import AccessGuard
from vcfs.audit.config import AlertConfig
from vcfs.audit.query import path_matcher
from vcfs.audit.record import canonical, sha256_hex

N = 80  # records per test log


def _fill(directory: Path, session: Any, n: int = N, **settings: Any) -> None:
    log = open_log(directory, session, rotate_bytes=6000, checkpoint_records=10, **settings)
    log.submit("mount", backing="/srv/store", mountpoint="/srv/rec")
    for i in range(n):
        log.submit(
            "fs.session", uid=2001, gid=2001, pid=4000 + i, tid=4000 + i, exe="/usr/bin/ffmpeg", comm="ffmpeg",
            cmd=f"ffmpeg -i rtsp://cam -f mp4 /cam/{i}.mp4", path=f"/cam/{i}.mp4", mode="w", read=0,
            written=1000 * i, result="ok",
        )  # fmt: skip
    log.submit("unmount", result="ok")
    log.close()


def _rewrite(path: Path, edit: Callable[[list[bytes]], list[bytes]]) -> None:
    raw = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join(edit(raw[:-1])) + b"\n")


def _where(directory: Path, seq: int) -> tuple[Path, int]:
    return next((p, i) for p, i, rec in lines(directory) if rec["seq"] == seq)


def _plain_record(directory: Path, at_least: int) -> int:
    recs = [rec for _p, _i, rec in lines(directory)]
    return next(r["seq"] for r in recs if r["seq"] >= at_least and r["event"] == "fs.session")


def test_a_closed_log_verifies_across_rotated_files(tmp_path: Path, token: Any) -> None:
    _fill(tmp_path / "audit", token)
    files = sorted((tmp_path / "audit").glob("audit-*.jsonl"))
    assert len(files) >= 3
    recs = [rec for _p, _i, rec in lines(tmp_path / "audit")]
    assert [r["seq"] for r in recs] == list(range(len(recs)))
    assert recs[-1]["event"] == "checkpoint" and recs[-1]["final"] is True
    for path in files[1:]:  # each segment begins with a link record and the one before ends with a checkpoint
        assert json.loads(path.read_bytes().split(b"\n")[0])["event"] == "log.segment"
    rc, report = verify(tmp_path / "audit")
    assert (rc, report["state"], report["first_bad"]) == (0, "intact and closed", None)
    assert report["records"] == len(recs) and report["checkpoints_authenticated"] is True
    assert not (tmp_path / "audit" / ".lock").stat().st_mode & 0o077
    assert all(not p.stat().st_mode & 0o077 for p in files)


def _change_one_byte(d: Path) -> int:
    seq = _plain_record(d, 30)
    path, i = _where(d, seq)

    def edit(raw: list[bytes]) -> list[bytes]:
        pos = raw[i].index(b'"/cam/') + 2
        raw[i] = raw[i][:pos] + bytes([raw[i][pos] ^ 1]) + raw[i][pos + 1 :]  # "/cam/" -> "/bam/"
        return raw

    _rewrite(path, edit)
    return seq


def _delete_a_line(d: Path) -> int:
    seq = _plain_record(d, 41)
    path, i = _where(d, seq)
    _rewrite(path, lambda raw: raw[:i] + raw[i + 1 :])
    return seq


def _swap_two_lines(d: Path) -> int:
    seq = _plain_record(d, 33)
    path, i = _where(d, seq)
    assert _where(d, seq + 1)[0] == path

    def edit(raw: list[bytes]) -> list[bytes]:
        raw[i], raw[i + 1] = raw[i + 1], raw[i]
        return raw

    _rewrite(path, edit)
    return seq


def _drop_the_tail(d: Path) -> int:
    last = sorted(d.glob("audit-*.jsonl"))[-1]
    count = len(last.read_bytes().splitlines())
    cut = min(4, count - 1)
    first_gone = lines(d)[-cut][2]["seq"]
    _rewrite(last, lambda raw: raw[:-cut])
    return first_gone


def _replace_a_file_from_another_log(d: Path, other: Path) -> int:
    victim = sorted(d.glob("audit-*.jsonl"))[1]
    donor = sorted(other.glob("audit-*.jsonl"))[1]
    victim.write_bytes(donor.read_bytes())
    return int(victim.name[6:18])


def _rewrite_with_a_recomputed_chain(d: Path) -> int:
    """What someone who knows the format but lacks the HSM can do best: edit, then re-hash everything after."""
    seq = _plain_record(d, 45)
    prev = None
    for path in sorted(d.glob("audit-*.jsonl")):
        out = []
        for raw in path.read_bytes().splitlines():
            rec = json.loads(raw)
            if rec["seq"] == seq:
                rec["path"] = "/cam/innocent.mp4"
            if rec["seq"] > seq and prev is not None:
                rec["prev"] = prev
            line = canonical(rec)
            prev = sha256_hex(line)
            out.append(line)
        path.write_bytes(b"\n".join(out) + b"\n")
    return next(r["seq"] for _p, _i, r in lines(d) if r["seq"] > seq and r["event"] == "checkpoint")


@pytest.mark.parametrize(
    "tamper",
    [_change_one_byte, _delete_a_line, _swap_two_lines, _drop_the_tail, _replace_a_file_from_another_log,
     _rewrite_with_a_recomputed_chain],
    ids=lambda f: f.__name__.strip("_"),
)  # fmt: skip
def test_tampering_is_reported_at_the_right_record(tmp_path: Path, token: Any, tamper: Callable[..., int]) -> None:
    d = tmp_path / "audit"
    _fill(d, token)
    if tamper is _replace_a_file_from_another_log:
        _fill(tmp_path / "other", token)
        expected = tamper(d, tmp_path / "other")
    else:
        expected = tamper(d)
    rc, report = verify(d)
    assert rc == 2, report
    assert report["state"] == "DAMAGED"
    assert report["first_bad"]["seq"] == expected, report["first_bad"]
    if tamper is _change_one_byte:  # and once in the words a person reads
        text = run_vcfs("audit", "verify", str(d), check=False)
        assert text.returncode == 2 and f"FIRST BAD RECORD: record seq {expected} " in text.stdout


def test_chain_only_check_misses_a_recomputed_chain(tmp_path: Path, token: Any) -> None:
    """Why checkpoints need the HSM: without it a rewritten log with a fresh chain passes."""
    d = tmp_path / "audit"
    _fill(d, token)
    _rewrite_with_a_recomputed_chain(d)
    rc, report = verify(d, "--no-hsm")
    assert report["first_bad"] is None and report["checkpoints_authenticated"] is False
    assert rc == 0
    assert verify(d)[0] == 2


_CRASH = """
import os, sys, time
sys.path.insert(0, {tests!r})
from audit_helpers import open_log
from vcfs.keys import embedded
from vcfs.keys.pin import read_pin_file
from vcfs.keys.pkcs11 import open_session
s = open_session(embedded.softhsm_module(), "vcfs", read_pin_file(embedded.pin_path(embedded.vcfs_home())))
log = open_log(__import__("pathlib").Path({d!r}), s)
for i in range(20):
    log.submit("fs.unlink", uid=0, path=f"/x/{{i}}", result="ok")
while log._buf_records or log._queue:
    time.sleep(0.01)
time.sleep(0.1)
os._exit(0)  # no final checkpoint, like kill -9
"""


def test_resume_after_a_crash_with_a_torn_last_line(tmp_path: Path, token: Any) -> None:
    d = tmp_path / "audit"
    script = _CRASH.format(tests=str(Path(__file__).parent), d=str(d))
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60, env=os.environ.copy())
    rc, report = verify(d)
    assert rc == 1 and report["state"] == "intact, still open", report
    with open(sorted(d.glob("audit-*.jsonl"))[-1], "ab") as f:
        f.write(b'{"event":"fs.unl')  # torn by the crash
    log = open_log(d, token)
    log.submit("fs.unlink", uid=0, path="/after", result="ok")
    log.close()
    resume = next(rec for _p, _i, rec in lines(d) if rec["event"] == "log.resume")
    assert resume["previous_final"] is False and resume["torn_bytes"] == 16
    rc, report = verify(d)
    assert rc == 0, report
    assert any("without closing the log" in w for w in report["warnings"])
    assert any("torn" in w for w in report["warnings"])


def test_a_tail_cut_while_unmounted_is_reported_by_the_next_mount_and_by_verify(tmp_path: Path, token: Any) -> None:
    d = tmp_path / "audit"
    _fill(d, token, n=20)
    last = sorted(d.glob("audit-*.jsonl"))[-1]
    kept = lines(d)[-3][2]["seq"]  # drop the last 3 records, final checkpoint included
    _rewrite(last, lambda raw: raw[:-3])
    log = open_log(d, token)  # the daemon starts again on the shortened log
    assert any("cut back" in p for p in log.startup_problems)
    log.close()
    rc, report = verify(d)
    assert rc == 2 and report["first_bad"]["seq"] == kept, report
    assert "cut off while vcfs was not running" in report["first_bad"]["reason"]


def test_an_emptied_log_directory_is_noticed(tmp_path: Path, token: Any) -> None:
    d = tmp_path / "audit"
    _fill(d, token, n=5)
    for path in d.glob("audit-*.jsonl"):
        path.unlink()
    log = open_log(d, token)
    assert any("was removed" in p for p in log.startup_problems)
    log.close()
    rc, report = verify(d)
    assert rc == 2 and report["first_bad"]["seq"] == 0 and "removed" in report["first_bad"]["reason"]


def test_hashed_names_keep_paths_out_of_the_log(tmp_path: Path, token: Any) -> None:
    d = tmp_path / "audit"
    log = open_log(d, token, hash_names=True)
    for name in ("patient-smith.mp4", "patient-jones.mp4"):
        log.submit(
            "fs.session", uid=1, path=f"/ward-7/{name}", cmd=f"/usr/bin/ffmpeg -i /ward-7/{name}", result="ok"
        )  # fmt: skip
    log.submit("fs.rename", uid=1, path="/ward-7/patient-jones.mp4", new_path="/archive/patient-jones.mp4")
    log.close()
    raw = b"".join(p.read_bytes() for p in d.glob("audit-*.jsonl"))
    for secret in (b"patient", b"ward-7", b"archive"):
        assert secret not in raw
    recs = [rec for _p, _i, rec in lines(d)]
    sessions = [r for r in recs if r["event"] == "fs.session"]
    assert all(r["path"].startswith("/~") and r["cmd"] == "ffmpeg" for r in sessions)
    assert sessions[0]["path"].split("/")[1] == sessions[1]["path"].split("/")[1]  # same directory, same hash
    assert path_matcher("/ward-7", log.key.hash_path)(sessions[0]["path"])
    shown = run_vcfs("audit", "show", "--json", "--path", "/ward-7/patient-smith.mp4", str(d))
    assert [json.loads(x)["path"] for x in shown.stdout.splitlines()] == [sessions[0]["path"]]
    assert verify(d)[0] == 0


def test_records_are_forwarded_as_rfc5424_and_journal_entries(tmp_path: Path, token: Any) -> None:
    socks = {}
    for kind in ("syslog", "journal"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(str(tmp_path / kind))
        s.settimeout(10)
        socks[kind] = s
    log = open_log(
        tmp_path / "audit", token, forward=("syslog", "journal"), syslog_socket=str(tmp_path / "syslog"),
        journal_socket=str(tmp_path / "journal"),
    )  # fmt: skip
    log.submit("fs.denied", uid=2002, pid=77, exe="/usr/bin/cat", op="read", path='/a "b"/c]', reason="policy")
    wait_for(lambda: log.written >= 3, what="the denial to be written")
    log.close()
    got: dict[str, list[bytes]] = {"syslog": [], "journal": []}
    for kind, s in socks.items():
        s.setblocking(False)
        while True:
            try:
                got[kind].append(s.recv(65536))
            except BlockingIOError:
                break
        s.close()
    denied = next(m for m in got["syslog"] if b" fs.denied " in m)
    assert denied.startswith(b"<85>1 ")  # facility authpriv (10) * 8 + severity notice (5)
    header, _, body = denied.partition(b"\xef\xbb\xbf")
    assert b'[vcfs@32473 seq="' in header and b'uid="2002"' in header and b'path="/a \\"b\\"/c\\]"' in header
    assert json.loads(body)["event"] == "fs.denied"
    entry = next(m for m in got["journal"] if b"VCFS_EVENT=fs.denied" in m)
    fields = dict(line.split(b"=", 1) for line in entry.splitlines())
    assert fields[b"PRIORITY"] == b"5" and fields[b"SYSLOG_IDENTIFIER"] == b"vcfs"
    assert json.loads(fields[b"MESSAGE"])["uid"] == 2002
    assert len(got["syslog"]) == len(got["journal"]) >= 4  # start, checkpoint(s), denial, final checkpoint


def test_an_alert_is_a_record_a_warning_and_an_event(
    tmp_path: Path, token: Any, caplog: pytest.LogCaptureFixture
) -> None:
    log = open_log(tmp_path / "audit", token)
    guard = AccessGuard(None, log, log.cfg, AlertConfig(auth_failure_burst=3))
    seen: list[events.Event] = []
    stop = events.subscribe(lambda e: seen.append(e) if e.kind == events.AUDIT_ALERT else None)
    try:
        guard.start(backing="/b", mountpoint="/m")  # listens to vcfs/events.py from here on
        for block in range(4):
            events.emit(events.BLOCK_AUTH_FAILED, path="/b/files/cam.bin", block=block, error="tag mismatch")
        events.emit(events.KEY_UNWRAP, domain="default", version=2)
        guard.close(result="ok")
    finally:
        stop()
    assert [e.fields["rule"] for e in seen] == ["auth_failure_burst"]  # what the metrics exporter counts
    assert "audit alert (auth_failure_burst)" in caplog.text
    recs = [rec for _p, _i, rec in lines(tmp_path / "audit")]
    assert [r["detail"]["block"] for r in recs if r["event"] == "block.auth_failed"] == [0, 1, 2, 3]
    assert [r["rule"] for r in recs if r["event"] == "alert"] == ["auth_failure_burst"]
    assert [r["detail"] for r in recs if r["event"] == "key.unwrap"] == [{"domain": "default", "version": 2}]


def test_detector_state_is_authenticated(tmp_path: Path, token: Any) -> None:
    log = open_log(tmp_path / "audit", token)
    log.save_state("readers", {"uids": [0, 2002], "exes": ["/usr/bin/vlc"]})
    log.close()
    state = tmp_path / "audit" / "readers.state.json"
    assert oct(state.stat().st_mode & 0o777) == "0o600"
    log = open_log(tmp_path / "audit", token)
    assert log.load_state("readers") == {"uids": [0, 2002], "exes": ["/usr/bin/vlc"]}
    doc = json.loads(state.read_text())
    doc["data"]["uids"].append(6666)  # someone adds themselves to suppress the first-reader alert
    state.write_text(json.dumps(doc))
    assert log.load_state("readers") is None
    log.close()
