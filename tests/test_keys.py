"""The PKCS#11 provider against a real SoftHSM2 token: wrap, unwrap, and refusing unsafe keys."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import run_vcfs
from pkcs11 import Attribute, KeyType

from vcfs import events, keyops
from vcfs.config import load_config
from vcfs.errors import HeaderAuthError, KeyProviderError, UsageError
from vcfs.keys import embedded
from vcfs.keys.base import KeyRef, Wrapped
from vcfs.keys.pin import read_pin_file
from vcfs.keys.pkcs11 import _LOCK, check_kek_attributes, close_session, generate_kek, open_session
from vcfs.keys.provider import Pkcs11Provider
from vcfs.keys.setup import HostKeyOptions, domain_spec, open_provider, store_keystore
from vcfs.keys.uri import parse_pkcs11_uri
from vcfs.rewrap import rewrap


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


def test_pin_from_environment_and_per_domain_credential(
    store: Path, vcfs_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both come before the embedded token's PIN file: a wrong one fails, the right one works."""
    pin = read_pin_file(embedded.pin_path(vcfs_home))
    cfg = load_config(store)
    monkeypatch.setenv("VCFS_HSM_PIN_DEFAULT", "0000")
    with pytest.raises(KeyProviderError, match="wrong PIN"):
        open_provider(cfg, HostKeyOptions())
    monkeypatch.setenv("VCFS_HSM_PIN_DEFAULT", pin)
    open_provider(cfg, HostKeyOptions()).close()
    creds = tmp_path / "creds"
    creds.mkdir()
    for name, value in (("hsm-pin-default", "0000"), ("hsm-pin", pin)):
        (creds / name).write_text(value + "\n")
        (creds / name).chmod(0o600)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    with pytest.raises(KeyProviderError, match="wrong PIN"):  # the domain's own credential comes first
        open_provider(cfg, HostKeyOptions())
    (creds / "hsm-pin-default").unlink()
    open_provider(cfg, HostKeyOptions()).close()


def test_no_pin_on_the_command_line() -> None:
    res = run_vcfs("mount", "/nonexistent", "/nonexistent", "--pin", "1234", check=False)
    assert res.returncode == 2 and "unrecognized arguments: --pin" in res.stderr


def test_wrong_pin_is_tried_once_and_never_again(store: Path) -> None:
    """Recovery never retries a rejected PIN: real HSMs lock the user after a few wrong tries."""
    cfg = load_config(store)
    reads: list[int] = []

    def wrong_pin() -> str:
        reads.append(1)
        return "0000"

    spec = domain_spec(cfg.domains["default"], store_keystore(cfg, HostKeyOptions()), HostKeyOptions())
    provider = Pkcs11Provider([replace(spec, pin=wrong_pin)], probe=True)
    try:
        with pytest.raises(KeyProviderError, match="wrong PIN"):
            provider.load(KeyRef("default", 1))
        for _ in range(3):
            provider.recover()
            with pytest.raises(KeyProviderError, match="rejected; not retrying"):
                provider.load(KeyRef("default", 1))
        assert len(reads) == 1
    finally:
        provider.close()


def test_key_events_name_keys_never_carry_them(store: Path) -> None:
    seen: list[events.Event] = []
    unsubscribe = events.subscribe(seen.append)
    try:
        keyops.rotate(store, "default", HostKeyOptions())
        keyops.retire(store, "default", 1, HostKeyOptions())
        keyops.rotate_master(store, "default", HostKeyOptions())
        rewrap(store, "default", None, HostKeyOptions())  # the names key moves off v1
        keyops.destroy(store, "default", 1, False, HostKeyOptions())
        provider = open_provider(load_config(store), HostKeyOptions())
        try:
            dek = bytearray(os.urandom(32))
            provider.unwrap(provider.wrap(provider.current("default"), dek))
        finally:
            provider.close()
    finally:
        unsubscribe()
    kinds = [e.kind for e in seen]
    for kind in (events.KEY_GENERATE, events.KEY_ROTATE, events.KEY_RETIRE, events.KEY_DESTROY):
        assert kind in kinds
    assert events.KEY_WRAP in kinds and events.KEY_UNWRAP in kinds and events.KEY_LOAD in kinds
    rotates = [e.fields for e in seen if e.kind == events.KEY_ROTATE]
    assert {"domain": "default", "version": 2, "previous": 1, "tier": "kek"} in rotates
    assert any(f["tier"] == "master" for f in rotates)
    for e in seen:
        assert all(isinstance(v, str | int | float | bool | type(None)) for v in e.fields.values())
        assert all(len(str(v)) < 100 for v in e.fields.values())  # names and numbers, no key material


def test_token_kek_store_made_with_a_given_kek(vcfs_home: Path, tmp_path: Path) -> None:
    """--kek URI: a KEK an HSM admin made (a token object) is used as is, with no master tier."""
    session = _session(vcfs_home)
    try:
        generate_kek(session, "admin-made-kek", b"\x42")
    finally:
        close_session(session)
    backing = tmp_path / "b"
    uri = "pkcs11:token=vcfs;object=admin-made-kek;type=secret-key"
    pin = str(embedded.pin_path(vcfs_home))
    run_vcfs("init", str(backing), "--kek", uri, "--pkcs11-module", embedded.softhsm_module(), "--pin-file", pin)
    run_vcfs("keys", "rotate", str(backing), "default", "--pin-file", pin)  # a second token object
    rows = json.loads(run_vcfs("keys", "list", str(backing), "--json").stdout)
    assert [(r["tier"], r["stored"], r["current"]) for r in rows] == [("kek", "token", False), ("kek", "token", True)]
    res = run_vcfs("keys", "rotate", str(backing), "default", "--master", check=False)
    assert res.returncode == 2 and "has no master key" in res.stderr
