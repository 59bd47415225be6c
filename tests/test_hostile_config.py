"""A corrupted or hostile store config through the real CLI: a clear error, never a traceback.

A real store (with a real file in it) gets its ``vcfs.conf`` replaced by each case below:
broken syntax and encodings, nesting deep enough to blow a recursive parser, values of the
wrong type or range, names that escape, a huge file, and things that are not files at all (a
directory, a FIFO that would block a reader forever, a symlink to /dev/zero that would fill
memory, a symlink loop). Every case runs through ``vcfs.cli.main`` (argument parsing,
dispatch, error rendering: the code a user runs) for fsck, export and keys list, and a sample
runs as a real ``vcfs`` process, mount included. Each must end with an exit code from
docs/CLI.md and ``vcfs: error: ...`` on stderr, or succeed where the damage is harmless
(e.g. a bad module path is ignored for the embedded token). Hypothesis adds byte-level
mutations of the real config through the same entry point.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import run_vcfs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fuzz import mutated

from vcfs.cli import main

EXPECTED_CODES = {0, 2, 3, 4}  # ok / problems found / config error / key error


def _sub(pattern: str, replacement: str) -> Callable[[str], str]:
    return lambda good: re.sub(pattern, lambda _m: replacement, good, count=1, flags=re.M)


TEXT_CASES: dict[str, Callable[[str], str | bytes]] = {
    "empty": lambda g: "",
    "binary garbage": lambda g: b"\x00\xff\xfe\x80 garbage",
    "not UTF-8": lambda g: g.replace("default", "d\xe9faut").encode("latin-1"),
    "truncated in half": lambda g: g[: len(g) // 2],
    "nested arrays 5000 deep": lambda g: "a = " + "[" * 5000 + "]" * 5000 + "\n" + g,
    "nested tables 3000 deep": lambda g: "x = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n" + g,
    "duplicate key": lambda g: g + "\nformat = 1\n",
    "format 2": _sub(r"^format = 1", "format = 2"),
    "format as string": _sub(r"^format = 1", 'format = "1"'),
    "format as bool": _sub(r"^format = 1", "format = true"),
    "store_id as int": _sub(r'^store_id = ".*"', "store_id = 5"),
    "unknown feature": _sub(r"^encrypted_names = false", "encrypted_names = false\nfoo = true"),
    "encrypted_names as int": _sub(r"^encrypted_names = false", "encrypted_names = 1"),
    "features as string": _sub(r"^\[features\]\nencrypted_names = false", 'features = "none"'),
    "no keys table": lambda g: g[: g.index("[keys]")],
    "default domain missing": _sub(r'^default_domain = ".*"', 'default_domain = "nope"'),
    "domain name escapes": lambda g: g.replace("keys.domains.default", 'keys.domains."../../etc"'),
    "embedded as string": _sub(r"^embedded = true", 'embedded = "yes"'),
    "current not listed": _sub(r"^current = 1", "current = 7"),
    "current negative": _sub(r"^current = 1", "current = -1"),
    "kek not an array": _sub(r"^\[\[keys\.domains\.default\.kek\]\]", "[keys.domains.default.kek]"),
    "kek version huge": lambda g: g.replace("version = 1", "version = 99999999999999").replace(
        "current = 1", "current = 99999999999999"
    ),
    "mechanism negative": _sub(r"^mechanism = \d+", "mechanism = -5"),
    "mechanism above 64 bits": _sub(r"^mechanism = \d+", "mechanism = 18446744073709551617"),
    "mechanism unknown": _sub(r"^mechanism = \d+", "mechanism = 123456"),
    "uri not pkcs11": _sub(r'^uri = ".*"', 'uri = "http://example.com/key"'),
    "uri object 100k chars": _sub(r"object=[^;\"]*", "object=" + "a" * 100_000),
    "uri bad percent": _sub(r"object=[^;\"]*", "object=%zz"),
    "check value odd hex": _sub(r'^check_wrapped = "..', 'check_wrapped = "0'),
    "check value not the KEK's": _sub(r'^check_value = ".*"', 'check_value = "' + "00" * 32 + '"'),
    "state unknown": _sub(r'^state = ".*"', 'state = "zombie"'),
    "state as int": _sub(r'^state = ".*"', "state = 3"),
    "created as int": _sub(r'^created = ".*"', "created = 5"),
    "created as TOML date": _sub(r'^created = ".*"', "created = 2026-01-01T00:00:00Z"),
    "20 MB of comment": lambda g: g + "# " + "x" * 20_000_000 + "\n",
}
NODE_CASES = ["directory", "fifo", "symlink to /dev/zero", "symlink loop", "dangling symlink", "no files/ directory"]


def _install(store: Path, case: str, good: str) -> None:
    conf = store / "vcfs.conf"
    if conf.is_dir() and not conf.is_symlink():
        conf.rmdir()
    else:
        conf.unlink(missing_ok=True)
    if not (store / "files").is_dir():
        (store / "files").mkdir()
    if case in TEXT_CASES:
        text = TEXT_CASES[case](good)
        conf.write_bytes(text if isinstance(text, bytes) else text.encode())
    elif case == "directory":
        conf.mkdir()
    elif case == "fifo":
        os.mkfifo(conf)
    elif case == "symlink to /dev/zero":
        conf.symlink_to("/dev/zero")
    elif case == "symlink loop":
        conf.symlink_to(conf)
    elif case == "dangling symlink":
        conf.symlink_to(store / "missing.conf")
    elif case == "no files/ directory":
        conf.write_text(good)
        (store / "files").rename(store / "files.moved")


def _cli(*argv: str) -> tuple[int, str]:
    """Run the real CLI entry point; a hang or an escaping exception fails the test."""
    err = io.StringIO()

    def hang(*_: object) -> None:
        raise TimeoutError("the CLI hung")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(30)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(list(argv))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, err.getvalue()


def _assert_clean(code: int, stderr: str, what: str) -> None:
    assert "Traceback" not in stderr, f"{what}: {stderr}"
    assert code in EXPECTED_CODES, f"{what}: exit {code}: {stderr}"
    if code in (3, 4):
        lines = stderr.strip().splitlines()
        assert lines and lines[0].startswith("vcfs: error: "), f"{what}: {stderr}"
        assert all(line.startswith(("vcfs: error: ", "vcfs: hint: ")) for line in lines), f"{what}: {stderr}"


@pytest.fixture(scope="module")
def hostile_store(vcfs_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A real store with one file written through the engine (so fsck and export unwrap a DEK)."""
    from vcfs.config import load_config
    from vcfs.cryptfile import create_cryptfile
    from vcfs.keys.setup import HostKeyOptions, open_provider

    store = tmp_path_factory.mktemp("hostile") / "backing"
    run_vcfs("init", str(store))
    provider = open_provider(load_config(store), HostKeyOptions())
    try:
        ref = provider.current("default")
        path = store / "files" / "rec.bin"
        cf = create_cryptfile(
            os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), str(path), lambda d: provider.wrap(ref, d)
        )
        cf.write(0, b"recording" * 1000)
        cf.close()
    finally:
        provider.close()
    good = (store / "vcfs.conf").read_text()
    yield store, good
    _install(store, "empty", good)
    (store / "vcfs.conf").write_text(good)


@pytest.mark.parametrize("case", [*TEXT_CASES, *NODE_CASES])
def test_hostile_config_gives_a_clear_error(hostile_store: tuple[Path, str], case: str, tmp_path: Path) -> None:
    store, good = hostile_store
    _install(store, case, good)
    try:
        results = {
            "fsck": _cli("fsck", str(store)),
            "keys list": _cli("keys", "list", str(store)),
            "export": _cli("export", str(store), str(tmp_path / "out")),
        }
    finally:
        _install(store, "empty", good)
        (store / "vcfs.conf").write_text(good)
        if (store / "files.moved").exists():
            shutil.rmtree(store / "files")
            (store / "files.moved").rename(store / "files")
    for command, (code, stderr) in results.items():
        _assert_clean(code, stderr, f"{case}: {command}")
    # Something is wrong with every case: at least one command must say so (a corrupted config
    # must not pass silently as a working store).
    if case not in ("duplicate key",):
        assert any(code != 0 for code, _ in results.values()), f"{case}: every command succeeded"


@pytest.mark.mount
@pytest.mark.parametrize("case", ["nested arrays 5000 deep", "mechanism unknown", "fifo", "symlink to /dev/zero"])
def test_hostile_config_through_the_vcfs_process(hostile_store: tuple[Path, str], case: str, tmp_path: Path) -> None:
    """The same through a real ``vcfs`` process: mount (the daemon reports back) and fsck."""
    store, good = hostile_store
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _install(store, case, good)
    try:
        for argv in (("mount", str(store), str(mnt)), ("fsck", str(store))):
            res = run_vcfs(*argv, check=False, timeout=60)
            _assert_clean(res.returncode, res.stderr, f"{case}: vcfs {argv[0]}")
            assert res.returncode in (3, 4), f"{case}: vcfs {argv[0]} exited {res.returncode}"
            assert not os.path.ismount(mnt)
    finally:
        _install(store, "empty", good)
        (store / "vcfs.conf").write_text(good)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_config_bytes_through_the_cli(hostile_store: tuple[Path, str], data: st.DataObject) -> None:
    store, good = hostile_store
    text = data.draw(mutated(good.encode()))
    (store / "vcfs.conf").write_bytes(text)
    try:
        code, stderr = _cli("fsck", str(store))
    finally:
        (store / "vcfs.conf").write_text(good)
    _assert_clean(code, stderr, f"mutation {text[:80]!r}")
