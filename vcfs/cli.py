"""The ``vcfs`` command. The only module that prints or exits.

Expected failures arrive as VcfsError and are shown as ``vcfs: error: ...`` plus an optional
``vcfs: hint: ...`` with the error's exit code (docs/CLI.md); tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from vcfs import __version__, auditcli, keyops, mounthelper, recipientcli, runpaths
from vcfs.config import DOMAIN_RE, DomainConfig, StoreConfig, save_config
from vcfs.control import request as control_request
from vcfs.errors import MountError, UsageError, VcfsError
from vcfs.export import decrypt_file, export
from vcfs.fsck import fsck
from vcfs.guard import guard_mountpoint
from vcfs.keys import embedded
from vcfs.keys.keystore import save_keystore
from vcfs.keys.setup import HostKeyOptions, NewDomain, create_domain, store_keystore
from vcfs.logsetup import error_prefix, setup_daemon_logging
from vcfs.mountconfig import FUSE_FLAGS, MountConfig, load_mount_config
from vcfs.namekeys import enable_encrypted_names
from vcfs.names import write_dir_id
from vcfs.offline import OfflineStore, find_store, open_store
from vcfs.rewrap import rewrap
from vcfs.shred import shred
from vcfs.statusview import render_status
from vcfs.storelayout import lock_path, tree_path

if TYPE_CHECKING:
    from vcfs.mount import MountOptions


def _key_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pkcs11-module",
        metavar="[DOMAIN=]PATH",
        action="append",
        default=[],
        help="PKCS#11 module of the HSM, for every domain or one (default: the store config's; embedded SoftHSM2)",
    )
    p.add_argument(
        "--pin-file",
        metavar="[DOMAIN=]FILE",
        action="append",
        default=[],
        help="file holding the token PIN (mode 0600), for every domain or one; see docs/CLI.md for other sources",
    )
    p.add_argument(
        "--keystore",
        metavar="DIR",
        help="directory of the keystore that holds the wrapped KEKs (default: $VCFS_HOME/keystores)",
    )


def _per_domain(values: list[str]) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """``X`` applies to every domain, ``DOMAIN=X`` to one."""
    common: str | None = None
    pairs: list[tuple[str, str]] = []
    for v in values:
        name, eq, rest = v.partition("=")
        if eq and DOMAIN_RE.match(name):
            pairs.append((name, rest))
        else:
            common = v
    return common, tuple(pairs)


def _opts(args: argparse.Namespace) -> HostKeyOptions:
    module, modules = _per_domain(getattr(args, "pkcs11_module", []) or [])
    pin, pins = _per_domain(getattr(args, "pin_file", []) or [])
    return HostKeyOptions(module, pin, getattr(args, "keystore", None), pins, modules)


def _domain_arg(text: str) -> tuple[str, list[str]]:
    name, eq, prefixes = text.partition("=")
    if not eq or not DOMAIN_RE.match(name) or not prefixes:
        raise argparse.ArgumentTypeError(f"expected NAME=/PREFIX/[,/PREFIX/...], got {text!r}")
    return name, [p for p in prefixes.split(",") if p]


class _Parser(argparse.ArgumentParser):
    """No abbreviated options: ``--pin 1234`` must not quietly become ``--pin-file 1234``."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    p.add_argument("--token", metavar="LABEL", help="token for the store's keys (default: the embedded token 'vcfs')")
    p.add_argument(
        "--domain",
        metavar="NAME=/PREFIX/",
        type=_domain_arg,
        action="append",
        default=[],
        help="also create key domain NAME for files under PREFIX (repeatable; same token as the default domain; "
        "a domain on its own HSM is added with 'vcfs keys domain add')",
    )
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
        "once the mount is live and leaves the daemon running, unless -f is given. With --config, BACKING and "
        "MOUNTPOINT may come from the host mount config (docs/CONFIG.md); options given here override it.",
    )
    p.add_argument("backing", type=Path, metavar="BACKING", nargs="?")
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT", nargs="?")
    p.add_argument("--config", type=Path, metavar="FILE", help="host mount config (TOML), e.g. /etc/vcfs/NAME.toml")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground, log to stderr")
    p.add_argument(
        "-o",
        dest="fuse_options",
        action="append",
        default=[],
        metavar="FLAGS",
        help="kernel mount flags, comma-separated: " + ",".join(sorted(FUSE_FLAGS)),
    )
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
    p.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        help="access policy and audit settings ([policy], [audit], [alerts] TOML; re-read on SIGHUP); "
        "see docs/AUDIT.md",
    )
    p.add_argument("--audit-dir", type=Path, metavar="DIR", help="keep a tamper-evident audit log in DIR")
    p.add_argument(
        "--dek-cache",
        type=float,
        default=None,
        metavar="SECONDS",
        help="keep an unwrapped DEK this long after its file's last close (default 10; 0: not at all)",
    )
    p.add_argument(
        "--ingest",
        type=Path,
        action="append",
        default=[],
        metavar="RECIPIENT.pub",
        help="ingest (write-only) mount: no HSM; new files are sealed to this recipient public file (one per key "
        "domain, repeatable) and cannot be read back here once closed; see docs/KEYS.md",
    )
    p.add_argument(
        "--ingest-names",
        type=Path,
        metavar="FILE",
        help="names-key file of an ingest mount of a store with encrypted names (a secret: vcfs keys recipient names)",
    )
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
        "status",
        help="show what a running mount is doing",
        description="Ask the daemon serving MOUNTPOINT, over its control socket (root and the mount's owner only): "
        "mounted since, store, key domains and KEK versions in use, open files, bytes encrypted and decrypted, "
        "authentication failures, HSM state and latency.",
    )
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true", help="print the daemon's reply as JSON")
    p.add_argument("--socket", type=Path, metavar="PATH", help="control socket (default: found from MOUNTPOINT)")

    p = sub.add_parser(
        "guard",
        help="make an empty mount point immutable so nothing lands in it while vcfs is down",
        description="chattr +i on the (empty) mount point: while vcfs is not mounted, nobody, not even root, can "
        "write plaintext into it; mounting over it still works. Refuses a mount point that holds files.",
    )
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")

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

    p = sub.add_parser(
        "shred",
        help="crypto-shred a file or tree in the store",
        description="Overwrite the key slots of PATH's backing file (every file of a tree), sync, and remove it. "
        "PATH is inside a vcfs mount or a store (BACKING/files/...). Backups taken before still hold the wrapped "
        "key: see docs/KEYS.md. Exit 0: done; 1: some files busy (open in a mount); 2: some failed.",
    )
    p.add_argument("path", type=Path, metavar="PATH")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")
    _key_options(p)  # with encrypted names, a path in a mount is looked up through the HSM

    keys = sub.add_parser(
        "keys",
        help="key lifecycle: list, rotate, rewrap, retire, destroy, domains, ingest recipients, adopt",
        description="Manage the store's master keys, KEKs, key domains and ingest recipients. Safe while the store "
        "is mounted.",
    )
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    p = ksub.add_parser("list", help="domains, master keys, KEK versions, state, age and files per version")
    p.add_argument("backing", type=Path, metavar="BACKING")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--keystore", metavar="DIR", help="keystore directory (default: $VCFS_HOME/keystores)")
    p = ksub.add_parser(
        "rotate",
        help="create a new KEK version and make it current (new files use it at once); --master: the master key",
        description="Create KEK version N+1 of DOMAIN and make it current. With --master, rotate the domain's "
        "master key instead: every KEK is rewrapped under a new master key (files are not touched) and the old "
        "master key is destroyed in the HSM, which makes every older copy of the keystore useless.",
    )
    p.add_argument("backing", type=Path, metavar="BACKING")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("--master", action="store_true", help="rotate the master key that wraps the KEKs")
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
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="worker processes, each with its own HSM session (default 1; more keeps a slow HSM busy)",
    )
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")
    _key_options(p)
    p = ksub.add_parser("retire", help="make a KEK version decrypt-only (an archive)")
    p.add_argument("backing", type=Path, metavar="BACKING")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("version", type=int, metavar="VERSION")
    p.add_argument("--keystore", metavar="DIR", help="keystore directory (default: $VCFS_HOME/keystores)")
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
    recipientcli.add_parsers(ksub, _key_options)
    dom = ksub.add_parser("domain", help="key domains: add one (data residency)")
    dsub = dom.add_subparsers(dest="domain_command", required=True, metavar="ACTION")
    p = dsub.add_parser(
        "add",
        help="add a key domain for path prefixes, on its own token",
        description="Add key domain NAME: new files under any --prefix are wrapped under its keys. Without "
        "--pkcs11-module the token is an embedded SoftHSM2 token (created if missing). Without --kek, a master key "
        "and KEK v1 are created in the token; with --kek, that existing token KEK is used. Files already under the "
        "prefixes keep their keys until 'vcfs keys rewrap' moves them to the new domain.",
    )
    p.add_argument("backing", type=Path, metavar="BACKING")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--prefix", action="append", required=True, metavar="/PREFIX/", help="plaintext path prefix")
    p.add_argument("--token", metavar="LABEL", help="token label (default: the embedded token 'vcfs')")
    p.add_argument("--kek", metavar="URI", help="existing KEK as a PKCS#11 URI instead of a master key + KEK")
    p.add_argument("--pin-source", metavar="file:PATH", help="where hosts read this domain's PIN (stored in config)")
    _key_options(p)
    auditcli.add_parser(sub, _key_options)
    return parser


def cmd_init(args: argparse.Namespace) -> int:
    backing: Path = args.backing
    if backing.exists() and (not backing.is_dir() or any(backing.iterdir())):
        raise UsageError(
            f"{backing} exists and is not an empty directory",
            hint="vcfs init needs a new or empty directory; nothing was changed",
        )
    opts = _opts(args)
    store_id = secrets.token_hex(16)
    cfg = StoreConfig(store_id, {})
    cfg.domains = {d: DomainConfig(d, "", False, 1, [], prefixes=p) for d, p in args.domain}
    cfg.domain_map()  # refuses overlapping prefixes before any key is made
    ks = store_keystore(cfg, opts)
    wanted = [NewDomain("default", (), args.token, args.kek)]
    wanted += [NewDomain(name, tuple(prefixes), args.token) for name, prefixes in args.domain]
    cfg.domains = {}
    for new in wanted:
        if new.name in cfg.domains:
            raise UsageError(f"key domain {new.name!r} is given twice")
        cfg.domains[new.name] = create_domain(store_id, new, opts, ks)
    if ks.domains:
        save_keystore(ks)
    if not args.plain_names:
        enable_encrypted_names(cfg, opts)
    backing.mkdir(parents=True, exist_ok=True)
    tree_path(backing).mkdir(mode=0o755)
    if cfg.encrypted_names:
        write_dir_id(os.fsencode(tree_path(backing)))
    save_config(backing, cfg)
    print(f"created vcfs store {backing} (id {store_id[:12]})")
    for d in cfg.domains.values():
        where = f"files under {', '.join(d.prefixes)}" if d.prefixes else "all other files"
        stored = f"token object {d.keks[0].uri}" if d.keks[0].uri else "wrapped by its master key in the keystore"
        print(f"  domain {d.name} ({where}): token {d.token!r}, KEK v1 {stored}")
    if cfg.encrypted_names:
        print("  names and symlink targets: encrypted (AES-SIV, a names key per domain wrapped by its KEK)")
    else:
        print("  names and symlink targets: plain (readable by anyone who can read the backing store)")
    if ks.domains:
        print(f"  keystore {ks.path} — keep it outside the store and back it up with the token")
    if any(d.embedded for d in cfg.domains.values()):
        print(
            f"  embedded SoftHSM2 token under {embedded.vcfs_home()} — back it up: without it the store is unreadable"
        )
    print(f"mount it with: vcfs mount {backing} MOUNTPOINT")
    return 0


def _daemon_log(args: argparse.Namespace, mountpoint: Path) -> Path:
    if args.log_file:
        return Path(args.log_file)
    logs = embedded.vcfs_home() / "logs"
    logs.mkdir(parents=True, exist_ok=True, mode=0o700)
    name = os.path.realpath(mountpoint).strip("/").replace("/", "-") or "root"
    return logs / f"{name}.log"


def _host_keys(args: argparse.Namespace, cfg: MountConfig) -> HostKeyOptions:
    """Key options from the command line, with the host config's [keys] where the line is silent."""
    host = _opts(args)
    return replace(
        host,
        pkcs11_module=host.pkcs11_module or cfg.keys.pkcs11_module,
        pin_file=host.pin_file or cfg.keys.pin_file,
        keystore=host.keystore or cfg.keys.keystore,
    )


def _mount_options(args: argparse.Namespace) -> MountOptions:
    """The host mount config (if any) with the command line's options laid over it."""
    from vcfs.mount import MountOptions  # pyfuse3 and trio load only for the commands that need them

    cfg = load_mount_config(args.config.resolve()) if args.config else MountConfig()
    if (args.backing is None) != (args.mountpoint is None) and args.config:
        raise UsageError("give both BACKING and MOUNTPOINT, or neither (both from --config)")
    backing = args.backing or cfg.mount.backing
    mountpoint = args.mountpoint or cfg.mount.mountpoint
    if backing is None or mountpoint is None:
        where = f"[mount] backing and mountpoint in {args.config}" if args.config else "--config FILE"
        raise UsageError("vcfs mount needs BACKING and MOUNTPOINT", hint=f"give them on the command line or as {where}")
    flags = set(cfg.mount.options)
    for text in args.fuse_options:
        for flag in filter(None, text.split(",")):
            if flag not in FUSE_FLAGS:
                raise UsageError(f"-o {flag}: not a mount flag vcfs passes on", hint=", ".join(sorted(FUSE_FLAGS)))
            flags.add(flag)
    recipients, ingest_names = _ingest_options(args, cfg)
    return MountOptions(
        backing=Path(backing).resolve(),
        mountpoint=Path(mountpoint).resolve(),
        keys=_host_keys(args, cfg),
        allow_other=cfg.mount.allow_other if args.allow_other is None else args.allow_other,
        debug=args.debug or cfg.mount.debug,
        fuse_options=frozenset(flags),
        metrics=cfg.metrics,
        control=cfg.control,
        policy_file=args.policy.resolve() if args.policy else cfg.mount.policy,
        audit_dir=args.audit_dir.resolve() if args.audit_dir else cfg.mount.audit_dir,
        **({"dek_cache_seconds": args.dek_cache} if args.dek_cache is not None else {}),
        ingest=recipients,
        ingest_names=ingest_names,
    )


def _ingest_options(args: argparse.Namespace, cfg: MountConfig) -> tuple[tuple[Path, ...], Path | None]:
    """``--ingest`` / ``--ingest-names`` (or the host config's [keys] ingest, ingest_names)."""
    recipients = tuple(p.resolve() for p in args.ingest) or cfg.keys.ingest
    names = args.ingest_names.resolve() if args.ingest_names else cfg.keys.ingest_names
    if not recipients:
        if names is not None:
            raise UsageError("--ingest-names needs --ingest RECIPIENT.pub (it is for ingest mounts only)")
        return (), None
    if args.pkcs11_module or args.pin_file:
        raise UsageError("an ingest mount uses no HSM: --pkcs11-module and --pin-file do not apply to it")
    if args.dek_cache:
        raise UsageError("an ingest mount keeps no DEK after a file's last close: --dek-cache does not apply")
    return recipients, names


def cmd_mount(args: argparse.Namespace) -> int:
    from vcfs.mount import serve

    opts = _mount_options(args)
    if args.foreground:
        setup_daemon_logging(opts.debug)
        pidfile = runpaths.pid_file(opts.mountpoint)
        pidfile.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        pidfile.write_text(f"{os.getpid()}\n")
        try:
            return serve(opts, args.ready_fd)
        finally:
            pidfile.unlink(missing_ok=True)
    return _spawn_daemon(args, opts)


def _spawn_daemon(args: argparse.Namespace, opts: MountOptions) -> int:
    logfile = _daemon_log(args, opts.mountpoint)
    read_fd, write_fd = os.pipe()
    argv = [
        sys.executable,
        "-m",
        "vcfs",
        "mount",
        "-f",
        "--ready-fd",
        str(write_fd),
        str(opts.backing),
        str(opts.mountpoint),
    ]
    if args.config:
        argv += ["--config", str(args.config.resolve())]
    for text in args.fuse_options:
        argv += ["-o", text]
    for flag, values in (("--pkcs11-module", args.pkcs11_module), ("--pin-file", args.pin_file)):
        for value in values:
            argv += [flag, value]
    for path in args.ingest:
        argv += ["--ingest", str(path.resolve())]
    for flag, value in (
        ("--policy", args.policy and str(args.policy.resolve())),
        ("--audit-dir", args.audit_dir and str(args.audit_dir.resolve())),
        ("--ingest-names", args.ingest_names and str(args.ingest_names.resolve())),
    ):
        if value:
            argv += [flag, value]
    for flag, value in (("--keystore", args.keystore), ("--dek-cache", args.dek_cache)):
        if value is not None:
            argv += [flag, str(value)]
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
        print(f"mounted {opts.backing} at {opts.mountpoint} (daemon pid {proc.pid}, log {logfile})")
        return 0
    proc.wait(timeout=30)
    if reply.startswith("error"):
        head, message, hint, *_ = [*reply.split("\n"), "", "", ""]
        err = VcfsError(message, hint or None)
        err.exit_code = int(head.split()[1])
        raise err
    raise MountError(f"the vcfs daemon exited (status {proc.returncode}) before mounting", hint=f"see {logfile}")


def _daemon_pid(mp: Path) -> int | None:
    """The pid of the daemon serving ``mp``: its pid file, else the store lock it holds."""
    for path in (runpaths.pid_file(mp), _lock_of(mp)):
        try:
            if path is not None:
                return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return None


def _lock_of(mp: Path) -> Path | None:
    from vcfs.mount import mount_source

    source = mount_source(mp)
    return lock_path(Path(source)) if source else None


def cmd_umount(args: argparse.Namespace) -> int:
    from vcfs.mount import mounted_vcfs

    mp: Path = args.mountpoint
    if not mounted_vcfs(mp):
        raise UsageError(f"{mp} is not a vcfs mount")
    pid = _daemon_pid(mp)
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


def cmd_status(args: argparse.Namespace) -> int:
    from vcfs.mount import mounted_vcfs

    mp: Path = args.mountpoint
    if args.socket is None and not mounted_vcfs(mp):
        raise UsageError(f"{mp} is not a vcfs mount")
    path = args.socket or next((p for p in runpaths.socket_candidates(mp) if p.exists()), None)
    if path is None:
        tried = ", ".join(str(p) for p in runpaths.socket_candidates(mp))
        raise MountError(
            f"no control socket found for {mp} (tried {tried})",
            hint="the mount's [control] may be disabled or elsewhere; pass --socket PATH",
        )
    reply = control_request(path, {"op": "status"})
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        print(render_status(reply))
    return 0


def cmd_guard(args: argparse.Namespace) -> int:
    print(guard_mountpoint(args.mountpoint.resolve()))
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
    return open_store(args.backing.resolve(), _opts(args))


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
        if report.orphan_journals:
            done = "removed" if args.repair else "left (fsck --repair removes them)"
            print(f"{report.orphan_journals} journals of files that no longer exist {done}")
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
    store = open_store(backing, _opts(args))
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


def _print_keys(rows: list[dict[str, object]]) -> None:
    print(f"{'DOMAIN':<12} {'TIER':<9} {'VERSION':>7}  {'STATE':<10} {'CURRENT':<7} {'AGE(d)':>6} {'FILES':>7}  WHERE")
    for r in rows:
        age = "" if r["age_days"] is None else r["age_days"]
        cur = "yes" if r["current"] else ""
        files = "" if r["files"] is None else r["files"]
        where = f"token {r['token']}" if r["stored"] == "token" else f"keystore (master m{r['master']})"
        if r["tier"] == "recipient":
            where = f"keystore (private key wrapped under KEK v{r['kek']})" if r.get("kek") else "keystore (missing)"
        if r["state"] == "destroyed":
            where = "-"
        head = f"{r['domain']:<12} {r['tier']:<9} {r['version']:>7}  {r['state']:<10} {cur:<7}"
        print(f"{head} {age:>6} {files:>7}  {where}")
    prefixes = {str(r["domain"]): r["prefixes"] for r in rows}
    for domain, plist in prefixes.items():
        assert isinstance(plist, list)
        print(f"domain {domain}: {', '.join(plist) if plist else '(default: every path under no prefix)'}")


def cmd_keys(args: argparse.Namespace) -> int:
    backing = args.backing.resolve()
    action = args.keys_command
    if action == "list":
        rows = keyops.list_keys(backing, _opts(args))
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            _print_keys(rows)
        return 0
    if action == "rotate" and args.master:
        version, moved = keyops.rotate_master(backing, args.domain, _opts(args))
        print(f"master key {args.domain}/m{version} is current; {moved} KEKs rewrapped under it, older master keys")
        print("destroyed in the HSM: older copies of the keystore can no longer be unwrapped.")
        return 0
    if action == "rotate":
        version = keyops.rotate(backing, args.domain, _opts(args))
        print(f"KEK {args.domain}/v{version} is now current; new files use it.")
        print(f"rewrap existing files with: vcfs keys rewrap {args.backing} {args.domain}")
        return 0
    if action == "rewrap":
        report = rewrap(backing, args.domain, args.from_version, _opts(args), _progress("rewrap"), args.jobs)
        if args.json:
            print(json.dumps(report.to_json(), indent=2))
        else:
            for f in report.failed:
                print(f"{f['path']}: {f['error']}")
            print(
                f"{report.rewrapped} rewrapped ({report.moved} moved to another domain), {report.already} already "
                f"current, {len(report.busy)} busy (open in a mount; run again later), {len(report.failed)} failed "
                f"({report.seconds:.1f} s)"
            )
            if report.ingest:
                print(
                    f"{report.ingest} files are wrapped to a recipient (ingest hosts): vcfs keys adopt {args.backing}"
                )
        return report.exit_code
    if action in ("adopt", "recipient"):
        return recipientcli.cmd(args, backing, _opts(args), _progress("adopt"))
    if action == "retire":
        keyops.retire(backing, args.domain, args.version, _opts(args))
        print(f"KEK {args.domain}/v{args.version} retired: it still decrypts, it wraps nothing new")
        return 0
    if action == "domain":
        new = NewDomain(args.name, tuple(args.prefix), args.token, args.kek, args.pin_source)
        domain = keyops.add_domain(backing, new, _opts(args))
        print(f"key domain {domain.name} added for {', '.join(domain.prefixes)} (token {domain.token!r})")
        print(f"files already there keep their keys until: vcfs keys rewrap {args.backing} {domain.name}")
        return 0
    shredded = keyops.destroy(backing, args.domain, args.version, args.force, _opts(args))
    print(f"KEK {args.domain}/v{args.version} destroyed; {shredded} files wrapped under it are now unreadable")
    return 0


def cmd_shred(args: argparse.Namespace) -> int:
    report = shred(args.path, _opts(args))
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for b in report.busy:
            print(f"{b}: open in a mount; close it and run again")
        for f in report.failed:
            print(f"{f['path']}: {f['error']}")
        print(f"{len(report.shredded)} files shredded, {report.removed} other entries removed")
    return report.exit_code


COMMANDS = {
    "audit": auditcli.cmd_audit,
    "keys": cmd_keys,
    "init": cmd_init,
    "mount": cmd_mount,
    "umount": cmd_umount,
    "status": cmd_status,
    "guard": cmd_guard,
    "fsck": cmd_fsck,
    "export": cmd_export,
    "decrypt": cmd_decrypt,
    "shred": cmd_shred,
    "path": cmd_path,
}


def _fail(exc: VcfsError) -> int:
    prefix = error_prefix()  # <3> when stderr is the journal
    print(f"{prefix}vcfs: error: {exc.message}", file=sys.stderr)
    if exc.hint:
        print(f"{prefix}vcfs: hint: {exc.hint}", file=sys.stderr)
    return exc.exit_code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "mount":  # the daemon sets up its own logging; commands show warnings plainly
        logging.basicConfig(level=logging.WARNING, format="vcfs: %(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except VcfsError as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # vcfs status | head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # a path that is not there, not readable, a full disk: say which, no traceback
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(VcfsError(f"{where}{exc.strerror or exc}"))


def mount_helper(argv: list[str] | None = None) -> int:
    """``mount.vcfs`` / ``mount.fuse.vcfs``: called by mount(8) as HELPER SPEC DIR [-o OPTIONS]."""
    try:
        args = mounthelper.mount_argv(sys.argv[1:] if argv is None else argv)
    except VcfsError as exc:
        return _fail(exc)
    return 0 if args is None else main(args)
