"""RFC 7512 PKCS#11 URIs, only the parts vcfs uses (token, object, id, type, pin-source, module-path)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

from vcfs.errors import UsageError

_PATH_ATTRS = {"token", "object", "id", "type", "serial", "manufacturer", "model", "slot-id"}
_QUERY_ATTRS = {"pin-source", "module-path", "module-name", "pin-value"}


@dataclass(frozen=True, slots=True)
class Pkcs11Uri:
    token: str | None = None
    object: str | None = None
    id: bytes | None = None
    type: str | None = None
    pin_source: str | None = None
    module_path: str | None = None

    def __str__(self) -> str:
        parts = []
        if self.token is not None:
            parts.append("token=" + quote(self.token, safe=""))
        if self.object is not None:
            parts.append("object=" + quote(self.object, safe=""))
        if self.id is not None:
            parts.append("id=" + "".join(f"%{b:02x}" for b in self.id))
        if self.type is not None:
            parts.append("type=" + self.type)
        query = []
        if self.module_path:
            query.append("module-path=" + quote(self.module_path, safe="/"))
        if self.pin_source:
            query.append("pin-source=" + quote(self.pin_source, safe="/:"))
        return "pkcs11:" + ";".join(parts) + ("?" + "&".join(query) if query else "")


def parse_pkcs11_uri(text: str) -> Pkcs11Uri:
    if not text.startswith("pkcs11:"):
        raise UsageError(f"not a PKCS#11 URI: {text!r}", hint="expected pkcs11:token=...;object=...")
    path, _, query = text[len("pkcs11:") :].partition("?")
    fields: dict[str, bytes] = {}
    for item, allowed, sep in ((path, _PATH_ATTRS, ";"), (query, _QUERY_ATTRS, "&")):
        for attr in filter(None, item.split(sep)):
            name, eq, value = attr.partition("=")
            if not eq or name not in allowed:
                raise UsageError(f"unsupported PKCS#11 URI attribute {name!r} in {text!r}")
            if name == "pin-value":
                raise UsageError("pin-value in a PKCS#11 URI is refused", hint="use pin-source=file:/path")
            fields[name] = unquote_to_bytes(value)
    if "token" not in fields or ("object" not in fields and "id" not in fields):
        raise UsageError(f"PKCS#11 URI {text!r} must name a token and an object or id")
    if fields.get("type", b"secret-key") != b"secret-key":
        raise UsageError("the KEK URI must have type=secret-key")

    def text_of(key: str) -> str | None:
        return fields[key].decode() if key in fields else None

    return Pkcs11Uri(
        token=text_of("token"),
        object=text_of("object"),
        id=fields.get("id"),
        type=text_of("type"),
        pin_source=text_of("pin-source"),
        module_path=text_of("module-path"),
    )
