"""The KeyProvider over every key domain of a store: its tokens, master keys and KEKs.

Each domain names a PKCS#11 module and a token; domains on the same (module, token) share one
logged-in session (a ``_Link``). Python-pkcs11 calls go through vcfs.keys.pkcs11, every one
of them under its process-wide lock, whatever module or token they reach: one thread at a
time in all of PKCS#11, as python-pkcs11 0.10 requires.

KEKs are loaded lazily and again after a session was reopened: a token KEK is looked up by
URI, a keystore KEK is unwrapped under its domain's master key into a session object (which
dies with the session).

HSM faults. A call that fails because the token or the session went away is retried once on
a fresh session; if that fails too, the domain is marked *down*: it emits ``hsm.unavailable``,
logs "HSM unavailable", and every later call for it fails at once with HsmUnavailableError
(EIO in the mount) without touching the token. ``recover()``, called periodically by the
daemon, reinitialises the modules of down domains (SoftHSM2 only sees a token that came back
after C_Finalize/C_Initialize, which also invalidates the sessions of the module's other
tokens; those are reopened on their next use) and brings domains back. A rejected PIN is
never tried twice: the domain stays down until the daemon is restarted.

With ``probe=True`` (the mount), every wrap and unwrap first asks the token for one attribute
of the domain's master key, so a removed token fails new opens even where the token keeps
session objects alive in host memory (SoftHSM2 does).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from vcfs import events
from vcfs.core.header import WRAP_PKCS11_AES_KWP, WRAP_XWING_KWP
from vcfs.errors import HsmUnavailableError, KeyDestroyedError, KeyProviderError
from vcfs.keys import pkcs11 as p11
from vcfs.keys.base import STATE_ACTIVE, STATE_DESTROYED, KeyRef, Wrapped
from vcfs.keys.recipient import RecipientKeyring
from vcfs.keys.uri import Pkcs11Uri

log = logging.getLogger("vcfs.keys")
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class KekSpec:
    """One KEK version as the provider needs it: a token object (uri) or a wrapped copy (blob)."""

    ref: KeyRef
    mechanism: int = p11.DEFAULT_WRAP_MECHANISM
    state: str = STATE_ACTIVE
    uri: Pkcs11Uri | None = None
    blob: bytes = b""
    master: int = 0  # master key version the blob is wrapped under


@dataclass(frozen=True, slots=True)
class DomainSpec:
    name: str
    module: str
    token: str
    current: int
    keks: tuple[KekSpec, ...]
    masters: dict[int, str] = field(default_factory=dict)  # live master versions -> token label
    pin: Callable[[], str] = lambda: ""  # reads the PIN source when a session is (re)opened


class _Link:
    """One logged-in session on one token of one module; ``epoch`` counts (re)openings."""

    def __init__(self, module: str, token: str, pin: Callable[[], str]) -> None:
        self.module, self.token, self.pin = module, token, pin
        self.session: Any = None
        self.epoch = 0
        self.pin_rejected = False

    def get(self) -> Any:
        if self.session is None:
            if self.pin_rejected:
                raise KeyProviderError(f"the PIN of token {self.token!r} was rejected; not retrying it")
            try:
                self.session = p11.open_session(self.module, self.token, self.pin())
            except HsmUnavailableError:
                raise
            except KeyProviderError as exc:
                if "wrong PIN" in exc.message or "locked" in exc.message:
                    self.pin_rejected = True  # never lock a token by retrying a wrong PIN
                raise
            self.epoch += 1
        return self.session

    def drop(self) -> None:
        if self.session is not None:
            p11.close_session(self.session)
            self.session = None


class Pkcs11Provider:
    """Wraps and unwraps DEKs under the KEKs of every domain; see the module docstring."""

    def __init__(self, domains: Iterable[DomainSpec], probe: bool = False) -> None:
        self._probe = probe
        self._links: dict[tuple[str, str], _Link] = {}
        self._domains: dict[str, DomainSpec] = {}
        self._specs: dict[KeyRef, KekSpec] = {}
        self._loaded: dict[KeyRef, tuple[Any, int]] = {}  # key object, link epoch it belongs to
        self._masters: dict[tuple[str, int], tuple[Any, int]] = {}
        self._down: dict[str, str] = {}  # domain -> why
        # Wrap algorithm 2 (DEKs wrapped to a recipient by ingest hosts): the recipients' seeds are
        # wrapped under this provider's KEKs; vcfs/keys/setup.py fills it from config and keystore.
        self.recipients = RecipientKeyring(self._unwrap_kek)
        try:
            self.sync(domains)
        except BaseException:
            self.close()  # or the token stays logged in for the rest of the process
            raise

    # ---- configuration -------------------------------------------------------------------

    def sync(self, domains: Iterable[DomainSpec]) -> None:
        """Take in the store's domains and KEK list (after init, rotate, retire, destroy, ...).

        Loaded keys stay loaded; a destroyed KEK is forgotten at once.
        """
        with p11._LOCK:
            for d in domains:
                self._domains[d.name] = d
                self._links.setdefault((d.module, d.token), _Link(d.module, d.token, d.pin))
                for spec in d.keks:
                    old = self._specs.get(spec.ref)
                    self._specs[spec.ref] = spec
                    if spec.state == STATE_DESTROYED or (old is not None and old.blob != spec.blob):
                        self._loaded.pop(spec.ref, None)

    def domains(self) -> list[str]:
        return list(self._domains)

    def current(self, domain: str) -> KeyRef:
        if domain not in self._domains:
            raise KeyProviderError(f"unknown key domain {domain!r}", hint="see: vcfs keys list BACKING")
        return KeyRef(domain, self._domains[domain].current)

    def state(self, ref: KeyRef) -> str | None:
        spec = self._specs.get(ref)
        return spec.state if spec is not None else None

    def is_down(self, domain: str) -> bool:
        return domain in self._down

    def _link(self, domain: str) -> _Link:
        d = self._domains[domain]
        return self._links[(d.module, d.token)]

    def session_for(self, domain: str) -> Any:
        """The logged-in session of ``domain``'s token (key management: generate, destroy).

        A token label is accepted too, for callers that think in tokens (e.g. an HMAC key
        kept in the token that holds the default domain's keys).
        """
        with p11._LOCK:
            if domain in self._domains:
                return self._link(domain).get()
            for link in self._links.values():
                if link.token == domain:
                    return link.get()
            raise KeyProviderError(f"no key domain or token named {domain!r} in this store")

    # ---- keys ----------------------------------------------------------------------------

    def master(self, domain: str, version: int) -> Any:
        """Master key ``version`` of ``domain`` (a token object), checked once per session."""
        link = self._link(domain)
        session = link.get()
        cached = self._masters.get((domain, version))
        if cached is not None and cached[1] == link.epoch:
            return cached[0]
        label = self._domains[domain].masters.get(version)
        if label is None:
            raise KeyProviderError(f"master key {domain}/m{version} is not known to the keystore")
        try:
            key = p11.find_kek(session, Pkcs11Uri(token=link.token, object=label))
        except HsmUnavailableError:
            raise
        except KeyProviderError:
            raise KeyProviderError(
                f"master key {domain}/m{version} ({label}) is not in token {link.token!r}",
                hint="it was destroyed by a master-key rotation (this keystore copy is older), or the token is "
                "not this store's",
            ) from None
        p11.check_kek_attributes(key, f"master key {domain}/m{version}")
        self._masters[(domain, version)] = (key, link.epoch)
        return key

    def _kek(self, ref: KeyRef) -> tuple[Any, KekSpec]:
        spec = self._specs.get(ref)
        if spec is not None and spec.state == STATE_DESTROYED:
            raise KeyDestroyedError(
                f"KEK {ref} was destroyed (crypto-shredded): data wrapped under it cannot be decrypted",
                hint="this is permanent; restore from a plaintext export made before the destroy, if any",
            )
        if spec is None or ref.domain not in self._domains:
            raise KeyProviderError(
                f"KEK {ref} is not known to this store",
                hint="the file was wrapped under a KEK of another store, or the store config is out of date",
            )
        link = self._link(ref.domain)
        link.get()
        loaded = self._loaded.get(ref)
        if loaded is not None and loaded[1] == link.epoch:
            return loaded[0], spec
        if spec.uri is None and not spec.blob:
            raise KeyProviderError(
                f"KEK {ref} has no wrapped copy in the keystore",
                hint="restore this store's keystore (see docs/KEYS.md), or point --keystore at it",
            )
        if spec.uri is not None:
            key = p11.find_kek(link.get(), spec.uri)
            p11.check_kek_attributes(key, str(ref))
        else:
            key = p11.load_wrapped_kek(self.master(ref.domain, spec.master), spec.blob, spec.mechanism, str(ref))
            events.emit(events.KEY_LOAD, domain=ref.domain, version=ref.version, master=spec.master)
        self._loaded[ref] = (key, link.epoch)
        return key, spec

    def key_object(self, ref: KeyRef) -> tuple[Any, int]:
        """The token object of a loaded KEK and its mechanism (diagnostics and benchmarks)."""
        key, spec = self._call(ref.domain, lambda: self._kek(ref))
        return key, spec.mechanism

    def load(self, ref: KeyRef) -> None:
        """Find or unwrap the KEK now, so a missing or broken one fails at start, not later."""
        self._call(ref.domain, lambda: self._kek(ref))

    def available(self, ref: KeyRef) -> bool:
        """Whether an older KEK version can be loaded (a missing one only matters to its files)."""
        try:
            self.load(ref)
        except HsmUnavailableError:
            raise
        except KeyProviderError:
            return False
        return True

    # ---- calls, faults and recovery ------------------------------------------------------

    def _call(self, domain: str, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` (which talks to ``domain``'s token) with one retry on a fresh session."""
        with p11._LOCK:
            if domain in self._down:
                raise HsmUnavailableError(
                    f"HSM unavailable for key domain {domain!r}: {self._down[domain]}",
                    hint="new files and opens in this domain fail until the token is back; vcfs reconnects by itself",
                )
            if domain not in self._domains:
                raise KeyProviderError(f"unknown key domain {domain!r}")
            for attempt in (0, 1):
                try:
                    if self._probe:
                        self._probe_domain(domain)
                    return fn()
                except HsmUnavailableError as exc:
                    self._link(domain).drop()
                    if attempt == 1:
                        self._mark_down(domain, exc.message)
                        raise
            raise AssertionError("unreachable")

    def _probe_domain(self, domain: str) -> None:
        d = self._domains[domain]
        if d.masters:
            p11.probe(self.master(domain, max(d.masters)), f"token {d.token!r} of key domain {domain!r}")
        else:
            self._link(domain).get()

    def _mark_down(self, domain: str, why: str) -> None:
        link = self._link(domain)
        for name, d in self._domains.items():
            if (d.module, d.token) == (link.module, link.token) and name not in self._down:
                self._down[name] = why = why.removeprefix("HSM unavailable: ")
                log.error("HSM unavailable: key domain %s (token %r): %s", name, d.token, why)
                events.emit(events.HSM_UNAVAILABLE, domain=name, token=d.token, reason=why)

    def recover(self) -> list[str]:
        """Try to bring down domains back (reinitialising their modules); returns the ones that came back."""
        if not self._down:
            return []
        back = []
        with p11._LOCK:
            for module in {self._domains[d].module for d in self._down}:
                try:
                    p11.reinitialize(module)
                except HsmUnavailableError:
                    continue
                for (mod, _token), link in self._links.items():
                    if mod == module:
                        link.session = None  # invalid after C_Finalize; nothing to close
            for domain in list(self._down):
                try:
                    self._probe_domain(domain)
                    self._link(domain).get()
                except KeyProviderError:
                    continue
                del self._down[domain]
                back.append(domain)
                log.warning("HSM available again: key domain %s", domain)
                events.emit(events.HSM_AVAILABLE, domain=domain, token=self._domains[domain].token)
        return back

    # ---- the KeyProvider interface -------------------------------------------------------

    def _check_wrap_target(self, ref: KeyRef) -> None:
        spec = self._specs.get(ref)
        if spec is not None and spec.state not in (STATE_ACTIVE, STATE_DESTROYED):
            raise KeyProviderError(f"KEK {ref} is {spec.state}: it only unwraps, it wraps no new keys")

    @staticmethod
    def _check_rfc5649(ref: KeyRef, dek: bytes | bytearray, blob: bytes) -> None:
        if len(blob) != len(dek) + 8:
            # RFC 5649 adds exactly 8 bytes to a 32-byte key. Tokens that give 0x210A another meaning
            # (PKCS#11 3.x: PKCS#7 padding + RFC 3394) would otherwise be recorded as RFC 5649.
            raise KeyProviderError(
                f"wrap mechanism of KEK {ref} does not produce RFC 5649 output",
                hint="set the KEK's mechanism to the token's RFC 5649 code (0x210B on PKCS#11 3.x tokens)",
            )

    def wrap(self, ref: KeyRef, dek: bytes | bytearray) -> Wrapped:
        self._check_wrap_target(ref)

        def do() -> bytes:
            kek, spec = self._kek(ref)
            return p11.wrap_dek(self._link(ref.domain).get(), kek, dek, spec.mechanism, str(ref))

        blob = self._call(ref.domain, do)
        self._check_rfc5649(ref, dek, blob)
        events.emit(events.KEY_WRAP, domain=ref.domain, version=ref.version)
        return Wrapped(ref, WRAP_PKCS11_AES_KWP, blob)

    def unwrap(self, wrapped: Wrapped) -> bytearray:
        """Dispatches on the wrap algorithm: 1 = under a KEK in the HSM, 2 = to a recipient whose
        seed a KEK wraps (one HSM unwrap for the seed, then X-Wing in this process)."""
        if wrapped.wrap_alg == WRAP_XWING_KWP:
            dek = self.recipients.unwrap(wrapped)
            events.emit(events.KEY_UNWRAP, domain=wrapped.ref.domain, version=wrapped.ref.version, tier="recipient")
            return dek
        return self._unwrap_kek(wrapped)

    def load_for(self, wrapped: Wrapped) -> None:
        """Fail now (destroyed, unknown, HSM away) if ``wrapped`` cannot be opened, cache or not."""
        if wrapped.wrap_alg == WRAP_XWING_KWP:
            self.load(self.recipients.seed_wrapping(wrapped.ref).ref)
        else:
            self.load(wrapped.ref)

    def _unwrap_kek(self, wrapped: Wrapped) -> bytearray:
        if wrapped.wrap_alg != WRAP_PKCS11_AES_KWP:
            raise KeyProviderError(f"wrap algorithm {wrapped.wrap_alg} is not handled by the PKCS#11 provider")
        if self.state(wrapped.ref) == STATE_DESTROYED:
            self._kek(wrapped.ref)  # raises KeyDestroyedError, no token needed

        def do() -> bytearray:
            kek, spec = self._kek(wrapped.ref)
            return p11.unwrap_dek(kek, wrapped.blob, spec.mechanism, str(wrapped.ref))

        dek = self._call(wrapped.ref.domain, do)
        events.emit(events.KEY_UNWRAP, domain=wrapped.ref.domain, version=wrapped.ref.version)
        return dek

    def rewrap(self, wrapped: Wrapped, target: KeyRef) -> tuple[bytearray, Wrapped]:
        """The DEK of ``wrapped`` and its wrapping under ``target``, in one trip through the token.

        Both KEKs must be in one token (a rewrap within a domain); across tokens, and from a
        recipient (``vcfs keys adopt``), unwrap and wrap.
        """
        self._check_wrap_target(target)
        if wrapped.wrap_alg == WRAP_XWING_KWP or self._link(wrapped.ref.domain) is not self._link(target.domain):
            dek = self.unwrap(wrapped)
            return dek, self.wrap(target, dek)

        def do() -> tuple[bytearray, bytes]:
            old_kek, old_spec = self._kek(wrapped.ref)
            new_kek, new_spec = self._kek(target)
            return p11.rewrap_dek(
                old_kek, new_kek, wrapped.blob, old_spec.mechanism, new_spec.mechanism, str(wrapped.ref)
            )

        dek, blob = self._call(target.domain, do)
        self._check_rfc5649(target, dek, blob)
        events.emit(events.KEY_UNWRAP, domain=wrapped.ref.domain, version=wrapped.ref.version)
        events.emit(events.KEY_WRAP, domain=target.domain, version=target.version)
        return dek, Wrapped(target, WRAP_PKCS11_AES_KWP, blob)

    def self_test(self, domain: str) -> None:
        """Wrap and unwrap a throwaway key so a broken HSM fails at start, not at first write."""
        probe = os.urandom(32)
        if self.unwrap(self.wrap(self.current(domain), probe)) != probe:
            raise KeyProviderError(f"HSM self-test failed for domain {domain!r}")

    def close(self) -> None:
        with p11._LOCK:
            for link in self._links.values():
                link.drop()
            self._loaded.clear()
            self._masters.clear()
        self.recipients.close()
