"""Where an HSM PIN comes from, in order: --pin-file, a systemd credential, the URI's
pin-source, the embedded token's PIN file. PIN files must not be readable by group or others,
as ssh refuses unprotected private keys."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from vcfs.errors import KeyProviderError

CREDENTIAL_NAME = "hsm-pin"


def read_pin_file(path: Path) -> str:
    try:
        st = path.stat()
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise KeyProviderError(f"PIN file {path} is readable by group or others", hint=f"chmod 600 {path}")
        pin = path.read_text().strip()
    except FileNotFoundError:
        raise KeyProviderError(f"PIN file {path} not found") from None
    except PermissionError:
        raise KeyProviderError(f"PIN file {path} is not readable by this user") from None
    if not pin:
        raise KeyProviderError(f"PIN file {path} is empty")
    return pin


def resolve_pin(pin_file: str | None, pin_source: str | None, embedded_pin: Path | None) -> str:
    if pin_file:
        return read_pin_file(Path(pin_file))
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL_NAME).exists():
        return read_pin_file(Path(creds) / CREDENTIAL_NAME)
    if pin_source:
        if not pin_source.startswith("file:"):
            raise KeyProviderError(f"unsupported pin-source {pin_source!r}", hint="use pin-source=file:/path")
        return read_pin_file(Path(pin_source[len("file:") :]))
    if embedded_pin is not None:
        return read_pin_file(embedded_pin)
    raise KeyProviderError("no HSM PIN given", hint="pass --pin-file, or set pin-source in the KEK URI")
