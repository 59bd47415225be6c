"""The PKCS#11 provider against a real SoftHSM2 token: wrap, unwrap, and refusing unsafe keys."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pkcs11 import Attribute, KeyType

from vcfs.config import load_config
from vcfs.errors import HeaderAuthError, KeyProviderError, UsageError
from vcfs.keys import embedded
from vcfs.keys.base import Wrapped
from vcfs.keys.pin import read_pin_file
from vcfs.keys.pkcs11 import _LOCK, check_kek_attributes, open_session
from vcfs.keys.setup import HostKeyOptions, open_provider
from vcfs.keys.uri import parse_pkcs11_uri


def test_wrap_unwrap_round_trip(store: Path) -> None:
    provider = open_provider(load_config(store), HostKeyOptions())
    try:
        dek = os.urandom(32)
        wrapped = provider.wrap(provider.current("default"), dek)
        assert dek not in wrapped.blob and len(wrapped.blob) == 40
        assert provider.unwrap(wrapped) == dek
        tampered = Wrapped(wrapped.ref, wrapped.wrap_alg, bytes([wrapped.blob[0] ^ 1]) + wrapped.blob[1:])
        with pytest.raises(HeaderAuthError, match="does not unwrap"):
            provider.unwrap(tampered)
    finally:
        provider.close()


def _session(vcfs_home: Path):  # type: ignore[no-untyped-def]
    return open_session(embedded.softhsm_module(), embedded.TOKEN_LABEL, read_pin_file(embedded.pin_path(vcfs_home)))


def test_extractable_or_public_kek_is_refused(store: Path, vcfs_home: Path) -> None:
    session = _session(vcfs_home)
    try:
        with _LOCK:
            weak = session.generate_key(
                KeyType.AES,
                256,
                label="weak-kek",
                store=True,
                template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: False, Attribute.PRIVATE: False},
            )
        with pytest.raises(KeyProviderError, match="unsafe"):
            check_kek_attributes(weak, "weak-kek")
    finally:
        with _LOCK:
            for key in session.get_objects({Attribute.LABEL: "weak-kek"}):
                key.destroy()
            session.close()


def test_wrong_pin_is_a_clear_error(store: Path, tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text("0000\n")
    pin.chmod(0o600)
    with pytest.raises(KeyProviderError, match="wrong PIN"):
        open_provider(load_config(store), HostKeyOptions(pin_file=str(pin)))


def test_pin_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text("1234\n")
    pin.chmod(0o644)
    with pytest.raises(KeyProviderError, match="readable by group or others"):
        read_pin_file(pin)


def test_missing_module_is_a_clear_error(store: Path) -> None:
    with pytest.raises(KeyProviderError, match="module not found"):
        open_provider(load_config(store), HostKeyOptions(pkcs11_module="/nonexistent/libhsm.so"))


@pytest.mark.parametrize(
    "uri",
    [
        "token=x;object=y",
        "pkcs11:object=y",
        "pkcs11:token=x;object=y;type=private",
        "pkcs11:token=x;object=y?pin-value=1",
    ],
)
def test_bad_kek_uris(uri: str) -> None:
    with pytest.raises(UsageError):
        parse_pkcs11_uri(uri)


def test_uri_round_trip() -> None:
    text = "pkcs11:token=my%20token;object=kek;id=%01%ff;type=secret-key?module-path=/usr/lib/x.so"
    uri = parse_pkcs11_uri(text)
    assert (uri.token, uri.object, uri.id, uri.module_path) == ("my token", "kek", b"\x01\xff", "/usr/lib/x.so")
    assert parse_pkcs11_uri(str(uri)) == uri
