"""Turning a store config plus this host's options into a working key provider."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass

from vcfs.config import DomainConfig, KekEntry, StoreConfig
from vcfs.core.aead import kek_check_value, new_dek
from vcfs.core.header import WRAP_PKCS11_AES_KWP
from vcfs.errors import HeaderAuthError, KeyProviderError
from vcfs.keys import embedded
from vcfs.keys.base import KeyRef, Wrapped
from vcfs.keys.pin import resolve_pin
from vcfs.keys.pkcs11 import (
    DEFAULT_WRAP_MECHANISM,
    KekSpec,
    Pkcs11Provider,
    check_kek_attributes,
    find_kek,
    generate_kek,
    open_session,
)
from vcfs.keys.uri import Pkcs11Uri, parse_pkcs11_uri


@dataclass(frozen=True, slots=True)
class HostKeyOptions:
    """Per-host settings that do not belong in the (shared, backed-up) store config."""

    pkcs11_module: str | None = None
    pin_file: str | None = None


def _module_for(domain: DomainConfig, opts: HostKeyOptions) -> str:
    if opts.pkcs11_module:
        return opts.pkcs11_module
    if domain.embedded:
        return embedded.softhsm_module()
    return domain.module


def _pin_lookup(domain: DomainConfig, opts: HostKeyOptions) -> Callable[[str], str]:
    home = embedded.vcfs_home()
    emb = embedded.pin_path(home) if domain.embedded else None
    pin_source = next((k.uri.pin_source for k in domain.keks if k.uri.pin_source), None)
    return lambda _token: resolve_pin(opts.pin_file, pin_source, emb)


def open_provider(cfg: StoreConfig, opts: HostKeyOptions) -> Pkcs11Provider:
    """Log in and find every KEK of the store; fails with a KeyProviderError naming the cause."""
    if len(cfg.domains) != 1:
        raise KeyProviderError("stores with several key domains are not supported by this vcfs version")
    domain = cfg.domains[cfg.default_domain]
    if domain.embedded:  # the embedded token is always the one under VCFS_HOME
        home = embedded.vcfs_home()
        if not embedded.conf_path(home).exists():
            raise KeyProviderError(
                f"the embedded SoftHSM2 token is missing under {home}",
                hint="set VCFS_HOME to the directory used at 'vcfs init', or restore its token",
            )
        embedded.activate(home)
    provider = Pkcs11Provider(
        _module_for(domain, opts), _pin_lookup(domain, opts), _specs(domain), {domain.name: domain.current}
    )
    try:
        _verify_checks(provider, domain, _loaded(provider, domain))
    except BaseException:
        provider.close()
        raise
    return provider


def _specs(domain: DomainConfig) -> list[KekSpec]:
    return [KekSpec(KeyRef(domain.name, k.version), k.uri, k.mechanism, k.state) for k in domain.keks]


def _loaded(provider: Pkcs11Provider, domain: DomainConfig) -> list[KeyRef]:
    return [KeyRef(domain.name, k.version) for k in domain.keks if provider.available(KeyRef(domain.name, k.version))]


def _verify_checks(provider: Pkcs11Provider, domain: DomainConfig, refs: list[KeyRef]) -> None:
    for k in domain.keks:
        ref = KeyRef(domain.name, k.version)
        if ref in refs and k.check_wrapped:
            _verify_check(provider, ref, k)


def refresh_provider(provider: Pkcs11Provider, cfg: StoreConfig) -> None:
    """Bring a running provider up to date with an edited config (rotate/retire/destroy)."""
    domain = cfg.domains[cfg.default_domain]
    _verify_checks(provider, domain, provider.sync(_specs(domain), {domain.name: domain.current}))


def _verify_check(provider: Pkcs11Provider, ref: KeyRef, entry: KekEntry) -> None:
    wrong = KeyProviderError(
        f"KEK {ref} found in the token is not the key this store was created with",
        hint="the KEK URI or token points at another key; check --pkcs11-module, the token and VCFS_HOME",
    )
    try:
        probe = provider.unwrap(Wrapped(ref, WRAP_PKCS11_AES_KWP, entry.check_wrapped))
    except HeaderAuthError:
        raise wrong from None
    if not hmac.compare_digest(kek_check_value(probe), entry.check_value):
        raise wrong


def check_values(provider: Pkcs11Provider, ref: KeyRef) -> tuple[bytes, bytes]:
    probe = new_dek()
    return provider.wrap(ref, probe).blob, kek_check_value(probe)


def init_domain(store_id: str, kek_uri: str | None, opts: HostKeyOptions, name: str = "default") -> DomainConfig:
    """Make (embedded) or check (given URI) the first KEK of a new store's domain."""
    if kek_uri is None:
        home = embedded.vcfs_home()
        embedded.ensure_token(home)
        module = opts.pkcs11_module or embedded.softhsm_module()
        label = f"vcfs-kek-{store_id[:12]}-{name}-v1"
        uri = Pkcs11Uri(token=embedded.TOKEN_LABEL, object=label, type="secret-key")
        session = open_session(module, embedded.TOKEN_LABEL, resolve_pin(opts.pin_file, None, embedded.pin_path(home)))
        try:
            generate_kek(session, label, bytes.fromhex(store_id[:16]))
        finally:
            session.close()
        embedded_token = True
    else:
        uri = parse_pkcs11_uri(kek_uri)
        given = opts.pkcs11_module or uri.module_path
        if not given:
            raise KeyProviderError("no PKCS#11 module given for --kek", hint="pass --pkcs11-module PATH")
        module = given
        session = open_session(module, uri.token or "", resolve_pin(opts.pin_file, uri.pin_source, None))
        try:
            check_kek_attributes(find_kek(session, uri), str(uri))
        finally:
            session.close()
        embedded_token = False
    dom = DomainConfig(name, module, embedded_token, 1, [KekEntry(1, uri, DEFAULT_WRAP_MECHANISM)])
    provider = open_provider(StoreConfig("", {name: dom}, name), opts)
    try:
        wrapped, value = check_values(provider, KeyRef(name, 1))
    finally:
        provider.close()
    dom.keks[0] = KekEntry(1, uri, DEFAULT_WRAP_MECHANISM, wrapped, value)
    return dom
