"""Key lifecycle on a store: list, rotate, retire, destroy, master rotation, domains.

Safe while the store is mounted: the config and the keystore are replaced atomically and
the daemon re-reads them before it wraps a new file's DEK. Commands that change keys take
the keystore's lock, so two of them never interleave. The order of writes makes every crash
harmless: a new key is recorded in the keystore before the config names it; a destroyed
one leaves the keystore (that is the shred) before the config marks it.

Rewrap lives in vcfs/rewrap.py, crypto-shredding single files in vcfs/shred.py.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from vcfs import events
from vcfs.config import (
    KEK_STORE_KEYSTORE,
    DomainConfig,
    KekEntry,
    StoreConfig,
    load_config,
    save_config,
    utc_now,
)
from vcfs.core.header import WRAP_PKCS11_AES_KWP, WRAP_XWING_KWP, parse_header
from vcfs.core.layout import HEADER_LEN
from vcfs.errors import FormatError, UsageError
from vcfs.keys import embedded
from vcfs.keys.base import STATE_DESTROYED, STATE_RETIRED, KeyRef
from vcfs.keys.keystore import Keystore, WrappedKek, keystore_lock, keystore_path, save_keystore
from vcfs.keys.pkcs11 import destroy_kek, find_kek, generate_kek, new_wrapped_kek, rewrap_kek_blob
from vcfs.keys.setup import (
    HostKeyOptions,
    NewDomain,
    check_values,
    create_domain,
    generate_master,
    open_provider,
    refresh_provider,
    store_keystore,
    token_kek_label,
)
from vcfs.keys.uri import Pkcs11Uri
from vcfs.namekeys import create_names_key, name_layer, names_keys_under
from vcfs.namepaths import resolve
from vcfs.offline import data_files
from vcfs.recipientkeys import seeds_under
from vcfs.store import lock_store, pread_exact
from vcfs.storelayout import tree_path


def domain_of(cfg: StoreConfig, name: str) -> DomainConfig:
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


def _lock(cfg: StoreConfig, opts: HostKeyOptions) -> contextlib.AbstractContextManager[None]:
    return keystore_lock(keystore_path(cfg.store_id, opts.keystore))


def usage_by_version(backing: Path) -> dict[KeyRef, int]:
    """How many files each KEK version wraps (newest slot of each header)."""
    return {ref: n for (alg, ref), n in usage_by_wrap(backing).items() if alg == WRAP_PKCS11_AES_KWP}


def usage_by_wrap(backing: Path) -> dict[tuple[int, KeyRef], int]:
    """How many files each (wrap algorithm, KEK or recipient) wraps: newest slot of each header;
    not authenticated, which is fine for counting: a forged header gains nothing from being
    miscounted. Wrap algorithm 2 names a recipient version where 1 names a KEK version."""
    counts: dict[tuple[int, KeyRef], int] = {}
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
        key = (slot.wrap_alg, KeyRef(slot.domain, slot.kek_version))
        counts[key] = counts.get(key, 0) + 1
    return counts


def _age_days(stamp: str, now: datetime) -> int | None:
    if not stamp:
        return None
    return (now - datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)).days


def list_keys(backing: Path, opts: HostKeyOptions) -> list[dict[str, object]]:
    """One row per KEK version (tier "kek"), master key version (tier "master") and recipient
    version (tier "recipient", ingest hosts' public keys; docs/KEYS.md)."""
    cfg = load_config(backing)
    ks = store_keystore(cfg, opts)
    by_wrap = usage_by_wrap(backing)
    counts = {ref: n for (alg, ref), n in by_wrap.items() if alg == WRAP_PKCS11_AES_KWP}
    now = datetime.now(UTC)
    rows: list[dict[str, object]] = []
    for domain in cfg.domains.values():
        common = {"domain": domain.name, "token": domain.token, "prefixes": list(domain.prefixes)}
        keys = ks.domains.get(domain.name)
        for k in sorted(domain.keks, key=lambda e: e.version):
            wrapped = keys.keks.get(k.version) if keys else None
            rows.append(
                {
                    **common,
                    "tier": "kek",
                    "version": k.version,
                    "state": STATE_DESTROYED if ks.destroyed(domain.name, k.version) else k.state,
                    "current": k.version == domain.current,
                    "created": k.created or None,
                    "age_days": _age_days(k.created, now),
                    "files": counts.get(KeyRef(domain.name, k.version), 0),
                    "stored": "token" if k.uri is not None else "keystore",
                    "uri": str(k.uri) if k.uri is not None else None,
                    "master": wrapped.master if wrapped and wrapped.blob else None,
                }
            )
        for m in keys.masters if keys else []:
            rows.append(
                {
                    **common,
                    "tier": "master",
                    "version": m.version,
                    "state": m.state,
                    "current": m.version == keys.master_current if keys else False,
                    "created": m.created or None,
                    "age_days": _age_days(m.created, now),
                    "files": None,
                    "stored": "token",
                    "uri": str(Pkcs11Uri(token=domain.token, object=m.label, type="secret-key")),
                    "master": None,
                }
            )
        seeds = keys.recipients if keys else {}
        for r in domain.recipients:
            seed = seeds.get(r.version)
            gone = r.state == STATE_DESTROYED or (seed is not None and seed.state == STATE_DESTROYED)
            rows.append(
                {
                    **common,
                    "tier": "recipient",
                    "version": r.version,
                    "state": STATE_DESTROYED if gone else r.state,
                    "current": r.version == domain.recipient_current,
                    "created": r.created or None,
                    "age_days": _age_days(r.created, now),
                    "files": by_wrap.get((WRAP_XWING_KWP, KeyRef(domain.name, r.version)), 0),
                    "stored": "keystore",
                    "uri": None,
                    "master": None,
                    "kek": seed.kek_version if seed is not None and seed.blob else None,
                    "fingerprint": r.fingerprint.hex(),
                }
            )
    return rows


def rotate(backing: Path, domain_name: str, opts: HostKeyOptions) -> int:
    """Create KEK version N+1 of the domain and make it current; returns N+1."""
    cfg = load_config(backing)
    with _lock(cfg, opts):
        cfg = load_config(backing)
        domain = domain_of(cfg, domain_name)
        version = max(k.version for k in domain.keks) + 1
        current = _entry(domain, domain.current)
        provider = open_provider(cfg, opts)
        try:
            session = provider.session_for(domain.name)
            if domain.kek_store == KEK_STORE_KEYSTORE:
                ks = store_keystore(cfg, opts)
                keys = ks.domain(domain.name)
                blob = new_wrapped_kek(session, provider.master(domain.name, keys.master_current), current.mechanism)
                keys.keks[version] = WrappedKek(version, keys.master_current, blob, changed=utc_now())
                save_keystore(ks)  # before the config names it: a crash leaves an unused blob only
                uri = None
            else:
                assert current.uri is not None
                label = token_kek_label(cfg.store_id, domain.name, version)
                uri = Pkcs11Uri(
                    token=current.uri.token, object=label, type="secret-key", pin_source=current.uri.pin_source
                )
                generate_kek(session, label, os.urandom(8))
            events.emit(events.KEY_GENERATE, domain=domain.name, version=version, tier="kek")
            domain.keks.append(KekEntry(version, uri, current.mechanism, created=utc_now()))
            refresh_provider(provider, cfg, opts)
            wrapped, value = check_values(provider, KeyRef(domain.name, version))
        finally:
            provider.close()
        _replace_entry(domain, KekEntry(version, uri, current.mechanism, wrapped, value, created=utc_now()))
        domain.current = version
        save_config(backing, cfg)
    events.emit(events.KEY_ROTATE, domain=domain.name, version=version, previous=current.version, tier="kek")
    return version


def _not_current(backing: Path, domain: DomainConfig, version: int) -> None:
    """Refuse to retire or destroy the version new files are wrapped under."""
    if version == domain.current:
        raise UsageError(f"KEK {domain.name}/v{version} is current", hint=f"vcfs keys rotate {backing} {domain.name}")


def retire(backing: Path, domain_name: str, version: int, opts: HostKeyOptions) -> None:
    cfg = load_config(backing)
    with _lock(cfg, opts):
        cfg = load_config(backing)
        domain = domain_of(cfg, domain_name)
        entry = _entry(domain, version)
        _not_current(backing, domain, version)
        if entry.state == STATE_DESTROYED or store_keystore(cfg, opts).destroyed(domain.name, version):
            raise UsageError(f"KEK {domain.name}/v{version} is already destroyed")
        _replace_entry(domain, replace(entry, state=STATE_RETIRED, changed=utc_now()))
        save_config(backing, cfg)
    events.emit(events.KEY_RETIRE, domain=domain.name, version=version)


def destroy(backing: Path, domain_name: str, version: int, force: bool, opts: HostKeyOptions) -> int:
    """Crypto-shred KEK ``version``; returns how many files that made unreadable.

    Keystore KEK: its wrapped copy is deleted from the keystore (older keystore copies still
    hold it until the next master rotation). Token KEK: the object is deleted in the HSM. Both
    leave a tombstone in the keystore, so a restored backup of the store says "destroyed".
    """
    cfg = load_config(backing)
    with _lock(cfg, opts):
        cfg = load_config(backing)
        domain = domain_of(cfg, domain_name)
        entry = _entry(domain, version)
        _not_current(backing, domain, version)
        names = names_keys_under(cfg, KeyRef(domain.name, version))
        if names:  # never, not even with --force: it would shred every name of the domain at once
            raise UsageError(
                f"KEK {domain.name}/v{version} still wraps the names key of key domain {names[0]!r}",
                hint=f"vcfs keys rewrap {backing} {names[0]} first (it rewraps the names key too)",
            )
        seeds = seeds_under(store_keystore(cfg, opts), KeyRef(domain.name, version))
        if seeds:  # never, not even with --force: it would shred every file wrapped to those recipients
            raise UsageError(
                f"KEK {domain.name}/v{version} still wraps the private key of recipient {seeds[0]}",
                hint=f"vcfs keys rewrap {backing} {domain.name} first (it rewraps recipient keys too)",
            )
        in_use = usage_by_version(backing).get(KeyRef(domain.name, version), 0)
        if in_use and not force:
            raise UsageError(
                f"{in_use} files are still wrapped under KEK {domain.name}/v{version}; destroying it shreds them",
                hint=f"vcfs keys rewrap {backing} {domain.name} first, or pass --force to shred them",
            )
        ks = store_keystore(cfg, opts)
        keys = ks.domain(domain.name)
        if entry.uri is not None and entry.state != STATE_DESTROYED:
            provider = open_provider(cfg, opts)
            try:
                destroy_kek(provider.session_for(domain.name), entry.uri)
            finally:
                provider.close()
        old = keys.keks.get(version)
        keys.keks[version] = WrappedKek(version, old.master if old else 0, b"", STATE_DESTROYED, utc_now())
        save_keystore(ks)
        _replace_entry(
            domain, replace(entry, state=STATE_DESTROYED, changed=utc_now(), check_wrapped=b"", check_value=b"")
        )
        save_config(backing, cfg)
    events.emit(events.KEY_DESTROY, domain=domain.name, version=version, tier="kek", files=in_use)
    return in_use


def rotate_master(backing: Path, domain_name: str, opts: HostKeyOptions) -> tuple[int, int]:
    """New master key, every live KEK rewrapped under it, older master keys destroyed in the HSM.

    Files are not touched. Afterwards no older copy of the keystore can be unwrapped: KEKs
    destroyed before stay destroyed in every backup. Returns (master version, KEKs rewrapped).
    """
    cfg = load_config(backing)
    with _lock(cfg, opts):
        cfg = load_config(backing)
        domain = domain_of(cfg, domain_name)
        if domain.kek_store != KEK_STORE_KEYSTORE:
            raise UsageError(
                f"key domain {domain.name!r} uses KEKs stored as token objects: it has no master key",
                hint="its KEKs are managed in the HSM itself; rotate them with vcfs keys rotate",
            )
        ks = store_keystore(cfg, opts)
        keys = ks.domain(domain.name)
        version = max(m.version for m in keys.masters) + 1
        provider = open_provider(cfg, opts)
        try:
            session = provider.session_for(domain.name)
            master = generate_master(session, cfg.store_id, domain.name, version)
            keys.masters.append(master)
            new_key = find_kek(session, Pkcs11Uri(token=domain.token, object=master.label))
            moved = 0
            mech = {k.version: k.mechanism for k in domain.keks}
            for kek in keys.keks.values():
                if kek.state == STATE_DESTROYED or not kek.blob:
                    continue
                name = f"{domain.name}/v{kek.version}"
                old_key = provider.master(domain.name, kek.master)
                kek.blob = rewrap_kek_blob(old_key, new_key, kek.blob, mech.get(kek.version, 0x210A), name)
                kek.master, kek.changed = version, utc_now()
                moved += 1
            previous = keys.master_current
            keys.master_current = version
            save_keystore(ks)  # the new wrapped copies are durable before any old master goes
            events.emit(events.KEY_ROTATE, domain=domain.name, version=version, previous=previous, tier="master")
            _destroy_old_masters(ks, domain, session)
        finally:
            provider.close()
    return version, moved


def _destroy_old_masters(ks: Keystore, domain: DomainConfig, session: object) -> None:
    keys = ks.domain(domain.name)
    for m in keys.masters:
        if m.version != keys.master_current and m.state != STATE_DESTROYED:
            destroy_kek(session, Pkcs11Uri(token=domain.token, object=m.label))
            m.state, m.changed = STATE_DESTROYED, utc_now()
            save_keystore(ks)
            events.emit(events.KEY_DESTROY, domain=domain.name, version=m.version, tier="master")


def add_domain(backing: Path, new: NewDomain, opts: HostKeyOptions) -> DomainConfig:
    """Create domain ``new.name`` (its master key and KEK, or a check of a given KEK) in a store."""
    cfg = load_config(backing)
    if new.name in cfg.domains:
        raise UsageError(f"key domain {new.name!r} already exists")
    with _lock(cfg, opts):
        cfg = load_config(backing)
        trial = StoreConfig(cfg.store_id, dict(cfg.domains), cfg.default_domain)
        trial.domains[new.name] = DomainConfig(new.name, "", False, 1, [], prefixes=list(new.prefixes))
        trial.domain_map()  # refuses a prefix that another domain has
        _activate_for(cfg)
        ks = store_keystore(cfg, opts)
        with _names_unmoved(backing, cfg, list(new.prefixes), opts):
            domain = create_domain(cfg.store_id, new, opts, ks)
            if domain.kek_store == KEK_STORE_KEYSTORE:
                save_keystore(ks)
            cfg.domains[domain.name] = domain
            if cfg.encrypted_names:  # the domain's names key, wrapped under its first KEK
                provider = open_provider(cfg, opts)
                try:
                    cfg.names_keys[domain.name] = create_names_key(provider, KeyRef(domain.name, domain.current))
                finally:
                    provider.close()
            save_config(backing, cfg)
    events.emit(events.KEY_ROTATE, domain=domain.name, version=1, previous=0, tier="kek")
    return domain


def _activate_for(cfg: StoreConfig) -> None:
    """Point SoftHSM2 at the embedded tokens before a module is loaded, if the store uses them."""
    if any(d.embedded for d in cfg.domains.values()):
        embedded.activate(embedded.vcfs_home())


def set_prefixes(backing: Path, domain_name: str, prefixes: list[str], opts: HostKeyOptions) -> None:
    """Give a domain new path prefixes. Existing files keep their keys until rewrap moves them."""
    cfg = load_config(backing)
    with _lock(cfg, opts):
        cfg = load_config(backing)
        domain_of(cfg, domain_name).prefixes = list(prefixes)
        cfg.domain_map()
        with _names_unmoved(backing, cfg, list(prefixes), opts):
            save_config(backing, cfg)


@contextlib.contextmanager
def _names_unmoved(backing: Path, cfg: StoreConfig, prefixes: list[str], opts: HostKeyOptions) -> Iterator[None]:
    """With encrypted names, a prefix may only go to a path that does not exist yet, on an unmounted store.

    Names are encrypted under the names key of their directory's domain (vcfs/namekeys.py):
    entries already below a path that changes domain would no longer decrypt, and a running
    mount keeps the domain map it started with. Files can be moved in afterwards with mv (a
    copy across domains, EXDEV), which encrypts their names and contents under the new domain.
    """
    if not cfg.encrypted_names:
        yield
        return
    lock_fd = lock_store(backing)  # BusyError ("already mounted") if a daemon serves it
    try:
        provider = open_provider(cfg, opts)
        try:
            names = name_layer(cfg, provider, skip=provider.is_down)
            tree = os.fsencode(tree_path(backing))
            for prefix in prefixes:
                try:
                    resolve(names, tree, prefix)
                except UsageError:
                    continue  # does not exist: fine
                raise UsageError(
                    f"{prefix} already exists in this store, whose file names are encrypted",
                    hint="a key domain can take only a path that does not exist yet; mv files in afterwards",
                )
        finally:
            provider.close()
        yield
    finally:
        os.close(lock_fd)
