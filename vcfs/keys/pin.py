"""Where an HSM PIN comes from, never the command line. In order, for key domain D:

1. ``--pin-file D=FILE`` or ``--pin-file FILE`` (all domains);
2. a systemd credential: ``$CREDENTIALS_DIRECTORY/hsm-pin-D``, then ``$CREDENTIALS_DIRECTORY/hsm-pin``;
3. an environment variable holding the PIN: ``VCFS_HSM_PIN_D`` (D upper-cased, ``-`` as ``_``),
   then ``VCFS_HSM_PIN``;
4. the domain's ``pin_source`` (``file:/path``) in the store config, or a KEK URI's pin-source;
5. the embedded token's PIN file under ``$VCFS_HOME``.

PIN files must not be readable by group or others, as ssh refuses unprotected private keys.
The PIN is read when a session is opened, used for one C_Login and not kept by vcfs.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from vcfs.errors import KeyProviderError

CREDENTIAL_NAME = "hsm-pin"
ENV_NAME = "VCFS_HSM_PIN"


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


def env_name(domain: str) -> str:
    return f"{ENV_NAME}_{domain.upper().replace('-', '_')}"


def resolve_pin(
    pin_file: str | None, pin_source: str | None, embedded_pin: Path | None, domain: str = "default"
) -> str:
    if pin_file:
        return read_pin_file(Path(pin_file))
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        for name in (f"{CREDENTIAL_NAME}-{domain}", CREDENTIAL_NAME):
            if (Path(creds) / name).exists():
                return read_pin_file(Path(creds) / name)
    for var in (env_name(domain), ENV_NAME):
        value = os.environ.get(var, "").strip()
        if value:
            return value
    if pin_source:
        if not pin_source.startswith("file:"):
            raise KeyProviderError(f"unsupported pin-source {pin_source!r}", hint="use pin-source=file:/path")
        return read_pin_file(Path(pin_source[len("file:") :]))
    if embedded_pin is not None:
        return read_pin_file(embedded_pin)
    raise KeyProviderError(
        f"no HSM PIN given for key domain {domain!r}",
        hint=f"pass --pin-file, set {env_name(domain)}, or provide the systemd credential {CREDENTIAL_NAME}",
    )
