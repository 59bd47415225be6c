"""Turning a store config, its keystore and this host's options into a working key provider,
and creating the keys of a new domain (master key + first KEK, or a check of a given KEK)."""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass

from vcfs import events
from vcfs.config import KEK_STORE_KEYSTORE, KEK_STORE_TOKEN, DomainConfig, KekEntry, StoreConfig, utc_now
from vcfs.core.aead import kek_check_value, new_dek
from vcfs.core.header import WRAP_PKCS11_AES_KWP
from vcfs.errors import HeaderAuthError, HsmUnavailableError, KeyProviderError
from vcfs.keys import embedded
from vcfs.keys.base import STATE_DESTROYED, KeyRef, Wrapped
from vcfs.keys.keystore import Keystore, MasterEntry, WrappedKek, keystore_path, load_keystore
from vcfs.keys.pin import resolve_pin
from vcfs.keys.pkcs11 import (
    DEFAULT_WRAP_MECHANISM,
    check_kek_attributes,
    close_session,
    find_kek,
    generate_kek,
    new_wrapped_kek,
    open_session,
    reinitialize,
)
from vcfs.keys.provider import DomainSpec, KekSpec, Pkcs11Provider
from vcfs.keys.recipient import RecipientKeyring, RecipientSpec
from vcfs.keys.uri import Pkcs11Uri, parse_pkcs11_uri


@dataclass(frozen=True, slots=True)
class HostKeyOptions:
    """Per-host settings that do not belong in the (shared, backed-up) store config.

    ``pkcs11_module`` and ``pin_file`` apply to every domain; the ``domain_*`` pairs
    (from ``--pin-file DOMAIN=FILE`` / ``--pkcs11-module DOMAIN=PATH``) to one.
    """

    pkcs11_module: str | None = None
    pin_file: str | None = None
    keystore: str | None = None  # directory holding <store id>.toml
    domain_pin_files: tuple[tuple[str, str], ...] = ()
    domain_modules: tuple[tuple[str, str], ...] = ()

    def module_for(self, domain: str) -> str | None:
        return dict(self.domain_modules).get(domain, self.pkcs11_module)

    def pin_file_for(self, domain: str) -> str | None:
        return dict(self.domain_pin_files).get(domain, self.pin_file)


def _module_for(domain: DomainConfig, opts: HostKeyOptions) -> str:
    given = opts.module_for(domain.name)
    if given:
        return given
    if domain.embedded:
        return embedded.softhsm_module()
    return domain.module


def forget_tokens(cfg: StoreConfig, opts: HostKeyOptions) -> None:
    """Make the loaded PKCS#11 modules of ``cfg`` look for tokens again (C_Finalize + C_Initialize).

    SoftHSM2 (like many modules) lists tokens once, at initialisation: one made afterwards in
    this process (a new domain's embedded token) is not found until then.
    """
    if any(d.embedded for d in cfg.domains.values()):
        embedded.activate(embedded.vcfs_home())  # before the module (re)initialises
    for module in sorted({_module_for(d, opts) for d in cfg.domains.values()}):
        reinitialize(module)


def _pin_lookup(domain: DomainConfig, opts: HostKeyOptions) -> Callable[[], str]:
    emb = embedded.pin_path(embedded.vcfs_home(), domain.token) if domain.embedded else None
    pin_source = domain.pin_source or next((k.uri.pin_source for k in domain.keks if k.uri and k.uri.pin_source), None)
    return lambda: resolve_pin(opts.pin_file_for(domain.name), pin_source, emb, domain.name)


def store_keystore(cfg: StoreConfig, opts: HostKeyOptions) -> Keystore:
    return load_keystore(keystore_path(cfg.store_id, opts.keystore), cfg.store_id)


def _activate_embedded(cfg: StoreConfig) -> None:
    if not any(d.embedded for d in cfg.domains.values()):
        return
    home = embedded.vcfs_home()  # the embedded token is always the one under VCFS_HOME
    if not embedded.conf_path(home).exists():
        raise KeyProviderError(
            f"the embedded SoftHSM2 token is missing under {home}",
            hint="set VCFS_HOME to the directory used at 'vcfs init', or restore its token",
        )
    embedded.activate(home)


def domain_spec(domain: DomainConfig, ks: Keystore, opts: HostKeyOptions) -> DomainSpec:
    """What the provider needs of one domain; the keystore's "destroyed" wins over the config."""
    keys = ks.domains.get(domain.name)
    specs = []
    for k in domain.keks:
        ref = KeyRef(domain.name, k.version)
        state = STATE_DESTROYED if ks.destroyed(domain.name, k.version) else k.state
        if domain.kek_store == KEK_STORE_KEYSTORE:
            wrapped = keys.keks.get(k.version) if keys else None
            if wrapped is None or not wrapped.blob:
                # No wrapped copy: destroyed here, or a keystore that is not this store's
                # (a missing current KEK is reported by open_provider).
                state = STATE_DESTROYED if wrapped is not None else state
                specs.append(KekSpec(ref, k.mechanism, state, None, b"", 0))
            else:
                specs.append(KekSpec(ref, k.mechanism, state, None, wrapped.blob, wrapped.master))
        else:
            specs.append(KekSpec(ref, k.mechanism, state, k.uri))
    masters = {m.version: m.label for m in keys.masters if m.state != STATE_DESTROYED} if keys else {}
    return DomainSpec(
        domain.name,
        _module_for(domain, opts),
        domain.token,
        domain.current,
        tuple(specs),
        masters,
        _pin_lookup(domain, opts),
    )


def _specs(cfg: StoreConfig, ks: Keystore, opts: HostKeyOptions) -> list[DomainSpec]:
    return [domain_spec(d, ks, opts) for d in cfg.domains.values()]


def recipient_specs(cfg: StoreConfig, ks: Keystore) -> list[RecipientSpec]:
    """Every recipient version of the store: the config's fingerprint and state, the keystore's wrapped
    seed. Destroyed in either place means destroyed (the keystore's tombstone wins, as for KEKs)."""
    out = []
    for d in cfg.domains.values():
        seeds = ks.domains[d.name].recipients if d.name in ks.domains else {}
        for r in d.recipients:
            seed = seeds.get(r.version)
            destroyed = r.state == STATE_DESTROYED or (seed is not None and seed.state == STATE_DESTROYED)
            wrapped = None
            if seed is not None and seed.blob and not destroyed:
                wrapped = Wrapped(KeyRef(d.name, seed.kek_version), WRAP_PKCS11_AES_KWP, seed.blob)
            out.append(
                RecipientSpec(
                    KeyRef(d.name, r.version), r.fingerprint, STATE_DESTROYED if destroyed else r.state, wrapped
                )
            )
    return out


def open_provider(
    cfg: StoreConfig, opts: HostKeyOptions, probe: bool = False, keep_recipient_keys: bool = True
) -> Pkcs11Provider:
    """Log in to every domain's token and load its KEKs; fails with a KeyProviderError naming the cause.

    Every domain's current KEK must load and match its check value. Older versions that cannot
    be found are tolerated: they matter only to the files still wrapped under them. Recipient
    keys are opened on first use (``keep_recipient_keys``: see vcfs/keys/recipient.py).
    """
    _activate_embedded(cfg)
    ks = store_keystore(cfg, opts)
    for d in cfg.domains.values():
        if d.kek_store == KEK_STORE_KEYSTORE and d.name not in ks.domains:
            raise KeyProviderError(
                f"the keystore {ks.path} has no keys for domain {d.name!r}",
                hint="KEKs of this store are kept outside it: restore the keystore, or point --keystore at it",
            )
    provider = Pkcs11Provider(_specs(cfg, ks, opts), probe=probe)
    provider.recipients = RecipientKeyring(provider.unwrap, keep=keep_recipient_keys)
    provider.recipients.sync(recipient_specs(cfg, ks))
    try:
        _load_and_verify(provider, cfg, ks)
    except BaseException:
        provider.close()
        raise
    return provider


def _load_and_verify(provider: Pkcs11Provider, cfg: StoreConfig, ks: Keystore) -> None:
    """Load every domain's KEKs. A domain whose token cannot be reached is left *down* (its
    files fail with "HSM unavailable"; a host of one region has no other region's HSM), unless
    no domain at all can be reached. A wrong PIN, an unsafe or a wrong key stays fatal."""
    unreachable: list[HsmUnavailableError] = []
    for d in cfg.domains.values():
        try:
            _load_domain(provider, d)
        except HsmUnavailableError as exc:
            unreachable.append(exc)
    if len(unreachable) == len(cfg.domains):
        raise unreachable[0]


def _load_domain(provider: Pkcs11Provider, d: DomainConfig) -> None:
    for k in d.keks:
        ref = KeyRef(d.name, k.version)
        if provider.state(ref) == STATE_DESTROYED:
            continue
        if k.version == d.current:
            provider.load(ref)
        elif not provider.available(ref):
            continue
        if k.check_wrapped:
            _verify_check(provider, ref, k)


def refresh_provider(provider: Pkcs11Provider, cfg: StoreConfig, opts: HostKeyOptions) -> None:
    """Bring a running provider up to date with an edited config or keystore (rotate, destroy, domain add)."""
    ks = store_keystore(cfg, opts)
    provider.sync(_specs(cfg, ks, opts))
    provider.recipients.sync(recipient_specs(cfg, ks))
    for d in cfg.domains.values():
        current = next(k for k in d.keks if k.version == d.current)
        ref = KeyRef(d.name, d.current)
        if provider.state(ref) != STATE_DESTROYED and not provider.is_down(d.name):
            provider.load(ref)
            if current.check_wrapped:
                _verify_check(provider, ref, current)


def _verify_check(provider: Pkcs11Provider, ref: KeyRef, entry: KekEntry) -> None:
    wrong = KeyProviderError(
        f"KEK {ref} found in the token is not the key this store was created with",
        hint="the KEK URI, token or keystore points at another key; check --pkcs11-module, the token and VCFS_HOME",
    )
    try:
        probe = provider.unwrap(Wrapped(ref, WRAP_PKCS11_AES_KWP, entry.check_wrapped))
    except HeaderAuthError:
        raise wrong from None
    if not hmac.compare_digest(kek_check_value(bytes(probe)), entry.check_value):
        raise wrong


def check_values(provider: Pkcs11Provider, ref: KeyRef) -> tuple[bytes, bytes]:
    probe = new_dek()
    return provider.wrap(ref, probe).blob, kek_check_value(probe)


def master_label(store_id: str, domain: str, version: int) -> str:
    return f"vcfs-mk-{store_id[:12]}-{domain}-v{version}"


def token_kek_label(store_id: str, domain: str, version: int) -> str:
    return f"vcfs-kek-{store_id[:12]}-{domain}-v{version}"


def generate_master(session: object, store_id: str, domain: str, version: int) -> MasterEntry:
    label = master_label(store_id, domain, version)
    generate_kek(session, label, os.urandom(8))
    events.emit(events.KEY_GENERATE, domain=domain, version=version, tier="master")
    return MasterEntry(version, label, created=utc_now())


@dataclass(frozen=True, slots=True)
class NewDomain:
    """How to create a domain: its token (embedded when no module is given) and its prefixes."""

    name: str
    prefixes: tuple[str, ...] = ()
    token: str | None = None
    kek_uri: str | None = None  # an existing KEK (token object) instead of the master-key tier
    pin_source: str | None = None


def create_domain(store_id: str, new: NewDomain, opts: HostKeyOptions, ks: Keystore) -> DomainConfig:
    """Make the keys of a new domain, recording wrapped ones in ``ks`` (the caller saves it).

    Without a KEK URI: a master key (token object) and KEK v1 wrapped under it. With one: the
    given token KEK is checked (attributes) and used as v1, with no master tier.
    """
    module = opts.module_for(new.name)
    uri = parse_pkcs11_uri(new.kek_uri) if new.kek_uri else None
    if uri is not None:
        module = module or uri.module_path
        if not module:
            raise KeyProviderError("no PKCS#11 module given for --kek", hint="pass --pkcs11-module PATH")
    is_embedded = module is None
    token = (uri.token if uri else None) or new.token or (embedded.TOKEN_LABEL if is_embedded else None)
    if not token:
        raise KeyProviderError(f"no token given for key domain {new.name!r}", hint="pass --token LABEL")
    if is_embedded:
        module = embedded.softhsm_module()
        if embedded.ensure_token(embedded.vcfs_home(), token):
            reinitialize(module)  # SoftHSM2 lists tokens at initialisation: find the one just made
    assert module is not None
    dom = DomainConfig(
        new.name,
        module,
        is_embedded,
        1,
        [],
        token=token,
        prefixes=list(new.prefixes),
        kek_store=KEK_STORE_TOKEN if uri else KEK_STORE_KEYSTORE,
        pin_source=new.pin_source,
    )
    session = open_session(module, token, _pin_lookup(dom, opts)())
    try:
        if uri is not None:
            check_kek_attributes(find_kek(session, uri), str(uri))
            entry = KekEntry(1, uri, DEFAULT_WRAP_MECHANISM, created=utc_now())
        else:
            keys = ks.domain(new.name)
            master = generate_master(session, store_id, new.name, 1)
            master_key = find_kek(session, Pkcs11Uri(token=token, object=master.label))
            blob = new_wrapped_kek(session, master_key, DEFAULT_WRAP_MECHANISM)
            events.emit(events.KEY_GENERATE, domain=new.name, version=1, tier="kek")
            keys.masters, keys.master_current = [master], 1
            keys.keks = {1: WrappedKek(1, 1, blob, changed=utc_now())}
            entry = KekEntry(1, None, DEFAULT_WRAP_MECHANISM, created=utc_now())
    finally:
        close_session(session)
    dom.keks = [entry]
    provider = Pkcs11Provider([domain_spec(dom, ks, opts)])
    try:
        wrapped, value = check_values(provider, KeyRef(new.name, 1))
    finally:
        provider.close()
    dom.keks = [KekEntry(1, entry.uri, entry.mechanism, wrapped, value, created=entry.created)]
    return dom
