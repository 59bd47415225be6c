"""The ``vcfs`` command. The only module that prints or exits.

Expected failures arrive as VcfsError and are shown as ``vcfs: error: ...`` plus an optional
``vcfs: hint: ...`` with the error's exit code (docs/CLI.md); tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from vcfs import __version__, keyops
from vcfs.config import StoreConfig, save_config
from vcfs.errors import MountError, UsageError, VcfsError
from vcfs.export import decrypt_file, export
from vcfs.fsck import fsck
from vcfs.keys import embedded
from vcfs.keys.setup import HostKeyOptions, init_domain
from vcfs.mount import MountOptions, mounted_vcfs, serve
from vcfs.namekeys import enable_encrypted_names
from vcfs.names import write_dir_id
from vcfs.offline import OfflineStore, find_store, open_store
from vcfs.storelayout import tree_path


def _key_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pkcs11-module", metavar="PATH", help="PKCS#11 module of the HSM (default: embedded SoftHSM2)")
    p.add_argument("--pin-file", metavar="FILE", help="file holding the token PIN (mode 0600)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vcfs", description="Transparent encrypting filesystem for recordings (AES-256-GCM, keys in an HSM)."
    )
    parser.add_argument("--version", action="version", version=f"vcfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "init",
        help="create an empty encrypted store",
        description="Create an empty vcfs store in "
        "BACKING (an empty or new directory). Without --kek, a KEK is created in the embedded "
        "SoftHSM2 token under $VCFS_HOME (default ~/.local/share/vcfs).",
    )
    p.add_argument("backing", type=Path, metavar="BACKING")
    p.add_argument("--kek", metavar="URI", help="existing KEK as a PKCS#11 URI (pkcs11:token=...;object=...)")
    p.add_argument(
        "--plain-names",
        action="store_true",
        help="keep file and directory names and symlink targets readable in the backing store (default: encrypted; "
        "readable names tell whoever sees the store or a backup who recorded what, see docs/THREAT_MODEL.md)",
    )
    _key_options(p)

    p = sub.add_parser(
        "mount",
        help="mount a store",
        description="Mount the store BACKING at MOUNTPOINT. Returns "
        "once the mount is live and leaves the daemon running, unless -f is given.",
    )
    p.add_argument("backing", type=Path, metavar="BACKING")
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground, log to stderr")
    p.add_argument("--log-file", metavar="FILE", help="daemon log (default: $VCFS_HOME/logs/<mountpoint>.log)")
    p.add_argument(
        "--allow-other",
        dest="allow_other",
        action="store_true",
        default=None,
        help="let other users use the mount (default when run as root)",
    )
    p.add_argument("--no-allow-other", dest="allow_other", action="store_false")
    p.add_argument("--debug", action="store_true", help="log every FUSE request")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    _key_options(p)

    p = sub.add_parser(
        "umount",
        help="flush and unmount",
        description="Flush everything to the backing store and unmount MOUNTPOINT; waits for the daemon to exit.",
    )
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the daemon (default 120)")

    p = sub.add_parser(
        "fsck",
        help="check (and repair) every header and block",
        description="Check every header and every block of the store, including each file's end mark. Works on a "
        "mounted store and on a backup copy. Exit 0: clean; 1: problems found and all repaired; 2: problems left.",
    )
    p.add_argument("backing", type=Path, metavar="BACKING")
    p.add_argument(
        "--repair",
        action="store_true",
        help="cut torn or unterminated file tails after their last authentic block (removed bytes go to "
        "BACKING/quarantine/); needs the store unmounted",
    )
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")
    _key_options(p)

    p = sub.add_parser(
        "export",
        help="decrypt a store or subtree to a directory, offline",
        description="Restore plaintext without mounting: decrypt BACKING (or SUBPATH inside it) into DEST, a new or "
        "empty directory. A damaged file is written as NAME.vcfs-partial holding its authentic prefix.",
    )
    p.add_argument("backing", type=Path, metavar="BACKING")
    p.add_argument("subpath", nargs="?", metavar="SUBPATH", help="path inside the store (default: everything)")
    p.add_argument("dest", type=Path, metavar="DEST")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")
    _key_options(p)

    p = sub.add_parser(
        "decrypt",
        help="decrypt one backing file, offline",
        description="Decrypt one backing file (BACKING/files/...) to OUT ('-' for stdout). The store is found from "
        "the file's path.",
    )
    p.add_argument("backing_file", type=Path, metavar="BACKINGFILE")
    p.add_argument("out", metavar="OUT", help="output file, '-' for stdout, or a directory: OUT/<real name>")
    _key_options(p)

    p = sub.add_parser(
        "path",
        help="map a plaintext path to its backing path, or back",
        description="Print the backing path of the entry at plaintext PATH (as seen in the mount), or with "
        "--backing the plaintext path of a backing entry. Works offline and on a mounted store; needs the HSM "
        "when names are encrypted.",
    )
    p.add_argument("backing", type=Path, metavar="BACKING")
    p.add_argument("plain", nargs="?", metavar="PATH", help="plaintext path inside the store, e.g. /2026/call.mp4")
    p.add_argument("--backing", dest="backing_entry", type=Path, metavar="BACKINGPATH", help="a path in BACKING/files")
    p.add_argument("--json", action="store_true", help="print both paths as JSON")
    _key_options(p)

    keys = sub.add_parser(
        "keys",
        help="KEK lifecycle: list, rotate, rewrap, retire, destroy",
        description="Manage the store's key-encryption keys. Safe while the store is mounted.",
    )
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    p = ksub.add_parser("list", help="domains, KEK versions, state, age and files per version")
    p.add_argument("backing", type=Path, metavar="BACKING")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = ksub.add_parser("rotate", help="create a new KEK version and make it current (new files use it at once)")
    p.add_argument("backing", type=Path, metavar="BACKING")
    p.add_argument("domain", metavar="DOMAIN")
    _key_options(p)
    p = ksub.add_parser(
        "rewrap",
        help="rewrap every header under the current KEK (no data is rewritten)",
        description="Rewrap every file header of DOMAIN (default: the default domain) under its "
        "current KEK; data blocks are not touched. Resumable: files open in a mount are skipped "
        "(exit 1) and a later run finishes them.",
    )
    p.add_argument("backing", type=Path, metavar="BACKING")
    p.add_argument("domain", nargs="?", metavar="DOMAIN")
    p.add_argument("--from", dest="from_version", type=int, metavar="VERSION", help="only files under VERSION")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")
    _key_options(p)
    p = ksub.add_parser("retire", help="make a KEK version decrypt-only (an archive)")
    p.add_argument("backing", type=Path, metavar="BACKING")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("version", type=int, metavar="VERSION")
    p = ksub.add_parser(
        "destroy",
        help="delete a KEK version from the HSM: crypto-shred what it wraps",
        description="Destroy KEK VERSION in the HSM. Files (and every backup copy of them) still "
        "wrapped under it become permanently unreadable; refused while any file uses it, unless "
        "--force.",
    )
    p.add_argument("backing", type=Path, metavar="BACKING")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("version", type=int, metavar="VERSION")
    p.add_argument("--force", action="store_true", help="destroy even though files still use it")
    _key_options(p)
    return parser


def _run_dir() -> Path:
    return embedded.vcfs_home() / "run"


def _mount_key(mountpoint: Path) -> str:
    real = os.path.realpath(mountpoint)
    return hashlib.sha256(real.encode()).hexdigest()[:16]


def cmd_init(args: argparse.Namespace) -> int:
    backing: Path = args.backing
    if backing.exists() and (not backing.is_dir() or any(backing.iterdir())):
        raise UsageError(
            f"{backing} exists and is not an empty directory",
            hint="vcfs init needs a new or empty directory; nothing was changed",
        )
    opts = HostKeyOptions(args.pkcs11_module, args.pin_file)
    store_id = secrets.token_hex(16)
    domain = init_domain(store_id, args.kek, opts)
    cfg = StoreConfig(store_id, {domain.name: domain})
    if not args.plain_names:
        enable_encrypted_names(cfg, opts)
    backing.mkdir(parents=True, exist_ok=True)
    tree_path(backing).mkdir(mode=0o755)
    if cfg.encrypted_names:
        write_dir_id(os.fsencode(tree_path(backing)))
    save_config(backing, cfg)
    kek = domain.keks[0]
    print(f"created vcfs store {backing} (id {store_id[:12]})")
    print(f"  KEK {domain.name}/v{kek.version}: {kek.uri}")
    if cfg.encrypted_names:
        print(f"  names and symlink targets: encrypted (AES-SIV, names key wrapped by KEK {domain.name}/v1)")
    else:
        print("  names and symlink targets: plain (readable by anyone who can read the backing store)")
    if domain.embedded:
        print(
            f"  embedded SoftHSM2 token under {embedded.vcfs_home()} — back it up: without it the store is unreadable"
        )
    print(f"mount it with: vcfs mount {backing} MOUNTPOINT")
    return 0


def _daemon_log(args: argparse.Namespace) -> Path:
    if args.log_file:
        return Path(args.log_file)
    logs = embedded.vcfs_home() / "logs"
    logs.mkdir(parents=True, exist_ok=True, mode=0o700)
    name = os.path.realpath(args.mountpoint).strip("/").replace("/", "-") or "root"
    return logs / f"{name}.log"


def cmd_mount(args: argparse.Namespace) -> int:
    opts = MountOptions(
        backing=args.backing.resolve(),
        mountpoint=args.mountpoint.resolve(),
        keys=HostKeyOptions(args.pkcs11_module, args.pin_file),
        allow_other=args.allow_other,
        debug=args.debug,
    )
    if args.foreground:
        logging.basicConfig(
            level=logging.DEBUG if args.debug else logging.INFO,
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        run = _run_dir()
        run.mkdir(parents=True, exist_ok=True, mode=0o700)
        pidfile = run / f"{_mount_key(opts.mountpoint)}.pid"
        pidfile.write_text(f"{os.getpid()}\n")
        try:
            return serve(opts, args.ready_fd)
        finally:
            pidfile.unlink(missing_ok=True)
    return _spawn_daemon(args)


def _spawn_daemon(args: argparse.Namespace) -> int:
    logfile = _daemon_log(args)
    read_fd, write_fd = os.pipe()
    argv = [
        sys.executable,
        "-m",
        "vcfs",
        "mount",
        "-f",
        "--ready-fd",
        str(write_fd),
        str(args.backing),
        str(args.mountpoint),
    ]
    for flag, value in (("--pkcs11-module", args.pkcs11_module), ("--pin-file", args.pin_file)):
        if value:
            argv += [flag, value]
    if args.allow_other is not None:
        argv.append("--allow-other" if args.allow_other else "--no-allow-other")
    if args.debug:
        argv.append("--debug")
    with open(logfile, "ab") as log:
        proc = subprocess.Popen(
            argv, pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        reply = pipe.read().decode(errors="replace")
    if reply.startswith("ok"):
        print(f"mounted {args.backing} at {args.mountpoint} (daemon pid {proc.pid}, log {logfile})")
        return 0
    proc.wait(timeout=30)
    if reply.startswith("error"):
        head, message, hint, *_ = [*reply.split("\n"), "", "", ""]
        err = VcfsError(message, hint or None)
        err.exit_code = int(head.split()[1])
        raise err
    raise MountError(f"the vcfs daemon exited (status {proc.returncode}) before mounting", hint=f"see {logfile}")


def cmd_umount(args: argparse.Namespace) -> int:
    mp: Path = args.mountpoint
    if not mounted_vcfs(mp):
        raise UsageError(f"{mp} is not a vcfs mount")
    pidfile = _run_dir() / f"{_mount_key(mp)}.pid"
    pid = int(pidfile.read_text()) if pidfile.exists() else None
    res = subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True, text=True)
    if res.returncode != 0:
        busy = "busy" in res.stderr.lower()
        raise MountError(
            f"could not unmount {mp}: {res.stderr.strip()}",
            hint="close the files still open in it (see: fuser -vm MOUNTPOINT)" if busy else None,
        )
    deadline = time.monotonic() + args.timeout
    while pid is not None and os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    break
        except OSError:
            break
        time.sleep(0.05)
    print(f"unmounted {mp}")
    return 0


def _progress(label: str, as_bytes: bool = False) -> Callable[[int, int], None] | None:
    """A one-line progress bar on a terminal; nothing when stderr is not one."""
    if not sys.stderr.isatty():
        return None
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < 0.1:
            return
        last[0] = now
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 30)
        amount = f"{done / 2**20:.0f}/{total / 2**20:.0f} MiB" if as_bytes else f"{done}/{total}"
        end = "\n" if done >= total else ""
        print(f"\r{label} [{bar:<30}] {frac:4.0%} {amount}", end=end, file=sys.stderr, flush=True)

    return show


def _store(args: argparse.Namespace) -> OfflineStore:
    return open_store(args.backing.resolve(), HostKeyOptions(args.pkcs11_module, args.pin_file))


def cmd_fsck(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        report = fsck(store, args.repair, _progress("fsck"))
    finally:
        store.close()
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for p in report.problems:
            where = f" block {p.block}" if p.block is not None else ""
            state = " [repaired; removed bytes in " + str(p.quarantined) + "]" if p.repaired else ""
            print(f"{p.path}:{where} {p.kind}: {p.detail}{state}")
        print(
            f"{report.files} files, {report.blocks} blocks, {report.bytes} bytes checked; "
            f"{len(report.problems)} problems, {sum(p.repaired for p in report.problems)} repaired"
        )
    return report.exit_code


def cmd_export(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        report = export(store, args.subpath, args.dest, _progress("export", as_bytes=True))
    finally:
        store.close()
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for p in report.problems:
            partial = f" (authentic prefix in {p['partial']})" if "partial" in p else ""
            print(f"{p['path']}: {p['error']}{partial}")
        print(
            f"exported {report.files} files ({report.bytes} bytes), {report.dirs} directories, "
            f"{report.symlinks} symlinks to {args.dest}; {len(report.problems)} damaged"
        )
    return report.exit_code


def cmd_decrypt(args: argparse.Namespace) -> int:
    backing, _rel = find_store(args.backing_file)
    store = open_store(backing, HostKeyOptions(args.pkcs11_module, args.pin_file))
    try:
        source = args.backing_file.resolve()
        out = args.out
        into_dir = out != "-" and Path(out).is_dir()
        try:
            plain = store.plain_of(source)
        except VcfsError:
            if into_dir:
                raise  # the real name is needed, and it cannot be had
            plain = os.fsdecode(source)
        if into_dir:
            out = str(Path(out) / os.path.basename(plain))  # restore the real name
        size = decrypt_file(store, source, out)
    finally:
        store.close()
    if out != "-":
        print(f"decrypted {size} bytes of {plain} to {out}")
    return 0


def cmd_path(args: argparse.Namespace) -> int:
    if (args.plain is None) == (args.backing_entry is None):
        raise UsageError("give either a plaintext PATH or --backing BACKINGPATH", hint="see vcfs path --help")
    store = _store(args)
    try:
        if args.backing_entry is not None:
            backing_entry = Path(os.path.abspath(args.backing_entry))
            plain = store.plain_of(backing_entry)
        else:
            backing_entry = store.backing_of(args.plain)
            plain = "/" + "/".join(p for p in args.plain.split("/") if p and p != ".")
    finally:
        store.close()
    if args.json:
        print(json.dumps({"plain": plain, "backing": str(backing_entry)}))
    else:
        print(plain if args.backing_entry is not None else backing_entry)
    return 0


def _opts(args: argparse.Namespace) -> HostKeyOptions:
    return HostKeyOptions(args.pkcs11_module, args.pin_file)


def cmd_keys(args: argparse.Namespace) -> int:
    backing = args.backing.resolve()
    action = args.keys_command
    if action == "list":
        rows = keyops.list_keys(backing)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{'DOMAIN':<12} {'VERSION':>7}  {'STATE':<10} {'CURRENT':<7} {'AGE(d)':>6} {'FILES':>7}")
        for r in rows:
            age = "" if r["age_days"] is None else r["age_days"]
            cur = "yes" if r["current"] else ""
            print(f"{r['domain']:<12} {r['version']:>7}  {r['state']:<10} {cur:<7} {age:>6} {r['files']:>7}")
        return 0
    if action == "rotate":
        version = keyops.rotate(backing, args.domain, _opts(args))
        print(f"KEK {args.domain}/v{version} is now current; new files use it.")
        print(f"rewrap existing files with: vcfs keys rewrap {args.backing} {args.domain}")
        return 0
    if action == "rewrap":
        report = keyops.rewrap(backing, args.domain, args.from_version, _opts(args), _progress("rewrap"))
        if args.json:
            print(json.dumps(report.to_json(), indent=2))
        else:
            for f in report.failed:
                print(f"{f['path']}: {f['error']}")
            print(
                f"{report.rewrapped} rewrapped, {report.already} already current, {len(report.busy)} busy "
                f"(open in a mount; run again later), {len(report.failed)} failed"
            )
        return report.exit_code
    if action == "retire":
        keyops.retire(backing, args.domain, args.version)
        print(f"KEK {args.domain}/v{args.version} retired: it still decrypts, it wraps nothing new")
        return 0
    shredded = keyops.destroy(backing, args.domain, args.version, args.force, _opts(args))
    print(f"KEK {args.domain}/v{args.version} destroyed; {shredded} files wrapped under it are now unreadable")
    return 0


COMMANDS = {
    "keys": cmd_keys,
    "init": cmd_init,
    "mount": cmd_mount,
    "umount": cmd_umount,
    "fsck": cmd_fsck,
    "export": cmd_export,
    "decrypt": cmd_decrypt,
    "path": cmd_path,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except VcfsError as exc:
        print(f"vcfs: error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"vcfs: hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
