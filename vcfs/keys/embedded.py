"""The embedded default HSM: a SoftHSM2 token that vcfs creates under VCFS_HOME.

For the quickstart, development and tests. Its PINs are random and kept in mode-0600 files
beside the token; a real deployment points vcfs at its HSM's module and PIN instead.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

from vcfs.errors import KeyProviderError

TOKEN_LABEL = "vcfs"
MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


def vcfs_home() -> Path:
    env = os.environ.get("VCFS_HOME")
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".local" / "share" / "vcfs"


def softhsm_module() -> str:
    for path in MODULE_CANDIDATES:
        if os.path.exists(path):
            return path
    raise KeyProviderError("SoftHSM2 is not installed", hint="apt-get install softhsm2 (scripts/quickstart does)")


def conf_path(home: Path) -> Path:
    return home / "softhsm2.conf"


def pin_path(home: Path, token: str = TOKEN_LABEL) -> Path:
    """The user PIN file of an embedded token (``vcfs``: the first one; others under pins/)."""
    return home / "user.pin" if token == TOKEN_LABEL else home / "pins" / f"{token}.user.pin"


def so_pin_path(home: Path, token: str = TOKEN_LABEL) -> Path:
    return home / "so.pin" if token == TOKEN_LABEL else home / "pins" / f"{token}.so.pin"


def activate(home: Path) -> None:
    """Point SoftHSM2 at the embedded token directory (must run before the module loads)."""
    if conf_path(home).exists():
        os.environ["SOFTHSM2_CONF"] = str(conf_path(home))


def _write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")


def ensure_token(home: Path, token: str = TOKEN_LABEL) -> bool:
    """Create the embedded token ``token`` once; later calls find it and do nothing. True if made now.

    Several embedded tokens share one SoftHSM2 token directory; each stands for one HSM (a
    region's) in development and tests.
    """
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    tokens = home / "tokens"
    if conf_path(home).exists() and pin_path(home, token).exists():
        activate(home)
        return False
    tokens.mkdir(exist_ok=True, mode=0o700)
    if not conf_path(home).exists():
        conf_path(home).write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    activate(home)
    pin_path(home, token).parent.mkdir(exist_ok=True, mode=0o700)
    user_pin, so_pin = secrets.token_hex(16), secrets.token_hex(16)
    try:
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", token, "--so-pin", so_pin, "--pin", user_pin],
            check=True,
            capture_output=True,
            text=True,
            env=os.environ.copy(),
        )
    except FileNotFoundError:
        raise KeyProviderError("softhsm2-util not found", hint="apt-get install softhsm2") from None
    except subprocess.CalledProcessError as exc:
        raise KeyProviderError(f"could not create the embedded SoftHSM2 token: {exc.stderr.strip()}") from None
    _write_secret(so_pin_path(home, token), so_pin)
    _write_secret(pin_path(home, token), user_pin)
    return True
