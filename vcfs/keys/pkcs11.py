"""Master keys, KEKs and DEK wrapping in a PKCS#11 token. The only module that imports python-pkcs11.

Key objects, and what may leave the token (docs/KEYS.md):
- a domain's master key: a token object that never leaves (private, sensitive, never
  extractable); it only wraps and unwraps KEKs;
- a keystore KEK: generated inside the token, leaves it only wrapped under the master key,
  and is loaded back as a non-extractable session object while in use;
- a token KEK (provisioned by an HSM admin, or made by vcfs before the master-key tier): a
  token object like a master key, used directly.

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
import functools
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pkcs11
import pkcs11.exceptions as p11e
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from vcfs.errors import HeaderAuthError, HsmUnavailableError, KeyProviderError
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
    except p11e.NoSuchToken:
        # Absent, not wrong: with several key domains, the others keep working without it.
        raise HsmUnavailableError(
            f"PKCS#11 token {token_label!r} not found in {module_path}",
            hint="check the token label in the store config, and that the HSM is reachable",
        ) from None
    except p11e.MultipleTokensReturned:
        raise KeyProviderError(f"more than one PKCS#11 token is labelled {token_label!r} in {module_path}") from None
    except p11e.PKCS11Error as exc:  # SoftHSM2 fails the whole slot list while a token is missing
        raise unavailable(f"cannot list the tokens of {module_path}", exc) from None
    try:
        return _locked(token.open, rw=True, user_pin=pin)
    except p11e.UserAlreadyLoggedIn:
        return _locked(token.open, rw=True)
    except (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange):
        raise KeyProviderError(f"wrong PIN for PKCS#11 token {token_label!r}", hint="check --pin-file") from None
    except p11e.PinLocked:
        raise KeyProviderError(f"PIN of PKCS#11 token {token_label!r} is locked") from None
    except _GONE as exc:
        raise unavailable(f"cannot open a session on token {token_label!r}", exc) from None
    except p11e.PKCS11Error as exc:
        raise KeyProviderError(f"cannot log in to PKCS#11 token {token_label!r}: {type(exc).__name__}") from None


def find_kek(session: Any, uri: Pkcs11Uri) -> Any:
    """The secret key ``uri`` names (a token KEK or a master key)."""
    try:
        return _locked(session.get_key, object_class=ObjectClass.SECRET_KEY, label=uri.object, id=uri.id)
    except _GONE as exc:
        raise unavailable(f"cannot look up {uri}", exc) from None
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
    """A new AES-256 token key that never leaves the HSM: a token KEK or a domain's master key."""
    try:
        _locked(session.generate_key, KeyType.AES, 256, id=key_id, label=label, store=True, template=KEK_TEMPLATE)
    except p11e.PKCS11Error as exc:
        raise KeyProviderError(f"could not create KEK {label!r} in the token: {type(exc).__name__}") from None


# Errors that mean "the token or our session is gone", not "this key or blob is wrong".
_GONE = (
    p11e.DeviceRemoved,
    p11e.DeviceError,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.KeyHandleInvalid,
    p11e.ObjectHandleInvalid,
    p11e.WrappingKeyHandleInvalid,
    p11e.UnwrappingKeyHandleInvalid,
)

# A KEK in the HSM while it is in use: loaded from its wrapped copy as a session object that
# is sensitive and not extractable, for wrapping and unwrapping only.
SESSION_KEK_TEMPLATE = {
    Attribute.TOKEN: False,
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
}
# The same key while it is being wrapped under a master key (rotate, master rotate): it must be
# extractable for C_WrapKey, and exists so only inside this process for one call.
_TRANSIT_KEK_TEMPLATE = {**SESSION_KEK_TEMPLATE, Attribute.EXTRACTABLE: True}
_DEK_TEMPLATE = {Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True, Attribute.TOKEN: False}


@functools.cache
def _mech(code: int) -> Mechanism:
    """The configured mechanism code as python-pkcs11 wants it; an unknown code is a config problem."""
    try:
        return Mechanism(code)
    except ValueError:
        raise KeyProviderError(
            f"mechanism {code:#x} is not a PKCS#11 mechanism this vcfs knows",
            hint="set the mechanism in vcfs.conf to the RFC 5649 code (0x210A on SoftHSM2, 0x210B on PKCS#11 3.x)",
        ) from None


def unavailable(what: str, exc: BaseException) -> HsmUnavailableError:
    return HsmUnavailableError(
        f"HSM unavailable: {what} ({type(exc).__name__})",
        hint="check that the token is present and reachable; vcfs reconnects by itself when it is back",
    )


def is_gone(exc: BaseException) -> bool:
    return isinstance(exc, _GONE)


def reinitialize(module_path: str) -> None:
    """C_Finalize + C_Initialize: how SoftHSM2 (and many modules) notice a token that came back.

    Every session of every token of this module is invalid afterwards; callers reopen them.
    """
    lib = _load_module(module_path)
    try:
        _locked(lib.reinitialize)
    except p11e.PKCS11Error as exc:
        raise unavailable(f"cannot reinitialise {module_path}", exc) from None


def close_session(session: Any) -> None:
    with _LOCK, contextlib.suppress(p11e.PKCS11Error):
        session.close()


def probe(key: Any, what: str) -> None:
    """One cheap call that fails when the token holding ``key`` (a token object) is gone."""
    try:
        _locked(key.__getitem__, Attribute.CLASS)
    except p11e.PKCS11Error as exc:
        raise unavailable(what, exc) from None


def check_session_kek(kek: Any, name: str) -> None:
    """A loaded KEK must be private, sensitive and not extractable (an unwrapped key can never
    be NEVER_EXTRACTABLE, so that attribute is not asked for here; the wrapped copy is
    protected by the master key, which is checked with check_kek_attributes)."""
    bad = []
    for attr, want in ((Attribute.SENSITIVE, True), (Attribute.EXTRACTABLE, False), (Attribute.PRIVATE, True)):
        got = _locked(kek.__getitem__, attr)
        if bool(got) != want:
            bad.append(f"{attr.name}={got}")
    if bad:
        raise KeyProviderError(f"KEK {name} was loaded unsafely: {', '.join(bad)}")


def new_wrapped_kek(session: Any, master: Any, mechanism: int) -> bytes:
    """Generate a KEK inside the HSM and return it wrapped under ``master`` (RFC 5649).

    The clear key never leaves the token: it is a session object that exists for one wrap.
    """
    with _LOCK:
        try:
            kek = session.generate_key(KeyType.AES, 256, store=False, template=_TRANSIT_KEK_TEMPLATE)
            try:
                return bytes(master.wrap_key(kek, mechanism=_mech(mechanism)))
            finally:
                kek.destroy()
        except p11e.PKCS11Error as exc:
            if is_gone(exc):
                raise unavailable("cannot generate a KEK", exc) from None
            raise KeyProviderError(f"the HSM could not generate and wrap a KEK: {type(exc).__name__}") from None


def load_wrapped_kek(master: Any, blob: bytes, mechanism: int, name: str) -> Any:
    """Unwrap a KEK from the keystore into the HSM as a non-extractable session object."""
    with _LOCK:
        try:
            kek = master.unwrap_key(
                ObjectClass.SECRET_KEY,
                KeyType.AES,
                blob,
                mechanism=_mech(mechanism),
                store=False,
                template=SESSION_KEK_TEMPLATE,
            )
        except p11e.PKCS11Error as exc:
            if is_gone(exc):
                raise unavailable(f"cannot load KEK {name}", exc) from None
            raise KeyProviderError(
                f"the keystore copy of KEK {name} does not unwrap under its master key",
                hint="the keystore was modified or belongs to another token",
            ) from None
    check_session_kek(kek, name)
    return kek


def rewrap_kek_blob(old_master: Any, new_master: Any, blob: bytes, mechanism: int, name: str) -> bytes:
    """Move a wrapped KEK from one master key to another inside the HSM (master rotation)."""
    with _LOCK:
        try:
            kek = old_master.unwrap_key(
                ObjectClass.SECRET_KEY,
                KeyType.AES,
                blob,
                mechanism=_mech(mechanism),
                store=False,
                template=_TRANSIT_KEK_TEMPLATE,
            )
            try:
                return bytes(new_master.wrap_key(kek, mechanism=_mech(mechanism)))
            finally:
                kek.destroy()
        except p11e.PKCS11Error as exc:
            if is_gone(exc):
                raise unavailable(f"cannot rewrap KEK {name}", exc) from None
            raise KeyProviderError(
                f"KEK {name} could not be moved to the new master key: {type(exc).__name__}"
            ) from None


def wrap_dek(session: Any, kek: Any, dek: bytes | bytearray, mechanism: int, name: str) -> bytes:
    """C_WrapKey of a DEK that enters the token as a short-lived session object."""
    with _LOCK:
        try:
            obj = session.create_object(
                {
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: KeyType.AES,
                    Attribute.VALUE: bytes(dek),
                    **_DEK_TEMPLATE,
                }
            )
            try:
                return bytes(kek.wrap_key(obj, mechanism=_mech(mechanism)))
            finally:
                obj.destroy()
        except p11e.PKCS11Error as exc:
            if is_gone(exc):
                raise unavailable(f"cannot wrap under KEK {name}", exc) from None
            raise KeyProviderError(f"HSM refused to wrap under KEK {name}: {type(exc).__name__}") from None


def _unwrap_object(kek: Any, blob: bytes, mechanism: int, name: str) -> Any:
    """C_UnwrapKey of a DEK into a short-lived session object (caller holds _LOCK, destroys it)."""
    try:
        return kek.unwrap_key(
            ObjectClass.SECRET_KEY, KeyType.AES, blob, mechanism=_mech(mechanism), store=False, template=_DEK_TEMPLATE
        )
    except p11e.PKCS11Error as exc:
        if is_gone(exc):
            raise unavailable(f"cannot unwrap under KEK {name}", exc) from None
        raise HeaderAuthError(f"the DEK does not unwrap under KEK {name}: wrong key or modified header") from None


def unwrap_dek(kek: Any, blob: bytes, mechanism: int, name: str) -> bytearray:
    """C_UnwrapKey + read the value + destroy. Raises HeaderAuthError for a blob that does not
    unwrap, HsmUnavailableError when the token is gone (SoftHSM2 answers a bad blob with
    CKR_GENERAL_ERROR, so callers that must tell the two apart probe the token first)."""
    with _LOCK:
        obj = _unwrap_object(kek, blob, mechanism, name)
        try:
            return bytearray(obj[Attribute.VALUE])
        finally:
            obj.destroy()


def rewrap_dek(
    old_kek: Any, new_kek: Any, blob: bytes, old_mech: int, new_mech: int, name: str
) -> tuple[bytearray, bytes]:
    """Unwrap a DEK and wrap the very same token object under another KEK (rewrap).

    Four token calls (unwrap, read value, wrap, destroy) instead of six for an unwrap and a
    wrap done apart. The value is returned so the caller can authenticate the header before it
    uses the new wrapping.
    """
    with _LOCK:
        obj = _unwrap_object(old_kek, blob, old_mech, name)
        try:
            dek = bytearray(obj[Attribute.VALUE])
            return dek, bytes(new_kek.wrap_key(obj, mechanism=_mech(new_mech)))
        except p11e.PKCS11Error as exc:
            if is_gone(exc):
                raise unavailable("cannot rewrap a DEK", exc) from None
            raise KeyProviderError(f"HSM refused to rewrap a DEK: {type(exc).__name__}") from None
        finally:
            obj.destroy()


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
