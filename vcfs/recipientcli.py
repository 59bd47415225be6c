"""``vcfs keys recipient ...`` and ``vcfs keys adopt``: the command line of ingest (write-only) hosts' keys.

Kept out of vcfs/cli.py, like the audit commands: cli.py adds these parsers to ``vcfs keys``
and hands the parsed arguments here. Printing is done here, errors go back as VcfsError.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vcfs import recipientops
from vcfs.config import load_config
from vcfs.ingestnames import write_names_file
from vcfs.keys.recipients import recipient_name
from vcfs.keys.setup import HostKeyOptions
from vcfs.rewrap import rewrap
from vcfs.store import replace_file


def add_parsers(ksub: Any, key_options: Callable[[argparse.ArgumentParser], None]) -> None:
    """``vcfs keys recipient ...`` (ingest hosts' public keys) and ``vcfs keys adopt``."""
    rec = ksub.add_parser(
        "recipient",
        help="recipient key pairs for ingest (write-only) hosts: new, rotate, export, destroy, names",
        description="A recipient is a hybrid post-quantum key pair (X-Wing: ML-KEM-768 + X25519) of a key domain. "
        "Ingest hosts get only its public file and seal every new file's key to it; its private key is kept "
        "wrapped by the domain's KEK in the keystore, so only hosts with the HSM can read those files. "
        "See docs/KEYS.md.",
    )
    rsub = rec.add_subparsers(dest="recipient_command", required=True, metavar="ACTION")
    for name, text in (
        ("new", "the domain's first recipient key pair; writes its public file"),
        ("rotate", "a new recipient key pair, made current; new ingest mounts given its file use it"),
    ):
        p = rsub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("backing", type=Path, metavar="BACKING")
        p.add_argument("domain", metavar="DOMAIN")
        p.add_argument("--out", type=Path, required=True, metavar="FILE", help="where to write the public file")
        key_options(p)
    p = rsub.add_parser("export", help="write a recipient's public file again (no HSM needed)")
    p.add_argument("backing", type=Path, metavar="BACKING")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("version", type=int, nargs="?", metavar="VERSION", help="default: the current recipient")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="where to write the public file")
    p.add_argument("--keystore", metavar="DIR", help="keystore directory (default: $VCFS_HOME/keystores)")
    p = rsub.add_parser(
        "destroy",
        help="delete a recipient's private key: crypto-shred every file still wrapped to it",
        description="Delete the wrapped private key of recipient VERSION from the keystore. Files still wrapped "
        "to it (not adopted) become permanently unreadable; refused while any file is, unless --force.",
    )
    p.add_argument("backing", type=Path, metavar="BACKING")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("version", type=int, metavar="VERSION")
    p.add_argument("--force", action="store_true", help="destroy even though files are still wrapped to it")
    key_options(p)
    p = rsub.add_parser(
        "names",
        help="write the names-key file ingest hosts of a store with encrypted names need (a SECRET)",
        description="Unwrap every key domain's names key through the HSM and write them to FILE (mode 0600) for "
        "ingest hosts: they must encrypt and list names without an HSM. Whoever holds FILE and the store can read "
        "every file name, never contents (docs/THREAT_MODEL.md).",
    )
    p.add_argument("backing", type=Path, metavar="BACKING")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="where to write the names keys (0600)")
    key_options(p)
    p = ksub.add_parser(
        "adopt",
        help="rewrap files that ingest hosts wrapped to a recipient under the domain's KEK (headers only)",
        description="Move every file (under PATH, a plaintext path) whose key is wrapped to a recipient under its "
        "domain's current KEK, then erase the recipient's wrapping; data blocks are not touched. Resumable: files "
        "open in a mount are skipped (exit 1) and a later run finishes them.",
    )
    p.add_argument("backing", type=Path, metavar="BACKING")
    p.add_argument("path", nargs="?", metavar="PATH", help="plaintext path of a file or directory (default: all)")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="worker processes (default 1)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")
    key_options(p)


def cmd(
    args: argparse.Namespace, backing: Path, opts: HostKeyOptions, progress: Callable[[int, int], None] | None
) -> int:
    if args.keys_command == "recipient":
        return _recipient(args, backing, opts)
    report = rewrap(backing, None, None, opts, progress, args.jobs, adopt=True, subpath=args.path)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for f in report.failed:
            print(f"{f['path']}: {f['error']}")
        print(
            f"{report.rewrapped} adopted (now under their domain's KEK), {report.already} already under a KEK, "
            f"{len(report.busy)} busy (open in a mount; run again later), {len(report.failed)} failed "
            f"({report.seconds:.1f} s)"
        )
    return report.exit_code


def _recipient(args: argparse.Namespace, backing: Path, opts: HostKeyOptions) -> int:
    action = args.recipient_command
    if action == "names":
        write_names_file(args.out, load_config(backing), recipientops.names_secrets(backing, opts))
        print(f"names keys of every key domain written to {args.out} (mode 0600): a SECRET for ingest hosts only")
        return 0
    if action == "destroy":
        shredded = recipientops.destroy(backing, args.domain, args.version, args.force, opts)
        print(f"recipient {args.domain}/r{args.version} destroyed; {shredded} files wrapped to it are now unreadable")
        return 0
    if action == "export":
        public = recipientops.export_public(backing, args.domain, args.version, opts)
    else:
        public = recipientops.create(backing, args.domain, opts, rotate=action == "rotate")
    replace_file(args.out, public.to_toml().encode())
    name = recipient_name(public.ref)
    print(f"recipient {name} (fingerprint {public.fingerprint.hex()}) public file: {args.out}")
    if action != "export":
        print(f"mount an ingest host with: vcfs mount --ingest {args.out.name} BACKING MOUNTPOINT")
    return 0
