"""``vcfs audit verify``: recompute the hash chain, check every checkpoint in the HSM, compare the anchor.

What each check catches (docs/AUDIT.md has the full argument):
- a changed byte: the record no longer parses, is no longer canonical, or no longer hashes to
  the next record's ``prev`` (the *changed* record is named, not its successor);
- a deleted, inserted, duplicated or swapped line: ``seq`` is not the next number;
- a rewritten stretch with a recomputed chain: the next checkpoint's HMAC fails (only the HSM
  can make one);
- a deleted or replaced segment file: the first record of the next file, or of the
  replacement, does not continue the chain;
- a cut-off tail: the log ends before the checkpoint the HSM anchor names; a log that was
  closed cleanly ends with a ``final`` checkpoint, so "no final checkpoint" means the mount is
  still running, crashed, or lost its tail after the last checkpoint (reported, exit 1).
The report names the first bad record by seq, file and line. Exit codes: 0 intact and closed,
1 intact but open (records after the last checkpoint are not yet authenticated), 2 damaged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vcfs.audit.hsm import AuditKey
from vcfs.audit.record import GENESIS, canonical, mac_input, segments, sha256_hex
from vcfs.errors import AuditError


@dataclass(slots=True)
class Finding:
    seq: int | None
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"record seq {self.seq} ({where}): {self.reason}" if self.seq is not None else f"{where}: {self.reason}"


@dataclass(slots=True)
class VerifyReport:
    log_id: str = ""
    files: int = 0
    records: int = 0
    checkpoints: int = 0
    last_seq: int = -1
    last_checkpoint: int = -1
    closed: bool = False
    checked_macs: bool = False
    first_bad: Finding | None = None
    warnings: list[str] = field(default_factory=list)
    hsm: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        if self.first_bad is not None:
            return 2
        return 0 if self.closed else 1

    @property
    def state(self) -> str:
        return {0: "intact and closed", 1: "intact, still open", 2: "DAMAGED"}[self.exit_code]

    def to_json(self) -> dict[str, Any]:
        bad = self.first_bad
        return {
            "log_id": self.log_id,
            "state": self.state,
            "exit_code": self.exit_code,
            "files": self.files,
            "records": self.records,
            "checkpoints": self.checkpoints,
            "last_seq": self.last_seq,
            "last_checkpoint": self.last_checkpoint,
            "closed": self.closed,
            "checkpoints_authenticated": self.checked_macs,
            "first_bad": None
            if bad is None
            else {"seq": bad.seq, "file": bad.file, "line": bad.line, "reason": bad.reason},
            "warnings": self.warnings,
        }


def read_start(directory: Path) -> dict[str, Any]:
    """The first record of the oldest segment: it names the log and its HSM key."""
    segs = _segments(directory)
    with open(segs[0][1], "rb") as f:
        try:
            rec = json.loads(f.readline())
        except ValueError:
            rec = {}
    return rec if isinstance(rec, dict) else {}


def _segments(directory: Path) -> list[tuple[int, Path]]:
    try:
        segs = segments(directory)
    except OSError as exc:
        raise AuditError(f"cannot read audit directory {directory}: {exc.strerror}") from None
    if not segs:
        raise AuditError(f"{directory} holds no audit log (no audit-*.jsonl files)")
    return segs


class _Walk:
    """One pass over every line; stops at the first bad record."""

    def __init__(self, report: VerifyReport, key: AuditKey | None) -> None:
        self.r = report
        self.key = key
        self.expected = 0
        self.prev = GENESIS
        self.prev_loc: tuple[int, str, int] | None = None  # seq, file, line of the record before
        self.checkpoint_hashes: dict[int, str] = {}
        self.checkpoint_locs: dict[int, tuple[str, int]] = {}
        self.prev_authentic = False
        self.last: dict[str, Any] = {}

    def bad(self, seq: int | None, file: str, line: int, reason: str) -> bool:
        self.r.first_bad = Finding(seq, file, line, reason)
        return False

    def segment(self, first_seq: int, path: Path, is_last: bool) -> bool:
        name = path.name
        self.r.files += 1
        if first_seq != self.expected:
            if first_seq > self.expected:
                return self.bad(
                    self.expected, name, 0,
                    f"missing: this file starts at seq {first_seq}, the chain expects seq {self.expected} "
                    "(a segment file was deleted or renamed)",
                )  # fmt: skip
            return self.bad(first_seq, name, 0, f"segment overlaps the one before (expected seq {self.expected})")
        data = path.read_bytes()
        lines = data.split(b"\n")
        if lines[-1]:
            if not is_last:
                return self.bad(None, name, len(lines), "the file does not end with a complete record")
            self.r.warnings.append(f"{name}: {len(lines[-1])} bytes of a torn last record (crash while writing)")
        return all(self.record(line, name, no) for no, line in enumerate(lines[:-1], start=1))

    def record(self, line: bytes, name: str, no: int) -> bool:
        seq = self.expected
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError
        except ValueError:
            return self.bad(seq, name, no, "not a JSON record (edited or damaged)")
        got = rec.get("seq")
        if got != seq:
            if isinstance(got, int) and not isinstance(got, bool) and got > seq:
                why = f"expected seq {seq} here, found seq {got}: records were deleted or reordered"
            else:
                why = f"expected seq {seq} here, found {got!r}: records were reordered, duplicated or edited"
            return self.bad(seq, name, no, why)
        if rec.get("prev") != self.prev:
            if seq == 0:
                return self.bad(seq, name, no, "the first record does not start a chain (the log's head was replaced)")
            if self.prev_authentic:  # the record before is an authenticated checkpoint: this one is wrong
                return self.bad(seq, name, no, f"does not continue the chain after checkpoint seq {seq - 1}: replaced")
            before = self.prev_loc or (seq - 1, name, no - 1)
            return self.bad(
                before[0], before[1], before[2],
                f"altered: its hash does not match the link in seq {seq} ({name}:{no})",
            )  # fmt: skip
        if canonical(rec) != line:
            return self.bad(seq, name, no, "not in canonical form: the line was edited")
        if not self.special(rec, seq, name, no):
            return False
        h = sha256_hex(line)
        if rec.get("event") == "checkpoint":
            self.checkpoint_hashes[seq] = h
            self.checkpoint_locs[seq] = (name, no)
        self.prev, self.prev_loc, self.last = h, (seq, name, no), rec
        self.prev_authentic = rec.get("event") == "checkpoint" and self.key is not None
        self.expected += 1
        self.r.records += 1
        self.r.last_seq = seq
        return True

    def special(self, rec: dict[str, Any], seq: int, name: str, no: int) -> bool:
        event = rec.get("event")
        if seq == 0:
            if event != "log.start":
                return self.bad(seq, name, no, "the log does not begin with log.start")
            self.r.log_id = str(rec.get("log_id", ""))
            hsm = rec.get("hsm")
            self.r.hsm = hsm if isinstance(hsm, dict) else {}
        if event in ("log.start", "log.segment", "log.resume", "checkpoint") and rec.get("log_id") != self.r.log_id:
            return self.bad(seq, name, no, f"belongs to another log ({rec.get('log_id')!r}, not {self.r.log_id!r})")
        if event == "checkpoint":
            self.r.checkpoints += 1
            self.r.last_checkpoint = seq
            if self.key is not None:
                try:
                    mac = bytes.fromhex(str(rec.get("mac", "")))
                except ValueError:
                    mac = b""
                if not self.key.check(mac_input(rec), mac):
                    return self.bad(
                        seq, name, no,
                        "checkpoint fails authentication in the HSM: the records before it were rewritten "
                        "(with a recomputed chain) or the checkpoint was forged",
                    )  # fmt: skip
        if event == "log.start" and isinstance(rec.get("lost_log"), dict):
            return self.bad(
                seq, name, no,
                f"the daemon found this directory emptied at start: an earlier log up to checkpoint seq "
                f"{rec['lost_log'].get('seq')} was removed",
            )  # fmt: skip
        if event == "log.resume":
            if isinstance(rec.get("missing"), dict):
                m = rec["missing"]
                return self.bad(
                    m.get("from"), name, no,
                    f"records {m.get('from')}..{m.get('to')} were cut off while vcfs was not running "
                    f"(reported by the daemon at seq {seq})",
                )  # fmt: skip
            if "anchor_mismatch" in rec or rec.get("anchor") == "missing":
                return self.bad(seq, name, no, "the daemon found the log rewritten before it resumed it")
            if not rec.get("previous_final"):
                self.r.warnings.append(
                    f"seq {seq}: the daemon stopped without closing the log before this point (crash or kill -9)"
                )
            if rec.get("torn_bytes"):
                self.r.warnings.append(f"seq {seq}: {rec['torn_bytes']} bytes of a torn record were dropped at resume")
        if event == "audit.degraded" and rec.get("lost"):
            self.r.warnings.append(f"seq {seq}: {rec['lost']} records were lost while the log could not be written")
        return True


def verify_log(directory: Path, key: AuditKey | None) -> VerifyReport:
    """Check the whole log in ``directory``; ``key`` None skips checkpoint MACs and the anchor."""
    report = VerifyReport(checked_macs=key is not None)
    walk = _Walk(report, key)
    segs = _segments(directory)
    for i, (first_seq, path) in enumerate(segs):
        try:
            if not walk.segment(first_seq, path, i == len(segs) - 1):
                return report
        except OSError as exc:
            raise AuditError(f"cannot read {path}: {exc.strerror}") from None
    last = walk.last
    report.closed = last.get("event") == "checkpoint" and last.get("final") is True
    if not report.closed:
        tail = report.last_seq - report.last_checkpoint
        report.warnings.append(
            f"the log is open: no final checkpoint at its end; {tail} records after checkpoint seq "
            f"{report.last_checkpoint} are not yet authenticated (mount running, crashed, or tail cut off)"
        )
    if key is None:
        report.warnings.append("checkpoints were not authenticated (no HSM); only the hash chain was checked")
        return report
    _check_anchor(report, walk, key, segs[-1][1].name)
    return report


def _check_anchor(report: VerifyReport, walk: _Walk, key: AuditKey, last_file: str) -> None:
    anchor = key.anchor(report.log_id)
    if anchor is None:
        walk.bad(None, last_file, 0, f"the HSM holds no anchor for log {report.log_id}: the log was replaced")
        return
    file, line = walk.checkpoint_locs.get(anchor.seq, (last_file, 0))
    if anchor.seq > report.last_seq:
        walk.bad(
            report.last_seq + 1, last_file, 0,
            f"missing: the log ends at seq {report.last_seq}, but the HSM anchor names checkpoint seq {anchor.seq} "
            "(the tail was cut off)",
        )  # fmt: skip
    elif walk.checkpoint_hashes.get(anchor.seq) != anchor.hash:
        walk.bad(anchor.seq, file, line, "is not the checkpoint the HSM anchored: the log was rewritten")
    elif anchor.seq < report.last_checkpoint:
        report.warnings.append(
            f"the HSM anchor is at checkpoint seq {anchor.seq}, behind the log's last checkpoint "
            f"{report.last_checkpoint} (the daemon stopped between writing a checkpoint and moving the anchor)"
        )
    elif anchor.final and report.last_seq > anchor.seq:
        walk.bad(anchor.seq + 1, file, line + 1, "appended after the log was closed by its final checkpoint")
