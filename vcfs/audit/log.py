"""The audit log writer: one thread that chains, batches, checkpoints, rotates and survives a full disk.

Producers (the FUSE adapter on the trio loop, event sinks on any thread) call ``submit``: a
dict goes on a queue under a lock, nothing else, so recording never waits for the log. The
writer thread wakes every ``flush_ms`` (at once for urgent records such as denials and
alerts), gives each record its ``seq`` and ``prev`` hash and writes the batch with one write(2)
to a segment opened O_APPEND; it fsyncs at most every ``fsync_ms`` (group commit: the audit
log shares the disk with the recordings), and at once for checkpoints and urgent records.

Checkpoints (HMAC-SHA256 in the HSM) are added after ``checkpoint_records`` records, after
``checkpoint_seconds``, within a second of an urgent record, at each rotation and at close
(``final``). After a checkpoint is on disk the HSM anchor is moved to it, never before.

Full disk or another write error: the log turns unhealthy (``healthy``), which the access
guard reads to fail closed (or open); records stay chained in memory up to ``max_queue`` and
are written when the disk accepts them again, followed by an ``audit.degraded`` record that
says since when, why and how many records were lost. Partial writes are resumed at the byte
where they stopped, so the file never holds half a line once it recovers.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vcfs import events
from vcfs.audit.config import FAIL_CLOSED, AuditConfig
from vcfs.audit.forward import Forwarder
from vcfs.audit.hsm import Anchor, AuditKey
from vcfs.audit.record import (
    FORMAT,
    GENESIS,
    STATE_SUFFIX,
    URGENT,
    canonical,
    mac_input,
    rfc3339,
    segment_name,
    segments,
    sha256_hex,
)
from vcfs.errors import AuditError, KeyProviderError

log = logging.getLogger("vcfs.audit")
STATE_PREFIX = b"vcfs-audit-state\0"
RETRY_SECONDS = 1.0  # a full disk is retried this often
CHECKPOINT_RETRY_SECONDS = 10.0  # and an unavailable HSM this often


def derive_log_id(directory: Path) -> str:
    """Stable per host and directory, so a log emptied while vcfs was down is noticed at the next start."""
    return sha256_hex(f"vcfs-audit-log\0{socket.gethostname()}\0{os.path.realpath(directory)}".encode())[:32]


def _last_line(path: Path) -> tuple[bytes | None, int, bytes]:
    """(last complete line, length of a torn fragment after it, the fragment) of a segment."""
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    fragment = data[cut:]
    body = data[:cut].rstrip(b"\n")
    if not body:
        return None, len(fragment), fragment
    return body[body.rfind(b"\n") + 1 :], len(fragment), fragment


KeyFactory = Callable[[str], AuditKey]


class AuditLog:
    """``key_for(label)`` opens the HSM key; its label is ``[audit] hsm_key`` or one per log."""

    def __init__(
        self, cfg: AuditConfig, key_for: KeyFactory, start_fields: dict[str, Any], clock: Callable[[], float]
    ) -> None:
        if cfg.dir is None:
            raise ValueError("AuditLog needs cfg.dir")
        self.cfg = cfg
        self.dir = cfg.dir
        self._key_for = key_for
        self.key: AuditKey  # set by open()
        self._clock = clock
        self._start_fields = start_fields
        self.log_id = derive_log_id(cfg.dir)
        self.healthy = True
        self.lost = 0  # records dropped because the queue was full
        self.written = 0  # records on disk (for tests and status)
        self.startup_problems: list[str] = []
        self._cond = threading.Condition()
        self._queue: deque[dict[str, Any]] = deque()
        self._states: dict[str, Any] = {}
        self._urgent = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._forwarders = [
            Forwarder(kind, cfg.syslog_socket if kind == "syslog" else cfg.journal_socket, cfg.syslog_sd_id)
            for kind in cfg.forward
        ]
        # writer-thread state (and the opening thread's, before the writer starts)
        self._fd = -1
        self._seq = 0
        self._prev = GENESIS
        self._seg_bytes = 0
        self._since_cp = 0
        self._last_cp = clock()
        self._urgent_waiting = False
        self._buf = bytearray()
        self._buf_off = 0
        self._buf_records: list[tuple[dict[str, Any], bytes]] = []
        self._anchor_due: Anchor | None = None
        self._degraded_since: float | None = None
        self._degraded_error = ""
        self._lost_degraded = 0
        self._last_try = 0.0
        self._cp_blocked_until = 0.0
        self._lock_fd = -1
        self._last_fsync = 0.0

    # ---- opening -------------------------------------------------------------------------------

    def open(self) -> None:
        """Create or resume the log and write its first record and checkpoint (raises AuditError)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock_fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            segs = segments(self.dir)
        except OSError as exc:
            raise AuditError(f"cannot use audit directory {self.dir}: {exc.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AuditError(
                f"the audit directory {self.dir} is in use by another vcfs mount",
                hint="give every mount its own --audit-dir",
            ) from None
        try:
            first = self._resume(segs) if segs else self._fresh()
        except OSError as exc:
            raise AuditError(f"cannot open the audit log in {self.dir}: {exc.strerror}") from None
        self._chain(first)
        self._checkpoint()
        if not self._flush():
            raise AuditError(f"cannot write the audit log in {self.dir}: {self._degraded_error}")

    def _open_segment(self, first_seq: int) -> None:
        path = self.dir / segment_name(first_seq)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._seg_bytes = os.fstat(self._fd).st_size

    def _use_key(self, label: str) -> None:
        self.key = self._key_for(label)

    def _fresh(self) -> dict[str, Any]:
        label = self.cfg.hsm_key or f"vcfs-audit-{self.log_id}"
        self._use_key(label)
        hsm = {**self._start_fields.get("hsm", {}), "key": label}
        rec: dict[str, Any] = {
            "event": "log.start", "log_id": self.log_id, "format": FORMAT, **self._start_fields, "hsm": hsm
        }  # fmt: skip
        earlier = self.key.anchor(self.log_id)
        if earlier is not None:  # the HSM remembers a log here that is gone
            rec["lost_log"] = {"seq": earlier.seq, "final": earlier.final}
            self.startup_problems.append(
                f"the audit log in {self.dir} was removed while vcfs was not running "
                f"(the HSM anchor names checkpoint seq {earlier.seq}); a new log was started"
            )
        self._open_segment(0)
        return rec

    def _resume(self, segs: list[tuple[int, Path]]) -> dict[str, Any]:
        torn = 0
        torn_hash = ""
        while segs:
            first_seq, path = segs[-1]
            last, frag_len, fragment = _last_line(path)
            if frag_len:  # a crash tore the last write: keep its hash in the chain, drop the bytes
                torn += frag_len
                torn_hash = sha256_hex(fragment)
                os.truncate(path, path.stat().st_size - frag_len)
            if last is not None:
                break
            path.unlink()  # held nothing but a torn fragment
            segs = segs[:-1]
        else:
            rec = self._fresh()
            if torn:
                rec["torn_bytes"], rec["torn_sha256"] = torn, torn_hash
            return rec
        try:
            with open(segs[0][1], "rb") as f:
                start = json.loads(f.readline())
            with open(path, "rb") as f:
                head = json.loads(f.readline())
            tail = json.loads(last)
            log_id, seq = str(head["log_id"]), int(tail["seq"])
            label = str(start["hsm"]["key"]) if start.get("event") == "log.start" else ""
        except (ValueError, KeyError, TypeError):
            raise AuditError(
                f"the audit log in {self.dir} is damaged ({path.name})",
                hint=f"check it with: vcfs audit verify {self.dir}; move it away to start a new log",
            ) from None
        self.log_id = log_id
        self._use_key(label or self.cfg.hsm_key or f"vcfs-audit-{log_id}")  # the key the log began with
        self._seq, self._prev = seq + 1, sha256_hex(last)
        resume: dict[str, Any] = {"event": "log.resume", "log_id": log_id, **self._start_fields}
        resume["hsm"] = {**self._start_fields.get("hsm", {}), "key": self.key.label}
        resume["previous_final"] = tail.get("event") == "checkpoint" and tail.get("final") is True
        if torn:
            resume["torn_bytes"], resume["torn_sha256"] = torn, torn_hash
        self._check_anchor(resume, path, first_seq, seq)
        self._open_segment(first_seq)
        return resume

    def _check_anchor(self, rec: dict[str, Any], path: Path, first_seq: int, last_seq: int) -> None:
        if not self.key.keyed:  # a mount without an HSM keeps no anchor
            rec["anchor"] = "none"
            return
        anchor = self.key.anchor(self.log_id)
        if anchor is None:
            rec["anchor"] = "missing"
            self.startup_problems.append(f"the HSM holds no checkpoint anchor for the audit log in {self.dir}")
        elif anchor.seq > last_seq:
            rec["missing"] = {"from": last_seq + 1, "to": anchor.seq}
            self.startup_problems.append(
                f"the audit log in {self.dir} was cut back while vcfs was not running: it ends at seq {last_seq}, "
                f"the HSM anchor names checkpoint seq {anchor.seq}"
            )
        elif anchor.seq >= first_seq:
            with open(path, "rb") as f:
                for line in f:
                    if f'"seq":{anchor.seq},'.encode() in line and json.loads(line).get("seq") == anchor.seq:
                        if sha256_hex(line.rstrip(b"\n")) != anchor.hash:
                            rec["anchor_mismatch"] = anchor.seq
                            self.startup_problems.append(
                                f"checkpoint seq {anchor.seq} of the audit log in {self.dir} is not the one the "
                                "HSM anchored: the log was rewritten"
                            )
                        break

    # ---- producers -----------------------------------------------------------------------------

    def submit(self, event: str, **fields: Any) -> None:
        """Queue one record (any thread; never blocks on I/O)."""
        rec = {"event": event, "ts": rfc3339(self._clock()), **fields}
        with self._cond:
            if len(self._queue) >= self.cfg.max_queue:
                self.lost += 1
                return
            self._queue.append(rec)
            if event in URGENT:
                self._urgent = True
                self._cond.notify()

    def save_state(self, name: str, data: Any) -> None:
        """Persist small detector state (known readers) from the writer thread, HSM-authenticated."""
        with self._cond:
            self._states[name] = data

    def load_state(self, name: str) -> Any:
        path = self.dir / f"{name}{STATE_SUFFIX}"
        if not self.key.keyed:  # state that cannot be authenticated is not kept
            return None
        try:
            doc = json.loads(path.read_bytes())
            payload = canonical({"log_id": doc["log_id"], "data": doc["data"]})
            good = doc["log_id"] == self.log_id and self.key.check(STATE_PREFIX + payload, bytes.fromhex(doc["mac"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            good = False
        if not good:
            log.warning("audit: %s fails authentication; starting from empty state", path)
            return None
        return doc["data"]

    # ---- the writer thread ---------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="vcfs-audit-writer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Write everything queued, a final checkpoint, and stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        elif self._fd >= 0:  # opened but never started (the mount failed): finish here
            self._run()
        self._fd = -1
        for fwd in self._forwarders:
            fwd.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._urgent and not self._stopping:
                    self._cond.wait(self.cfg.flush_seconds)
                batch = list(self._queue)
                self._queue.clear()
                states, self._states = self._states, {}
                self._urgent_waiting |= self._urgent
                self._urgent = False
                stopping = self._stopping and not self._queue
            try:
                self._step(batch, states)
            except Exception:  # a bug must not silently end auditing: say so loudly, keep going
                log.exception("audit: writer step failed")
            if stopping:
                break
        self._checkpoint(final=True)
        if not self._flush():
            unwritten = len(self._buf_records)
            log.error("audit: %d records could not be written at unmount: %s", unwritten, self._degraded_error)
        os.close(self._fd)
        os.close(self._lock_fd)

    def _step(self, batch: list[dict[str, Any]], states: dict[str, Any]) -> None:
        for rec in batch:
            if not self.healthy and len(self._buf_records) >= self.cfg.max_queue:
                self._lost_degraded += 1
                continue
            self._chain(rec)
            full = self._seg_bytes + len(self._buf) - self._buf_off >= self.cfg.rotate_bytes
            if full and self.healthy and self._flush():  # rotate at the size limit, not only between batches
                self._maybe_rotate()
        now = self._clock()
        if self._since_cp and (
            self._since_cp >= self.cfg.checkpoint_records
            or now - self._last_cp >= self.cfg.checkpoint_seconds
            or (self._urgent_waiting and now - self._last_cp >= 1.0)
        ):
            self._checkpoint()
        if (self.healthy or time.monotonic() - self._last_try >= RETRY_SECONDS) and self._flush():
            self._maybe_rotate()
        for name, data in states.items():
            self._write_state(name, data)

    def _chain(self, rec: dict[str, Any], sign: bool = False) -> bytes:
        rec["seq"], rec["prev"] = self._seq, self._prev
        rec.setdefault("ts", rfc3339(self._clock()))
        if self.cfg.hash_names:
            self._redact(rec)
        if sign:
            rec["mac"] = self.key.mac(mac_input(rec)).hex()
        line = canonical(rec)
        self._buf += line + b"\n"
        self._buf_records.append((rec, line))
        self._prev = sha256_hex(line)
        self._seq += 1
        self._since_cp += 1
        return line

    def _redact(self, rec: dict[str, Any]) -> None:
        """Names are sensitive: with hash_names only their keyed hashes reach the log."""
        for field in ("path", "new_path"):
            if isinstance(rec.get(field), str):
                rec[field] = self.key.hash_path(rec[field])
        if isinstance(rec.get("cmd"), str):  # arguments name files; keep the program only
            rec["cmd"] = os.path.basename(rec["cmd"].split(" ", 1)[0])

    def _checkpoint(self, final: bool = False) -> None:
        if not final and self._clock() < self._cp_blocked_until:
            return
        rec = {"event": "checkpoint", "log_id": self.log_id, "key": self.key.label, "final": final}
        seq = self._seq
        try:
            line = self._chain(rec, sign=self.key.keyed)  # raises before it advances the chain
        except KeyProviderError as exc:  # the HSM is unavailable: go on chaining, retry in a while
            log.error("audit: checkpoint failed: %s", exc.message)
            self._cp_blocked_until = self._clock() + CHECKPOINT_RETRY_SECONDS
            self._chain({"event": "audit.checkpoint_failed", "error": exc.message})
            return
        self._since_cp = 0
        self._last_cp = self._clock()
        self._urgent_waiting = False
        self._anchor_due = Anchor(self.log_id, seq, sha256_hex(line), final)

    def _flush(self) -> bool:
        if not self._buf:
            return True
        self._last_try = time.monotonic()
        try:
            with memoryview(self._buf) as view:
                while self._buf_off < len(self._buf):
                    n = os.write(self._fd, view[self._buf_off :])
                    self._buf_off += n
                    self._seg_bytes += n
            if self._anchor_due is not None or (self.cfg.fsync and self._fsync_due()):
                os.fsync(self._fd)  # the anchor never runs ahead of the disk
                self._last_fsync = time.monotonic()
        except OSError as exc:
            self._degrade(exc)
            return False
        written = self._buf_records
        self.written += len(written)
        self._buf.clear()
        self._buf_off = 0
        self._buf_records = []
        if self._anchor_due is not None:
            try:
                self.key.set_anchor(self._anchor_due)
            except KeyProviderError as exc:
                log.error("audit: could not move the HSM anchor: %s", exc.message)
            self._anchor_due = None
        for fwd in self._forwarders:
            for rec, line in written:
                fwd.send(rec, line)
        if not self.healthy:
            self._recover()
        return True

    def _fsync_due(self) -> bool:
        """Group commit: every batch is written at once, fsynced at most every fsync_ms (urgent ones now)."""
        return self._urgent_waiting or time.monotonic() - self._last_fsync >= self.cfg.fsync_seconds

    def _degrade(self, exc: OSError) -> None:
        self._degraded_error = exc.strerror or str(exc)
        if not self.healthy:
            return
        self.healthy = False
        self._degraded_since = self._clock()
        mode = (
            "fail-closed: plaintext reads, deletes, renames and attribute changes are refused until it recovers"
            if self.cfg.on_failure == FAIL_CLOSED
            else "fail-open: access continues unaudited until it recovers"
        )
        log.error("audit: cannot write the audit log in %s: %s; %s", self.dir, self._degraded_error, mode)
        events.emit(events.AUDIT_DEGRADED, error=self._degraded_error, mode=self.cfg.on_failure)

    def _recover(self) -> None:
        since = self._degraded_since or self._clock()
        lost = self._lost_degraded
        self.healthy = True
        self._degraded_since = None
        self._lost_degraded = 0
        self._chain(
            {
                "event": "audit.degraded",
                "since": rfc3339(since),
                "until": rfc3339(self._clock()),
                "error": self._degraded_error,
                "mode": self.cfg.on_failure,
                "lost": lost,
            }
        )
        self._urgent_waiting = True
        log.warning("audit: the log is writable again (unwritable since %s); %d records lost", rfc3339(since), lost)
        events.emit(events.AUDIT_RECOVERED, lost=lost)
        self._flush()

    def _maybe_rotate(self) -> None:
        if self._seg_bytes < self.cfg.rotate_bytes:
            return
        self._checkpoint()
        if not self._flush():
            return
        os.close(self._fd)
        self._open_segment(self._seq)
        self._chain({"event": "log.segment", "log_id": self.log_id})
        self._flush()

    def _write_state(self, name: str, data: Any) -> None:
        if not self.key.keyed:
            return
        payload = canonical({"log_id": self.log_id, "data": data})
        try:
            mac = self.key.mac(STATE_PREFIX + payload).hex()
            tmp = self.dir / f".{name}{STATE_SUFFIX}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({"log_id": self.log_id, "data": data, "mac": mac}))
            os.replace(tmp, self.dir / f"{name}{STATE_SUFFIX}")
        except (OSError, KeyProviderError) as exc:
            log.warning("audit: could not save %s state: %s", name, exc)
