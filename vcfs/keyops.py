"""KEK lifecycle on a store: list, rotate, rewrap, retire, destroy.

Safe while the store is mounted: the config is replaced atomically and the daemon re-reads
it before it wraps a new file's DEK; rewrap skips files the daemon has open (it needs the
exclusive flock that an open file's shared lock denies) and counts them as busy, so
running it again later finishes the job. Every header update is an A/B slot write.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from vcfs.config import DomainConfig, KekEntry, StoreConfig, load_config, save_config, utc_now
from vcfs.core.header import parse_header
from vcfs.core.layout import HEADER_LEN
from vcfs.cryptfile import rewrap_header
from vcfs.errors import FormatError, UsageError, VcfsError
from vcfs.keys.base import STATE_DESTROYED, STATE_RETIRED, KeyRef
from vcfs.keys.pkcs11 import destroy_kek, generate_kek
from vcfs.keys.setup import HostKeyOptions, check_values, open_provider, refresh_provider
from vcfs.keys.uri import Pkcs11Uri
from vcfs.namekeys import names_keys_under, rewrap_names_key
from vcfs.offline import data_files
from vcfs.store import pread_exact
from vcfs.storelayout import tree_path


def _domain(cfg: StoreConfig, name: str) -> DomainConfig:
    if name not in cfg.domains:
        raise UsageError(f"no key domain {name!r} in this store", hint=f"domains: {', '.join(cfg.domains)}")
    return cfg.domains[name]


def _entry(domain: DomainConfig, version: int) -> KekEntry:
    for k in domain.keks:
        if k.version == version:
            return k
    raise UsageError(f"key domain {domain.name!r} has no KEK version {version}")


def _replace_entry(domain: DomainConfig, new: KekEntry) -> None:
    domain.keks = [new if k.version == new.version else k for k in domain.keks]


def usage_by_version(backing: Path) -> dict[KeyRef, int]:
    """How many files each KEK version wraps (newest slot of each header; not authenticated,
    which is fine for counting: a forged header gains nothing from being miscounted)."""
    counts: dict[KeyRef, int] = {}
    for path, _st in data_files(backing):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                header = parse_header(pread_exact(fd, HEADER_LEN, 0))
            finally:
                os.close(fd)
        except (OSError, FormatError):
            continue
        _index, slot = header.candidates()[0]
        ref = KeyRef(slot.domain, slot.kek_version)
        counts[ref] = counts.get(ref, 0) + 1
    return counts


def list_keys(backing: Path) -> list[dict[str, object]]:
    cfg = load_config(backing)
    counts = usage_by_version(backing)
    now = datetime.now(UTC)
    rows: list[dict[str, object]] = []
    for domain in cfg.domains.values():
        for k in sorted(domain.keks, key=lambda e: e.version):
            age = None
            if k.created:
                age = (now - datetime.strptime(k.created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)).days
            rows.append(
                {
                    "domain": domain.name,
                    "version": k.version,
                    "state": k.state,
                    "current": k.version == domain.current,
                    "created": k.created or None,
                    "age_days": age,
                    "files": counts.get(KeyRef(domain.name, k.version), 0),
                    "uri": str(k.uri),
                }
            )
    return rows


def rotate(backing: Path, domain_name: str, opts: HostKeyOptions) -> int:
    """Create KEK version N+1 in the domain's token and make it current; returns N+1."""
    cfg = load_config(backing)
    domain = _domain(cfg, domain_name)
    version = max(k.version for k in domain.keks) + 1
    current = _entry(domain, domain.current)
    label = f"vcfs-kek-{cfg.store_id[:12]}-{domain.name}-v{version}"
    uri = Pkcs11Uri(token=current.uri.token, object=label, type="secret-key", pin_source=current.uri.pin_source)
    provider = open_provider(cfg, opts)
    try:
        session = provider.session_for(current.uri.token or "")
        generate_kek(session, label, os.urandom(8))
        domain.keks.append(KekEntry(version, uri, current.mechanism, created=utc_now()))
        refresh_provider(provider, cfg)
        wrapped, value = check_values(provider, KeyRef(domain.name, version))
    finally:
        provider.close()
    _replace_entry(domain, KekEntry(version, uri, current.mechanism, wrapped, value, created=utc_now()))
    domain.current = version
    save_config(backing, cfg)
    return version


def retire(backing: Path, domain_name: str, version: int) -> None:
    cfg = load_config(backing)
    domain = _domain(cfg, domain_name)
    entry = _entry(domain, version)
    if version == domain.current:
        raise UsageError(f"KEK {domain.name}/v{version} is current", hint=f"vcfs keys rotate {backing} {domain.name}")
    if entry.state == STATE_DESTROYED:
        raise UsageError(f"KEK {domain.name}/v{version} is already destroyed")
    _replace_entry(domain, replace(entry, state=STATE_RETIRED, changed=utc_now()))
    save_config(backing, cfg)


def destroy(backing: Path, domain_name: str, version: int, force: bool, opts: HostKeyOptions) -> int:
    """Delete the KEK from the HSM (crypto-shred); returns how many files that made unreadable."""
    cfg = load_config(backing)
    domain = _domain(cfg, domain_name)
    entry = _entry(domain, version)
    if version == domain.current:
        raise UsageError(f"KEK {domain.name}/v{version} is current", hint=f"vcfs keys rotate {backing} {domain.name}")
    names = names_keys_under(cfg, KeyRef(domain.name, version))
    if names:  # never, not even with --force: it would shred every name of the domain at once
        raise UsageError(
            f"KEK {domain.name}/v{version} still wraps the names key of key domain {names[0]!r}",
            hint=f"vcfs keys rewrap {backing} {names[0]} first (it rewraps the names key too)",
        )
    in_use = usage_by_version(backing).get(KeyRef(domain.name, version), 0)
    if in_use and not force:
        raise UsageError(
            f"{in_use} files are still wrapped under KEK {domain.name}/v{version}; destroying it shreds them",
            hint=f"vcfs keys rewrap {backing} {domain.name} first, or pass --force to shred them",
        )
    if entry.state != STATE_DESTROYED:
        provider = open_provider(cfg, opts)
        try:
            destroy_kek(provider.session_for(entry.uri.token or ""), entry.uri)
        finally:
            provider.close()
    _replace_entry(domain, replace(entry, state=STATE_DESTROYED, changed=utc_now(), check_wrapped=b"", check_value=b""))
    save_config(backing, cfg)
    return in_use


@dataclass
class RewrapReport:
    rewrapped: int = 0
    already: int = 0
    names_key_rewrapped: bool = False
    busy: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 2 if self.failed else (1 if self.busy else 0)

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "exit_code": self.exit_code}


def rewrap(
    backing: Path,
    domain_name: str | None,
    from_version: int | None,
    opts: HostKeyOptions,
    progress: Callable[[int, int], None] | None = None,
) -> RewrapReport:
    """Rewrap every header of the domain under its current KEK. Resumable: run it again."""
    cfg = load_config(backing)
    domain = _domain(cfg, domain_name or cfg.default_domain)
    target = KeyRef(domain.name, domain.current)
    report = RewrapReport()
    files = [p for p, _st in data_files(backing)]
    provider = open_provider(cfg, opts)
    try:
        report.names_key_rewrapped = rewrap_names_key(backing, provider, domain.name)
        for i, path in enumerate(files):
            rel = str(path.relative_to(tree_path(backing)))
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError as exc:
                report.failed.append({"path": rel, "error": exc.strerror or "open failed"})
                continue
            try:
                if from_version is not None and _header_version(fd) != from_version:
                    report.already += 1
                    continue
                old = rewrap_header(fd, str(path), provider.unwrap, target, lambda dek: provider.wrap(target, dek))
                if old == target:
                    report.already += 1
                else:
                    report.rewrapped += 1
            except BlockingIOError:
                report.busy.append(rel)  # open in the mounted daemon: rerun once it is closed
            except VcfsError as exc:
                report.failed.append({"path": rel, "error": exc.message})
            finally:
                os.close(fd)
            if progress:
                progress(i + 1, len(files))
    finally:
        provider.close()
    return report


def _header_version(fd: int) -> int:
    header = parse_header(pread_exact(fd, HEADER_LEN, 0))
    return header.candidates()[0][1].kek_version
