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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from vcfs.core import kemwrap, xwing
from vcfs.errors import ConfigError, KeyDestroyedError, KeyProviderError
from vcfs.keys.base import STATE_ACTIVE, STATE_DESTROYED, KeyRef, Wrapped
from vcfs.keys.recipients import recipient_name

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
    """The key provider of an ingest mount: wraps to recipients, unwraps nothing, touches no HSM.

    ``sync`` takes in which recipients the store config says were destroyed: wrapping a new
    file to one of them would make it unreadable at once, so such creates are refused.
    """

    def __init__(self, recipients: list[RecipientPublic]) -> None:
        self._by_domain = {r.domain: r for r in recipients}
        self._destroyed: set[KeyRef] = set()

    def sync(self, destroyed: Iterable[KeyRef]) -> None:
        self._destroyed = set(destroyed)

    def recipients(self) -> list[RecipientPublic]:
        return list(self._by_domain.values())

    def domains(self) -> list[str]:
        return list(self._by_domain)

    def current(self, domain: str) -> KeyRef:
        rec = self._by_domain.get(domain)
        if rec is None:
            raise IngestOnlyError(
                f"this ingest mount has no recipient key for key domain {domain!r}",
                hint="give the mount that domain's recipient file too (--ingest FILE, repeatable)",
            )
        return rec.ref

    def wrap(self, ref: KeyRef, dek: bytes | bytearray) -> Wrapped:
        rec = self._by_domain.get(ref.domain)
        if rec is None or rec.version != ref.version:
            raise IngestOnlyError(f"no recipient key {recipient_name(ref)} on this ingest mount")
        if ref in self._destroyed:
            raise KeyDestroyedError(
                f"recipient {recipient_name(ref)} was destroyed in this store: a new file wrapped to it would be "
                "unreadable, so none is made",
                hint="give this host the current recipient file (vcfs keys recipient export BACKING DOMAIN --out FILE)",
            )
        return Wrapped(ref, kemwrap.WRAP_XWING_KWP, kemwrap.wrap_to(rec.public, dek))

    def unwrap(self, wrapped: Wrapped) -> bytearray:
        raise IngestOnlyError(
            "this is an ingest-only mount: a file's key cannot be opened again once the file was closed "
            f"(it is wrapped to {_wrapped_name(wrapped)})",
            hint="read recordings on a trusted host that can reach the HSM",
        )

    def load_for(self, wrapped: Wrapped) -> None:
        """Opens of existing files always fail here, whatever a cache might hold."""
        self.unwrap(wrapped)

    def state(self, ref: KeyRef) -> str | None:
        return None

    def is_down(self, domain: str) -> bool:
        return False

    def recover(self) -> list[str]:
        return []

    def self_test(self, domain: str) -> None:
        rec = self._by_domain.get(domain)
        if rec is not None:
            kemwrap.wrap_to(rec.public, bytes(32))

    def close(self) -> None:
        return None


def _wrapped_name(wrapped: Wrapped) -> str:
    if wrapped.wrap_alg == kemwrap.WRAP_XWING_KWP:
        return f"recipient {recipient_name(wrapped.ref)}"
    return f"KEK {wrapped.ref}"


# ---- the trusted side ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecipientSpec:
    """What a trusted host knows of one recipient version: from the store config and the keystore."""

    ref: KeyRef  # domain and recipient version (the header's "KEK version" field under wrap algorithm 2)
    fingerprint: bytes  # as the store config records it
    state: str = STATE_ACTIVE
    seed: Wrapped | None = None  # the seed wrapped under a KEK of the domain (wrap algorithm 1); None: not kept


class RecipientKeyring:
    """Opens recipient-wrapped DEKs on trusted hosts.

    ``unwrap_seed`` is the HSM unwrap of a KEK-wrapped secret (the key provider's). The seed
    comes back as a bytearray that is wiped as soon as the X-Wing key is expanded from it. With
    ``keep`` (offline tools: adopt, fsck, export work through many files in one run), the
    expanded key stays in memory until ``close``; without it (the mount), every unwrap goes
    to the HSM for the seed and drops the expanded key at once, so the private key exists in the
    daemon only for the moment of an open (the DEK cache spares reopens). ``cryptography``'s key
    objects cannot be wiped; dropping them is all Python allows (docs/KEYS.md, "Memory").
    """

    def __init__(self, unwrap_seed: Callable[[Wrapped], bytearray], keep: bool = True) -> None:
        self._unwrap_seed = unwrap_seed
        self._keep = keep
        self._specs: dict[KeyRef, RecipientSpec] = {}
        self._keys: dict[KeyRef, xwing.XWingPrivateKey] = {}
        self._lock = threading.Lock()

    def sync(self, specs: Iterable[RecipientSpec]) -> None:
        """Take in the store's recipients (after a rotate or destroy); a destroyed one is forgotten at once."""
        with self._lock:
            self._specs = {s.ref: s for s in specs}
            for ref in list(self._keys):
                spec = self._specs.get(ref)
                if spec is None or spec.state == STATE_DESTROYED or spec.seed is None:
                    del self._keys[ref]

    def known(self) -> list[RecipientSpec]:
        with self._lock:
            return list(self._specs.values())

    def seed_wrapping(self, ref: KeyRef) -> Wrapped:
        """The wrapped seed of recipient ``ref``, or the named reason why there is none."""
        spec = self._specs.get(ref)
        name = recipient_name(ref)
        if spec is None:
            raise KeyProviderError(
                f"recipient {name} is not known to this store",
                hint="the file was wrapped to a recipient key of another store, or the store config is out of date",
            )
        if spec.state == STATE_DESTROYED:
            raise KeyDestroyedError(
                f"recipient {name} was destroyed (crypto-shredded): files wrapped to it cannot be decrypted",
                hint="this is permanent; restore from a plaintext export made before the destroy, if any",
            )
        if spec.seed is None:
            raise KeyProviderError(
                f"recipient {name} has no wrapped private key in the keystore",
                hint="restore this store's keystore (see docs/KEYS.md), or point --keystore at it",
            )
        return spec.seed

    def _expand(self, ref: KeyRef) -> xwing.XWingPrivateKey:
        seed = self._unwrap_seed(self.seed_wrapping(ref))
        try:
            key = xwing.expand(seed)
        except xwing.XWingError:
            raise KeyProviderError(
                f"recipient {recipient_name(ref)}: the keystore's seed is not a recipient key"
            ) from None
        finally:
            seed[:] = bytes(len(seed))
        if not hmac.compare_digest(kemwrap.fingerprint(key.public), self._specs[ref].fingerprint):
            raise KeyProviderError(
                f"recipient {recipient_name(ref)} in the keystore is not the key the store names (fingerprint)",
                hint="the keystore belongs to another store or was restored from elsewhere; check --keystore",
            )
        return key

    def _key(self, ref: KeyRef) -> xwing.XWingPrivateKey:
        with self._lock:
            key = self._keys.get(ref)
            if key is None:
                key = self._expand(ref)
                if self._keep:
                    self._keys[ref] = key
            return key

    def unwrap(self, wrapped: Wrapped) -> bytearray:
        return kemwrap.unwrap_with(self._key(wrapped.ref), wrapped.blob)

    def close(self) -> None:
        with self._lock:
            self._keys.clear()
