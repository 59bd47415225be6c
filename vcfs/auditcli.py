"""``vcfs audit verify|show|report``: the audit part of the command line.

An extension of vcfs/cli.py (kept apart so the main CLI stays small): argument parsing and
rendering only, and like cli.py it prints; errors are raised as VcfsError for cli.main to show.
Exit codes of ``verify``: 0 intact and closed, 1 intact but still open, 2 damaged (docs/CLI.md).
"""

from __future__ import annotations

import argparse
import json
import pwd
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vcfs.audit.hsm import AuditKey, open_offline_key
from vcfs.audit.query import Filters, parse_when, path_matcher, select, summarise, table
from vcfs.audit.verify import read_start, verify_log
from vcfs.errors import AuditError, UsageError


def add_parser(sub: Any, key_options: Callable[[argparse.ArgumentParser], None]) -> None:
    audit = sub.add_parser(
        "audit",
        help="check and read the audit trail: verify, show, report",
        description="Read a mount's audit log (the --audit-dir of vcfs mount). Checkpoints are authenticated "
        "by a key in the HSM, so verify (and show --path on a log with hashed names) needs the HSM.",
    )
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    p = asub.add_parser(
        "verify",
        help="check the hash chain, every checkpoint and the HSM anchor",
        description="Check every record of the log in LOGDIR: the hash chain, each checkpoint's HMAC in the HSM, "
        "and that the log reaches the checkpoint the HSM anchored. Names the first bad record. Exit 0: intact and "
        "closed; 1: intact but open (mount running or crashed: the last records are not yet authenticated); "
        "2: damaged (edited, deleted, reordered, truncated or replaced records).",
    )
    p.add_argument("logdir", type=Path, metavar="LOGDIR")
    p.add_argument("--no-hsm", action="store_true", help="check the hash chain only (weaker: anyone can rebuild it)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")
    key_options(p)
    p = asub.add_parser("show", help="list records, filtered", description="List records of the log in LOGDIR.")
    p.add_argument("logdir", type=Path, metavar="LOGDIR")
    _filters(p)
    p.add_argument("--limit", type=int, default=0, metavar="N", help="only the last N matching records")
    p.add_argument("--json", action="store_true", help="print the matching records as JSON lines")
    key_options(p)
    p = asub.add_parser(
        "report",
        help="summarise sessions, denials and alerts",
        description="Summarise a time range of the log in LOGDIR: file sessions and bytes per principal, denied "
        "operations, alerts, block authentication failures, key events, policy reloads, periods without a log.",
    )
    p.add_argument("logdir", type=Path, metavar="LOGDIR")
    p.add_argument(
        "--since", default="24h", metavar="TIME", help="start (RFC 3339, date, or span like 7d; default 24h)"
    )
    p.add_argument("--until", metavar="TIME", help="end (default: now)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", metavar="TIME", help="from (RFC 3339, date, or span back from now: 90m, 24h, 7d)")
    p.add_argument("--until", metavar="TIME", help="until (exclusive)")
    p.add_argument("--uid", metavar="UID", help="caller's uid or user name")
    p.add_argument("--exe", metavar="PATH", help="caller's executable")
    p.add_argument("--principal", metavar="NAME", help="policy principal the caller matched")
    p.add_argument("--path", metavar="PATH", help="a path and everything below it, or a glob")
    p.add_argument(
        "--event", action="append", metavar="KIND", help="record kind (fs.session, fs.denied, alert, key, ...)"
    )


def _key(directory: Path, args: argparse.Namespace) -> tuple[AuditKey, Any]:
    start = read_start(directory)
    hsm = start.get("hsm")
    if isinstance(hsm, dict) and hsm.get("ingest"):
        raise UsageError(
            f"the audit log in {directory} was written by an ingest mount, which has no HSM: its checkpoints "
            "carry no MAC",
            hint=f"check its hash chain with: vcfs audit verify {directory} --no-hsm",
        )
    return open_offline_key(hsm if isinstance(hsm, dict) else {}, args.pkcs11_module, args.pin_file)


def cmd_audit(args: argparse.Namespace) -> int:
    directory: Path = args.logdir
    if not directory.is_dir():
        raise AuditError(f"{directory} is not a directory", hint="pass the --audit-dir of the mount")
    return {"verify": _verify, "show": _show, "report": _report}[args.audit_command](directory, args)


def _verify(directory: Path, args: argparse.Namespace) -> int:
    key, session = (None, None) if args.no_hsm else _key(directory, args)
    try:
        report = verify_log(directory, key)
    finally:
        if session is not None:
            session.close()
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return report.exit_code
    auth = "authenticated in the HSM" if report.checked_macs else "NOT authenticated"
    print(
        f"log {report.log_id or '?'}: {report.records} records in {report.files} files, "
        f"{report.checkpoints} checkpoints ({auth})"
    )
    for w in report.warnings:
        print(f"warning: {w}")
    if report.first_bad is not None:
        print(f"FIRST BAD RECORD: {report.first_bad}")
    print(f"result: {report.state}")
    return report.exit_code


def _uid(text: str | None) -> int | None:
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise UsageError(f"no user named {text!r} on this host") from None


def _show(directory: Path, args: argparse.Namespace) -> int:
    matcher = None
    session = None
    if args.path:
        hashed = read_start(directory).get("names") == "hmac"
        key = None
        if hashed:
            key, session = _key(directory, args)
        try:
            matcher = path_matcher(args.path, key.hash_path if key is not None else None)
        finally:
            if session is not None:
                session.close()
    filters = Filters(
        since=parse_when(args.since) if args.since else None,
        until=parse_when(args.until) if args.until else None,
        uid=_uid(args.uid),
        exe=args.exe,
        principal=args.principal,
        path=matcher,
        events=frozenset(args.event) if args.event else None,
    )
    records = select(directory, filters)
    if args.limit > 0:
        records = records[-args.limit :]
    if args.json:
        for rec in records:
            print(json.dumps(rec, sort_keys=True))
    else:
        print("\n".join(table(records)))
    return 0


def _when(t: float | None) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if t is not None else "now"


def _report(directory: Path, args: argparse.Namespace) -> int:
    since = parse_when(args.since)
    until = parse_when(args.until) if args.until else None
    summary = summarise(select(directory, Filters(since=since, until=until)), since, until)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"audit report {_when(since)} .. {_when(until)}: {summary['records']} records, {summary['mounts']} mounts")
    print(f"\nfile sessions by principal ({len(summary['sessions'])}):")
    print(f"  {'UID':>6} {'EXE':<32} {'SESSIONS':>8} {'FILES':>6} {'READ':>14} {'WRITTEN':>14}")
    for row in summary["sessions"]:
        print(
            f"  {row['uid']!s:>6} {str(row['exe'])[-32:]:<32} {row['sessions']:>8} {row['files']:>6} "
            f"{row['read']:>14} {row['written']:>14}"
        )
    print(f"\ndenied operations ({sum(d['count'] for d in summary['denials'])}):")
    for d in summary["denials"]:
        print(f"  uid {d['uid']} {d['exe']}: {d['op']} x{d['count']}")
    print(f"\nalerts ({len(summary['alerts'])}):")
    for a in summary["alerts"]:
        print(f"  {a['ts']} {a['rule']}: {a['message']}")
    print(f"\nblock authentication failures: {summary['auth_failures']}")
    if summary["key_events"]:
        print("key events: " + ", ".join(f"{k} {n}" for k, n in sorted(summary["key_events"].items())))
    for r in summary["policy_reloads"]:
        print(f"policy reload {r['ts']}: {r['result']}" + (f" ({r['error']})" if r.get("error") else ""))
    for d in summary["degraded"]:
        print(f"audit log unwritable {d['since']} .. {d['until']}: {d['error']} ({d['lost']} records lost)")
    return 0
