"""The host mount config: ``/etc/vcfs/<instance>.toml``, read by ``vcfs mount --config FILE``.

What belongs here is everything about *this host's* mount that is not in the (shared,
backed-up) store config ``BACKING/vcfs.conf``: where the store and the mount point are, which
PKCS#11 module and PIN file to use, mount options, metrics and the control socket. No secret
goes in it: the PIN comes from a file named here or from the systemd credential ``hsm-pin``.

Layout: one TOML table per concern, each parsed by its own function over a plain dict with a
``Problems`` collector (vcfs/tomllines.py), so that every mistake is reported at once with its
line, and unknown keys and tables are errors (a typo must never silently switch something
off). Adding a table means writing ``parse_<name>(table, p, where)`` returning a frozen
dataclass, adding a field to ``MountConfig`` and an entry to ``SECTIONS``. Command-line flags
override the file; that merge happens in the CLI. docs/CONFIG.md describes every key.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vcfs.errors import ConfigError
from vcfs.tomllines import LineMap, Problems
from vcfs.tomllines import Path as KeyPath

# Mount flags passed to the kernel as they are. nodev and nosuid are always on (a recording
# store has no use for device files or set-uid programs), so their opposites are refused.
FUSE_FLAGS = frozenset({"ro", "rw", "noexec", "exec", "noatime", "sync", "dirsync"})  # what libfuse 3 accepts
ALWAYS_ON = frozenset({"nodev", "nosuid"})


@dataclass(frozen=True, slots=True)
class MountSection:
    backing: Path | None = None
    mountpoint: Path | None = None
    allow_other: bool | None = None  # None: allow other users when run as root
    options: frozenset[str] = frozenset()  # from FUSE_FLAGS
    debug: bool = False
    policy: Path | None = None  # access policy + audit + alerts file (docs/AUDIT.md), re-read on SIGHUP
    audit_dir: Path | None = None  # where the audit trail goes (overrides the policy file's [audit] dir)


@dataclass(frozen=True, slots=True)
class KeysSection:
    pkcs11_module: str | None = None
    pin_file: str | None = None
    keystore: str | None = None  # directory of the keystore with the wrapped KEKs (docs/KEYS.md)
    ingest: tuple[Path, ...] = ()  # recipient public files: an ingest (write-only) mount without an HSM
    ingest_names: Path | None = None  # names-key file of an ingest mount (stores with encrypted names)


@dataclass(frozen=True, slots=True)
class MetricsSection:
    listen: tuple[str, int] | None = None  # loopback address and port of the HTTP exporter
    textfile: Path | None = None  # node_exporter textfile collector file, rewritten every interval
    interval: float = 15.0

    @property
    def enabled(self) -> bool:
        return self.listen is not None or self.textfile is not None


@dataclass(frozen=True, slots=True)
class ControlSection:
    enabled: bool = True
    socket: Path | None = None  # None: the default place (vcfs/runpaths.py)


@dataclass(frozen=True, slots=True)
class MountConfig:
    source: str = ""  # the file it came from, for messages
    mount: MountSection = field(default_factory=MountSection)
    keys: KeysSection = field(default_factory=KeysSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    control: ControlSection = field(default_factory=ControlSection)


class _Table:
    """Typed reads from one table; wrong types and unknown keys go to ``p`` with their path."""

    def __init__(self, table: Any, where: KeyPath, p: Problems, known: set[str]) -> None:
        self.t: dict[str, Any] = table if isinstance(table, dict) else {}
        self.where = where
        self.p = p
        if not isinstance(table, dict):
            p.add(where, "must be a table")
        for key in sorted(set(self.t) - known):
            p.add((*where, key), f"unknown key (expected one of: {', '.join(sorted(known))})")

    def bad(self, key: str, message: str) -> None:
        self.p.add((*self.where, key), message)

    def get(self, key: str, kind: type | tuple[type, ...], want: str) -> Any:
        """The value, or None if absent or of the wrong type (which is reported)."""
        if key not in self.t:
            return None
        value = self.t[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            self.bad(key, f"must be {want}")
            return None
        return value

    def path(self, key: str) -> Path | None:
        value = self.get(key, str, "an absolute path (a string)")
        if value is None:
            return None
        if not value.startswith("/"):
            self.bad(key, f"must be an absolute path, not {value!r}")
            return None
        return Path(value)


def parse_mount(table: Any, p: Problems, where: KeyPath = ("mount",)) -> MountSection:
    t = _Table(table, where, p, {"backing", "mountpoint", "allow_other", "options", "debug", "policy", "audit_dir"})
    options = t.get("options", list, 'a list of mount flags such as ["noexec", "noatime"]') or []
    flags = set()
    for opt in options:
        if opt in ALWAYS_ON:
            continue
        if not isinstance(opt, str) or opt not in FUSE_FLAGS:
            t.bad("options", f"{opt!r} is not a mount flag vcfs passes on (one of: {', '.join(sorted(FUSE_FLAGS))})")
            continue
        flags.add(opt)
    return MountSection(
        backing=t.path("backing"),
        mountpoint=t.path("mountpoint"),
        allow_other=t.get("allow_other", bool, "true or false"),
        options=frozenset(flags),
        debug=bool(t.get("debug", bool, "true or false")),
        policy=t.path("policy"),
        audit_dir=t.path("audit_dir"),
    )


def parse_keys(table: Any, p: Problems, where: KeyPath = ("keys",)) -> KeysSection:
    t = _Table(table, where, p, {"pkcs11_module", "pin_file", "keystore", "ingest", "ingest_names"} | {"pin"})
    if "pin" in t.t:
        t.bad("pin", "a PIN never goes in a config file: name a pin_file, or use the systemd credential hsm-pin")
    module = t.path("pkcs11_module")
    pin_file = t.path("pin_file")
    keystore = t.path("keystore")
    ingest = _ingest_files(t)
    if ingest and (module or pin_file):
        t.bad("ingest", "an ingest mount uses no HSM: drop pkcs11_module and pin_file from this [keys] table")
    names = t.path("ingest_names")
    if names is not None and not ingest:
        t.bad("ingest_names", "only an ingest mount (ingest = [...]) takes a names-key file")
    return KeysSection(
        str(module) if module else None,
        str(pin_file) if pin_file else None,
        str(keystore) if keystore else None,
        ingest,
        names,
    )


def _ingest_files(t: _Table) -> tuple[Path, ...]:
    raw = t.get("ingest", list, 'a list of recipient public files, e.g. ["/etc/vcfs/recorder.pub"]') or []
    out = []
    for item in raw:
        if not isinstance(item, str) or not item.startswith("/"):
            t.bad("ingest", f"{item!r} is not an absolute path")
            continue
        out.append(Path(item))
    return tuple(out)


def parse_listen(value: str) -> tuple[str, int] | None:
    """``"127.0.0.1:9477"``, ``"[::1]:9477"`` or ``"localhost:9477"``; None unless loopback with a port."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host == "localhost":
        return "127.0.0.1", int(port)
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None
    return (str(addr), int(port)) if addr.is_loopback else None


def parse_metrics(table: Any, p: Problems, where: KeyPath = ("metrics",)) -> MetricsSection:
    t = _Table(table, where, p, {"listen", "textfile", "interval"})
    listen = None
    raw = t.get("listen", str, 'a loopback "ADDRESS:PORT" string')
    if raw is not None:
        listen = parse_listen(raw)
        if listen is None:
            t.bad(
                "listen",
                f'{raw!r} is not a loopback "ADDRESS:PORT" (metrics name files and key versions: '
                "they stay on this host; scrape through a proxy or use textfile)",
            )
    textfile = t.path("textfile")
    if textfile is not None and textfile.suffix != ".prom":
        t.bad("textfile", "must end in .prom (node_exporter's textfile collector reads only those)")
        textfile = None
    interval = t.get("interval", (int, float), "a number of seconds")
    if interval is not None and not 1 <= interval <= 3600:
        t.bad("interval", "must be between 1 and 3600 seconds")
        interval = None
    return MetricsSection(listen, textfile, float(interval) if interval is not None else 15.0)


def parse_control(table: Any, p: Problems, where: KeyPath = ("control",)) -> ControlSection:
    t = _Table(table, where, p, {"enabled", "socket"})
    enabled = t.get("enabled", bool, "true or false")
    socket = t.path("socket")
    if socket is not None and len(str(socket).encode()) > 107:
        t.bad("socket", "is longer than the 107 bytes a Unix socket path may have")
        socket = None
    return ControlSection(True if enabled is None else enabled, socket)


# Table name -> parse function; the MountConfig field of the same name holds the result.
SECTIONS: dict[str, Callable[[Any, Problems, KeyPath], Any]] = {
    "mount": parse_mount,
    "keys": parse_keys,
    "metrics": parse_metrics,
    "control": parse_control,
}


def parse_mount_config(doc: dict[str, Any], p: Problems, source: str = "") -> MountConfig:
    for name in sorted(set(doc) - set(SECTIONS)):
        p.add((name,), f"unknown table (expected {', '.join(f'[{s}]' for s in SECTIONS)})")
    parsed = {name: parse(doc[name], p, (name,)) for name, parse in SECTIONS.items() if name in doc}
    return MountConfig(source=source, **parsed)


def load_mount_config(path: Path) -> MountConfig:
    """Read and check ``path``; a ConfigError (exit 3) lists every problem with its line."""
    try:
        text = path.read_bytes().decode()
    except FileNotFoundError:
        raise ConfigError(f"mount config {path} not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"mount config {path} is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"cannot read mount config {path}: {exc.strerror}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # tomllib says "... (at line N, column M)"
        raise ConfigError(f"mount config {path} is not valid TOML: {exc}") from None
    p = Problems(str(path), LineMap(text))
    cfg = parse_mount_config(doc, p, str(path))
    if p:
        more = f" (and {len(p.items) - 1} more: {'; '.join(p.items[1:])})" if len(p.items) > 1 else ""
        raise ConfigError(
            f"mount config {path}: {p.items[0]}{more}", hint="fix the file; docs/CONFIG.md lists every key"
        )
    return cfg
