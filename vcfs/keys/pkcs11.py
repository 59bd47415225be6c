"""KEKs in a PKCS#11 token. The only module that imports python-pkcs11.

Threading: python-pkcs11 0.10 initialises the module for single-threaded use yet releases
the GIL inside calls; two threads in SoftHSM2 at once crash it. Every call into the token is
therefore made under one process-wide lock. The trio side additionally funnels calls through
a CapacityLimiter(1) so waiting threads do not pile up.

DEK handling: a DEK exists in the token only as a short-lived session object (not sensitive,
extractable) that is destroyed right after C_WrapKey / after reading it back from
C_UnwrapKey. File data is never encrypted by the token.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import pkcs11
import pkcs11.exceptions as p11e
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from vcfs.core.header import WRAP_PKCS11_AES_KWP
from vcfs.errors import HeaderAuthError, KeyDestroyedError, KeyProviderError
from vcfs.keys.base import STATE_ACTIVE, STATE_DESTROYED, KeyRef, Wrapped
from vcfs.keys.uri import Pkcs11Uri

_LOCK = threading.RLock()
_T = TypeVar("_T")

# SoftHSM2 names RFC 5649 "CKM_AES_KEY_WRAP_PAD" (0x210A); PKCS#11 3.1 tokens call it
# CKM_AES_KEY_WRAP_KWP (0x210B). The code is configurable per domain for that reason.
DEFAULT_WRAP_MECHANISM = 0x210A

KEK_TEMPLATE = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.WRAP: True,
    Attribute.UNWRAP: True,
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.DERIVE: False,
    Attribute.MODIFIABLE: False,
}


@dataclass(frozen=True, slots=True)
class KekSpec:
    ref: KeyRef
    uri: Pkcs11Uri
    mechanism: int = DEFAULT_WRAP_MECHANISM
    state: str = STATE_ACTIVE


def _mechanism(code: int, ref: KeyRef) -> Mechanism:
    """The configured mechanism code as python-pkcs11 wants it; an unknown code is a config problem."""
    try:
        return Mechanism(code)
    except ValueError:
        raise KeyProviderError(
            f"mechanism {code:#x} of KEK {ref} is not a PKCS#11 mechanism this vcfs knows",
            hint="set the mechanism in vcfs.conf to the RFC 5649 code (0x210A on SoftHSM2, 0x210B on PKCS#11 3.x)",
        ) from None


def _locked(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    with _LOCK:
        return fn(*args, **kwargs)


def _load_module(path: str) -> Any:
    if not os.path.exists(path):
        raise KeyProviderError(
            f"PKCS#11 module not found: {path}",
            hint="install the HSM's PKCS#11 library (softhsm2 for the embedded token) or pass --pkcs11-module",
        )
    try:
        return _locked(pkcs11.lib, path)
    except Exception as exc:  # the loader raises RuntimeError/OSError variants
        raise KeyProviderError(f"cannot load PKCS#11 module {path}: {exc}") from None


def open_session(module_path: str, token_label: str, pin: str) -> Any:
    """Log in to ``token_label`` and return a read-write session (caller holds it for life)."""
    lib = _load_module(module_path)
    try:
        token = _locked(lib.get_token, token_label=token_label)
    except (p11e.NoSuchToken, p11e.MultipleTokensReturned):
        raise KeyProviderError(
            f"PKCS#11 token {token_label!r} not found in {module_path}",
            hint="check the token label in the KEK URI, and that the HSM is reachable",
        ) from None
    try:
        return _locked(token.open, rw=True, user_pin=pin)
    except p11e.UserAlreadyLoggedIn:
        return _locked(token.open, rw=True)
    except (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange):
        raise KeyProviderError(f"wrong PIN for PKCS#11 token {token_label!r}", hint="check --pin-file") from None
    except p11e.PinLocked:
        raise KeyProviderError(f"PIN of PKCS#11 token {token_label!r} is locked") from None
    except p11e.PKCS11Error as exc:
        raise KeyProviderError(f"cannot log in to PKCS#11 token {token_label!r}: {type(exc).__name__}") from None


def find_kek(session: Any, uri: Pkcs11Uri) -> Any:
    try:
        return _locked(session.get_key, object_class=ObjectClass.SECRET_KEY, label=uri.object, id=uri.id)
    except p11e.NoSuchKey:
        raise KeyProviderError(
            f"KEK {uri} not found in token {uri.token!r}",
            hint="the store was made with another token, or the KEK was destroyed",
        ) from None
    except p11e.MultipleObjectsReturned:
        raise KeyProviderError(f"KEK URI {uri} matches more than one key; add id= to it") from None


def check_kek_attributes(kek: Any, name: str) -> None:
    """Refuse KEKs that could leave the token or be used without login."""
    wanted = {
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.PRIVATE: True,
        Attribute.NEVER_EXTRACTABLE: True,
        Attribute.WRAP: True,
        Attribute.UNWRAP: True,
    }
    bad = []
    for attr, want in wanted.items():
        try:
            got = _locked(kek.__getitem__, attr)
        except p11e.PKCS11Error:
            got = None
        if bool(got) != want:
            bad.append(f"{attr.name}={got}")
    if bad:
        raise KeyProviderError(
            f"KEK {name} is unsafe: {', '.join(bad)}",
            hint="a KEK must be private, sensitive, never extractable, and allowed to wrap and unwrap",
        )


def generate_kek(session: Any, label: str, key_id: bytes) -> None:
    try:
        _locked(session.generate_key, KeyType.AES, 256, id=key_id, label=label, store=True, template=KEK_TEMPLATE)
    except p11e.PKCS11Error as exc:
        raise KeyProviderError(f"could not create KEK {label!r} in the token: {type(exc).__name__}") from None


class Pkcs11Provider:
    """Wraps and unwraps DEKs under KEKs held in one or more tokens of one module."""

    def __init__(
        self, module_path: str, pin_for_token: Callable[[str], str], keks: Iterable[KekSpec], current: dict[str, int]
    ) -> None:
        self._module_path = module_path
        self._pin_for_token = pin_for_token  # reads the PIN source when a token is first needed
        self._sessions: dict[str, Any] = {}
        self._keks: dict[KeyRef, tuple[Any, KekSpec]] = {}
        self._current: dict[str, int] = {}
        try:
            self.sync(keks, current)
        except BaseException:
            self.close()  # or the token stays logged in for the rest of the process
            raise

    def session_for(self, token: str) -> Any:
        """The logged-in session of ``token`` (for key management: generate, destroy)."""
        return self._session(token)

    def _session(self, token: str) -> Any:
        if token not in self._sessions:
            self._sessions[token] = open_session(self._module_path, token, self._pin_for_token(token))
        return self._sessions[token]

    def sync(self, keks: Iterable[KekSpec], current: dict[str, int]) -> list[KeyRef]:
        """Take in the store's KEK list (after a rotate, retire or destroy); returns KEKs newly found.

        A missing KEK is an error only if it is a domain's current one: older versions matter
        only to the files still wrapped under them.
        """
        found = []
        for spec in keks:
            key = self._keks.get(spec.ref, (None, spec))[0]
            if spec.state == STATE_DESTROYED:
                key = None
            elif key is None:
                try:
                    key = find_kek(self._session(spec.uri.token or ""), spec.uri)
                except KeyProviderError:
                    if current.get(spec.ref.domain) == spec.ref.version:
                        raise
                else:
                    check_kek_attributes(key, str(spec.ref))
                    found.append(spec.ref)
            self._keks[spec.ref] = (key, spec)
        self._current = dict(current)
        return found

    def current(self, domain: str) -> KeyRef:
        if domain not in self._current:
            raise KeyProviderError(f"unknown key domain {domain!r}")
        return KeyRef(domain, self._current[domain])

    def available(self, ref: KeyRef) -> bool:
        return self._keks.get(ref, (None, None))[0] is not None

    def _kek(self, ref: KeyRef) -> tuple[Any, KekSpec]:
        key, spec = self._keks.get(ref, (None, None))
        if spec is not None and spec.state == STATE_DESTROYED:
            raise KeyDestroyedError(
                f"KEK {ref} was destroyed (crypto-shredded): data wrapped under it cannot be decrypted",
                hint="this is permanent; restore from a plaintext export made before the destroy, if any",
            )
        if key is None or spec is None:
            raise KeyProviderError(
                f"KEK {ref} is not available in the HSM",
                hint="the file was wrapped under a KEK this host cannot reach, or that was destroyed",
            )
        return key, spec

    def wrap(self, ref: KeyRef, dek: bytes) -> Wrapped:
        kek, spec = self._kek(ref)
        if spec.state != STATE_ACTIVE:
            raise KeyProviderError(f"KEK {ref} is {spec.state}: it only unwraps, it wraps no new keys")
        session = self._sessions[spec.uri.token or ""]
        with _LOCK:
            obj = session.create_object(
                {
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: KeyType.AES,
                    Attribute.VALUE: dek,
                    Attribute.TOKEN: False,
                    Attribute.SENSITIVE: False,
                    Attribute.EXTRACTABLE: True,
                }
            )
            try:
                blob = kek.wrap_key(obj, mechanism=_mechanism(spec.mechanism, ref))
            except p11e.PKCS11Error as exc:
                raise KeyProviderError(f"HSM refused to wrap under KEK {ref}: {type(exc).__name__}") from None
            finally:
                obj.destroy()
        if len(blob) != len(dek) + 8:
            # RFC 5649 adds exactly 8 bytes to a 32-byte key. Tokens that give 0x210A another meaning
            # (PKCS#11 3.x: PKCS#7 padding + RFC 3394) would otherwise be recorded as RFC 5649.
            raise KeyProviderError(
                f"wrap mechanism {spec.mechanism:#x} of KEK {ref} does not produce RFC 5649 output",
                hint="set the KEK's mechanism to the token's RFC 5649 code (0x210B on PKCS#11 3.x tokens)",
            )
        return Wrapped(ref, WRAP_PKCS11_AES_KWP, bytes(blob))

    def unwrap(self, wrapped: Wrapped) -> bytes:
        if wrapped.wrap_alg != WRAP_PKCS11_AES_KWP:
            raise KeyProviderError(f"wrap algorithm {wrapped.wrap_alg} is not handled by the PKCS#11 provider")
        kek, spec = self._kek(wrapped.ref)
        with _LOCK:
            try:
                obj = kek.unwrap_key(
                    ObjectClass.SECRET_KEY,
                    KeyType.AES,
                    wrapped.blob,
                    mechanism=_mechanism(spec.mechanism, wrapped.ref),
                    store=False,
                    template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True, Attribute.TOKEN: False},
                )
            except p11e.PKCS11Error:
                raise HeaderAuthError(
                    f"the DEK does not unwrap under KEK {wrapped.ref}: wrong key or modified header"
                ) from None
            try:
                dek = bytes(obj[Attribute.VALUE])
            finally:
                obj.destroy()
        return dek

    def self_test(self, domain: str) -> None:
        """Wrap and unwrap a throwaway key so a broken HSM fails at start, not at first write."""
        probe = os.urandom(32)
        if self.unwrap(self.wrap(self.current(domain), probe)) != probe:
            raise KeyProviderError(f"HSM self-test failed for domain {domain!r}")

    def close(self) -> None:
        with _LOCK:
            for session in self._sessions.values():
                with contextlib.suppress(p11e.PKCS11Error):
                    session.close()
            self._sessions.clear()


def destroy_kek(session: Any, uri: Pkcs11Uri) -> bool:
    """Delete a KEK object from its token (crypto-shred). False if it was already gone."""
    try:
        key = find_kek(session, uri)
    except KeyProviderError:
        return False
    try:
        _locked(key.destroy)
    except p11e.PKCS11Error as exc:
        raise KeyProviderError(f"the token refused to destroy KEK {uri}: {type(exc).__name__}") from None
    return True


# ==== audit trail: HMAC key and checkpoint anchors (used by vcfs/audit/hsm.py) =====================
# Kept at the end of the file and self-contained so that key-lifecycle changes above do not collide
# with it. The audit key is a non-extractable generic secret that only signs and verifies
# (CKM_SHA256_HMAC); the anchor is a private token data object holding the last checkpoint, so a
# log cut back to an earlier checkpoint is caught by comparing with what the HSM remembers.

AUDIT_KEY_TEMPLATE = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.SIGN: True,
    Attribute.VERIFY: True,
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
    Attribute.MODIFIABLE: False,
}
AUDIT_ANCHOR_APPLICATION = "vcfs-audit-anchor"


def audit_key(session: Any, label: str, create: bool) -> Any:
    """The audit HMAC key ``label``; generated in the token on first use when ``create``."""
    try:
        key = _locked(
            session.get_key, object_class=ObjectClass.SECRET_KEY, key_type=KeyType.GENERIC_SECRET, label=label
        )
    except p11e.NoSuchKey:
        if not create:
            raise KeyProviderError(
                f"audit key {label!r} not found in the token",
                hint="checkpoints are verified with the token the mount used; check --pkcs11-module and VCFS_HOME",
            ) from None
        try:
            key = _locked(
                session.generate_key,
                KeyType.GENERIC_SECRET,
                256,
                label=label,
                store=True,
                mechanism=Mechanism.GENERIC_SECRET_KEY_GEN,
                template=AUDIT_KEY_TEMPLATE,
            )
        except p11e.PKCS11Error as exc:
            raise KeyProviderError(f"could not create audit key {label!r} in the token: {type(exc).__name__}") from None
    except p11e.MultipleObjectsReturned:
        raise KeyProviderError(f"more than one audit key is labelled {label!r} in the token") from None
    for attr, want in ((Attribute.SENSITIVE, True), (Attribute.EXTRACTABLE, False), (Attribute.SIGN, True)):
        try:
            got = _locked(key.__getitem__, attr)
        except p11e.PKCS11Error:
            got = None
        if bool(got) != want:
            raise KeyProviderError(
                f"audit key {label!r} is unsafe: {attr.name}={got}",
                hint="the audit key must be sensitive and never extractable; delete it and let vcfs create one",
            )
    return key


def audit_hmac(key: Any, data: bytes) -> bytes:
    """HMAC-SHA256 of ``data`` computed inside the token."""
    try:
        return bytes(_locked(key.sign, data, mechanism=Mechanism.SHA256_HMAC))
    except p11e.PKCS11Error as exc:
        raise KeyProviderError(f"the token refused to compute an audit HMAC: {type(exc).__name__}") from None


def audit_hmac_verify(key: Any, data: bytes, mac: bytes) -> bool:
    """True if ``mac`` is the token's HMAC-SHA256 of ``data`` (compared inside the token)."""
    try:
        return bool(_locked(key.verify, data, mac, mechanism=Mechanism.SHA256_HMAC))
    except p11e.PKCS11Error:
        return False


def audit_anchor_read(session: Any, label: str) -> list[bytes]:
    """Values of every anchor object labelled ``label`` (normally one; two after a crash mid-update)."""
    template = {
        Attribute.CLASS: ObjectClass.DATA,
        Attribute.LABEL: label,
        Attribute.APPLICATION: AUDIT_ANCHOR_APPLICATION,
    }
    with _LOCK:
        try:
            return [bytes(obj[Attribute.VALUE]) for obj in session.get_objects(template)]
        except p11e.PKCS11Error as exc:
            raise KeyProviderError(f"cannot read audit anchor {label!r}: {type(exc).__name__}") from None


def audit_anchor_write(session: Any, label: str, value: bytes) -> None:
    """Replace the anchor ``label`` by one holding ``value``: the new object first, then the old ones go.

    Data objects' values are read-only in SoftHSM2, so the anchor is replaced rather than updated;
    a crash in between leaves both, and readers take the newest by its content.
    """
    template = {
        Attribute.CLASS: ObjectClass.DATA,
        Attribute.LABEL: label,
        Attribute.APPLICATION: AUDIT_ANCHOR_APPLICATION,
    }
    with _LOCK:
        try:
            old = list(session.get_objects(template))
            session.create_object({**template, Attribute.VALUE: value, Attribute.TOKEN: True, Attribute.PRIVATE: True})
            for obj in old:
                obj.destroy()
        except p11e.PKCS11Error as exc:
            raise KeyProviderError(f"cannot update audit anchor {label!r}: {type(exc).__name__}") from None
