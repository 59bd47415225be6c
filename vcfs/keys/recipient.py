"""Recipient keys for write-only (ingest) hosts: the public file, the ingest provider, and
the trusted side that opens recipient-wrapped DEKs.

Why this split: an ingest host gets only a small public file and wraps every new DEK to it
(wrap algorithm 2, vcfs/core/kemwrap.py); it can unwrap nothing, so a file it has closed is
sealed even against the host itself. Trusted hosts hold the recipient's private X-Wing seed
only as an RFC 5649 blob wrapped under a KEK of the domain, and unwrap it through the HSM
when the first such file is opened.
"""

from __future__ import annotations

import base64
import errno
import hmac
import threading
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from vcfs.core import kemwrap, xwing
from vcfs.errors import ConfigError, KeyProviderError
from vcfs.keys.base import KeyRef, Wrapped

PUBLIC_KIND = "vcfs-recipient"
PUBLIC_FORMAT = 1
ALGORITHM = "X-Wing (ML-KEM-768 + X25519), draft-connolly-cfrg-xwing-kem-08"


class IngestOnlyError(KeyProviderError):
    """An ingest host was asked to decrypt: it holds no private key, by design."""

    errno = errno.EACCES


@dataclass(frozen=True, slots=True)
class RecipientPublic:
    """A recipient's public key as handed to ingest hosts. Holds no secret."""

    store_id: str
    domain: str
    version: int
    public: bytes

    @property
    def fingerprint(self) -> bytes:
        return kemwrap.fingerprint(self.public)

    @property
    def ref(self) -> KeyRef:
        return KeyRef(self.domain, self.version)

    def to_toml(self) -> str:
        body = {
            "kind": PUBLIC_KIND,
            "format": PUBLIC_FORMAT,
            "algorithm": ALGORITHM,
            "store_id": self.store_id,
            "domain": self.domain,
            "version": self.version,
            "fingerprint": self.fingerprint.hex(),
            "public_key": base64.b64encode(self.public).decode(),
        }
        return "# vcfs recipient public key: give it to ingest hosts; it holds no secret.\n" + tomli_w.dumps(body)


def parse_public(text: str, where: str) -> RecipientPublic:
    """Read a recipient public file; every defect is a ConfigError naming the file and field."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipient key {where} is not valid TOML: {exc}") from None
    if raw.get("kind") != PUBLIC_KIND or raw.get("format") != PUBLIC_FORMAT:
        raise ConfigError(f"{where} is not a vcfs recipient public key (format {PUBLIC_FORMAT})")
    try:
        public = base64.b64decode(raw["public_key"], validate=True)
        rec = RecipientPublic(str(raw["store_id"]), str(raw["domain"]), int(raw["version"]), public)
        stated = bytes.fromhex(raw["fingerprint"])
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"recipient key {where}: missing or malformed field ({exc})") from None
    if len(public) != xwing.PUBLIC_KEY_LEN:
        raise ConfigError(f"recipient key {where}: public key is {len(public)} bytes, not {xwing.PUBLIC_KEY_LEN}")
    if not hmac.compare_digest(stated, rec.fingerprint):
        raise ConfigError(f"recipient key {where}: fingerprint does not match the key (file damaged or edited)")
    return rec


def load_public(path: Path) -> RecipientPublic:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read recipient key {path}: {exc.strerror}") from None
    return parse_public(text, str(path))


class IngestProvider:
    """The KeyProvider of an ingest mount: wraps to recipients, unwraps nothing."""

    def __init__(self, recipients: list[RecipientPublic]) -> None:
        self._by_domain = {r.domain: r for r in recipients}

    def current(self, domain: str) -> KeyRef:
        rec = self._by_domain.get(domain)
        if rec is None:
            raise IngestOnlyError(
                f"this ingest mount has no recipient key for key domain {domain!r}",
                hint="pass that domain's recipient file with --ingest",
            )
        return rec.ref

    def wrap(self, ref: KeyRef, dek: bytes) -> Wrapped:
        rec = self._by_domain.get(ref.domain)
        if rec is None or rec.version != ref.version:
            raise IngestOnlyError(f"no recipient key {ref} on this ingest mount")
        return Wrapped(ref, kemwrap.WRAP_XWING_KWP, kemwrap.wrap_to(rec.public, dek))

    def unwrap(self, wrapped: Wrapped) -> bytes:
        raise IngestOnlyError(
            f"ingest-only mount: the file's key ({wrapped.ref}) cannot be opened here once it is closed",
            hint="read recordings on a trusted host that can reach the HSM",
        )

    def self_test(self, domain: str) -> None:
        for rec in self._by_domain.values():
            kemwrap.wrap_to(rec.public, bytes(32))

    def close(self) -> None:
        return None


# The trusted side: how a wrapped recipient seed is opened, and the keys it yields.
SeedUnwrap = Callable[[KeyRef], bytearray]


class RecipientKeyring:
    """Opens recipient-wrapped DEKs on trusted hosts.

    ``open_seed`` returns a recipient's private seed (unwrapped by the HSM) as a bytearray
    that is wiped once the expanded key is made; the expanded key stays in memory for the
    life of the keyring (one HSM call per recipient per mount) and is dropped by ``close``.
    """

    def __init__(self, open_seed: SeedUnwrap, fingerprints: dict[KeyRef, bytes]) -> None:
        self._open_seed = open_seed
        self._fingerprints = dict(fingerprints)
        self._keys: dict[KeyRef, xwing.XWingPrivateKey] = {}
        self._lock = threading.Lock()

    def _key(self, ref: KeyRef) -> xwing.XWingPrivateKey:
        with self._lock:
            key = self._keys.get(ref)
            if key is None:
                seed = self._open_seed(ref)
                try:
                    key = xwing.expand(seed)
                finally:
                    seed[:] = bytes(len(seed))
                expected = self._fingerprints.get(ref)
                if expected is not None and not hmac.compare_digest(kemwrap.fingerprint(key.public), expected):
                    raise KeyProviderError(f"recipient key {ref} unwrapped to a key with another fingerprint")
                self._keys[ref] = key
            return key

    def unwrap(self, wrapped: Wrapped) -> bytes:
        return kemwrap.unwrap_with(self._key(wrapped.ref), wrapped.blob)

    def close(self) -> None:
        with self._lock:
            self._keys.clear()
