"""The access policy as pure code: parsing with line-numbered errors, globs, and decisions."""

from __future__ import annotations

from pathlib import Path

import pytest

from vcfs.accessconfig import load_access_file, parse_access
from vcfs.audit.config import FAIL_OPEN, parse_size
from vcfs.caller import Caller
from vcfs.errors import PolicyError
from vcfs.policy import glob_to_regex
from vcfs.tomllines import LineMap, Problems

GOOD = """\
[policy]
[policy.principals.recorder]
uids = [2001]
exes = ["/usr/bin/ffmpeg"]

[policy.principals.reviewers]
gids = [3000]

[policy.principals.admin]
uids = [0]

[[policy.rules]]
paths = ["/cameras/**"]
principals = ["recorder"]
allow = ["recorder"]

[[policy.rules]]
paths = ["/cameras/**"]
principals = ["reviewers"]
allow = ["reader"]
deny = ["list"]

[[policy.rules]]
paths = ["/**"]
principals = ["admin"]
allow = ["all"]
deny = ["read"]

[[policy.rules]]
paths = ["/public/*.txt"]
principals = ["*"]
allow = ["read"]
"""


def caller(uid: int = 1000, gid: int = 1000, exe: str | None = "/usr/bin/cat", groups: tuple[int, ...] = ()) -> Caller:
    return Caller(uid, gid, 4242, 4242, exe, "x", "x", frozenset((gid, *groups)))


def _load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return load_access_file(path)


def test_decisions(tmp_path: Path) -> None:
    cfg = _load(tmp_path, GOOD)
    policy = cfg.policy  # type: ignore[attr-defined]
    ffmpeg = caller(2001, exe="/usr/bin/ffmpeg")
    rec = policy.names_of(ffmpeg)
    assert rec == ("recorder",)
    assert all(policy.allows(rec, op, "/cameras/a/b.mp4") for op in ("create", "write", "readback"))
    assert not any(policy.allows(rec, op, "/cameras/b.mp4") for op in ("read", "list", "delete", "rename", "setattr"))
    assert not policy.allows(rec, "create", "/elsewhere/b.mp4")
    # the same uid running another program is not the recorder
    assert policy.names_of(caller(2001, exe="/usr/bin/cat")) == ()
    # an upgraded binary under a running recorder still counts as that binary
    assert policy.names_of(caller(2001, exe="/usr/bin/ffmpeg (deleted)")) == ("recorder",)
    # groups match the request's gid or a supplementary group; deny beats allow
    reviewer = policy.names_of(caller(1500, gid=100, groups=(3000,)))
    assert reviewer == ("reviewers",)
    assert policy.allows(reviewer, "read", "/cameras/x.mp4") and not policy.allows(reviewer, "list", "/cameras")
    admin = policy.names_of(caller(0))
    assert policy.allows(admin, "delete", "/cameras/x.mp4") and not policy.allows(admin, "read", "/cameras/x.mp4")
    # "*" is everybody, and globs stay within one path segment
    nobody = policy.names_of(caller(65534))
    assert policy.allows(nobody, "read", "/public/notes.txt")
    assert not policy.allows(nobody, "read", "/public/sub/notes.txt") and not policy.allows(
        nobody, "write", "/public/a.txt"
    )
    assert policy.enforce is True


BAD = """\
[policy]
enforce = "yes"
[policy.principals.cam]
uids = ["no-such-user-here"]
exes = ["ffmpeg"]
[policy.principals.empty]

[[policy.rules]]
paths = ["cameras/**"]
principals = ["cam", "ghost"]
allow = ["read", "lisst"]
colour = "blue"

[audit]
on_failure = "closed"

[alerts]
timezone = "Mars/Olympus"
bulk_read_bytes = "lots"

[extra]
"""


def test_a_bad_file_lists_every_problem_with_its_line(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as err:
        _load(tmp_path, BAD)
    got = err.value.problems
    expected = [
        "line 2: policy.enforce: must be true or false",
        "line 4: policy.principals.cam.uids[0]: no user named 'no-such-user-here' on this host",
        "line 5: policy.principals.cam.exes[0]: must be an absolute path",
        "line 6: policy.principals.empty: a principal needs at least one of uids, gids, exes",
        "line 12: policy.rules[0].colour: unknown key (expected paths, principals, allow, deny)",
        "line 9: policy.rules[0].paths[0]: paths are globs from the mount's root and start with '/'",
        "line 10: policy.rules[0].principals[1]: no principal named 'ghost' is defined",
        "line 11: policy.rules[0].allow[1]: unknown operation 'lisst'",
        'line 15: audit.on_failure: must be "fail-closed" or "fail-open"',
        "line 18: alerts.timezone: unknown time zone 'Mars/Olympus'",
        "line 19: alerts.bulk_read_bytes: must be a size in bytes",
        "line 21: extra: unknown table (expected policy, audit, alerts)",
    ]
    for want in expected:
        assert any(p.startswith(want) for p in got), f"missing {want!r} in {got}"
    assert err.value.exit_code == 3
    assert err.value.message.startswith(f"policy file {tmp_path / 'policy.toml'} is invalid: line ")


def test_a_syntax_error_names_its_line(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"not valid TOML: .*line 3"):
        _load(tmp_path, "[policy]\nenforce = true\nrules = tru\n")


def test_policy_without_rules_is_refused_rather_than_denying_everything(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="without rules"):
        _load(tmp_path, "[policy]\n")


def test_no_policy_table_means_plain_posix(tmp_path: Path) -> None:
    cfg = _load(tmp_path, '[audit]\non_failure = "fail-open"\nrotate_size = "2 MiB"\n')
    assert cfg.policy is None  # type: ignore[attr-defined]
    assert cfg.audit.on_failure == FAIL_OPEN and cfg.audit.rotate_bytes == 2 << 20  # type: ignore[attr-defined]


def test_tables_parse_from_a_plain_dict() -> None:
    """How a host mount config carries the same tables: no file, no line numbers."""
    p = Problems("host config", None)
    rule = {"paths": ["/**"], "principals": ["rec"], "allow": ["x"]}
    doc = {
        "policy": {"principals": {"rec": {"uids": [7]}}, "rules": [rule]},
        "alerts": {"working_hours": "22:00-06:00", "working_days": ["sat", "sun"], "timezone": "Asia/Tokyo"},
    }  # fmt: skip
    cfg = parse_access(doc, p)
    assert p.items == ["policy.rules[0].allow[0]: unknown operation 'x' (operations: create, write, read, readback, "
                       "list, delete, rename, setattr; roles: recorder, reader, all)"]  # fmt: skip
    assert cfg.alerts.working_days == {5, 6} and cfg.alerts.timezone == "Asia/Tokyo"


@pytest.mark.parametrize(
    ("glob", "path", "matches"),
    [
        ("/**", "/", True),
        ("/**", "/a/b/c", True),
        ("/cam/**", "/cam", True),
        ("/cam/**", "/cam/1/2.mp4", True),
        ("/cam/**", "/camera/1.mp4", False),
        ("/cam/*.mp4", "/cam/a.mp4", True),
        ("/cam/*.mp4", "/cam/d/a.mp4", False),
        ("/cam/?.mp4", "/cam/ab.mp4", False),
        ("/a/**/b", "/a/b", True),
        ("/a/**/b", "/a/x/y/b", True),
        ("/a/**/b", "/a/x/yb", False),
        ("/c[0-9]/*", "/c7/x", True),
        ("/c[!0-9]/*", "/c7/x", False),
        ("/weird.name+(1)", "/weird.name+(1)", True),
        ("/weird.name+(1)", "/weirdXname+(1)", False),
    ],
)
def test_globs(glob: str, path: str, matches: bool) -> None:
    assert (glob_to_regex(glob).match(path) is not None) is matches


def test_line_map_follows_quoted_keys_arrays_of_tables_and_multiline_strings() -> None:
    text = (
        '[a."b.c"]\nx = 1\n[[a.list]]\ny = """\n[not.a.header]\nz = 1\n"""\n'
        "[[a.list]]\ny = 2\n[[a.list.inner]]\nw = 3\n"
    )
    lm = LineMap(text)
    assert lm.line(("a", "b.c", "x")) == 2
    assert lm.line(("a", "list", 0, "y")) == 4
    assert lm.line(("not", "a", "header")) is None
    assert lm.line(("a", "list", 1, "y")) == 9
    assert lm.line(("a", "list", 1, "inner", 0, "w")) == 11
    assert lm.line(("a", "list", 1, "missing")) == 8  # the enclosing table


@pytest.mark.parametrize(
    ("text", "value"), [(5, 5), ("512 MiB", 512 << 20), ("10GB", 10**10), ("1.5 KiB", 1536), ("-1", None), ("x", None)]
)
def test_sizes(text: object, value: int | None) -> None:
    assert parse_size(text) == value


def test_every_documented_example_parses(tmp_path: Path) -> None:
    """docs/AUDIT.md's full example is a real, valid file."""
    doc = (Path(__file__).parent.parent / "docs" / "AUDIT.md").read_text()
    example = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    cfg = _load(tmp_path, example)
    assert cfg.policy is not None and cfg.audit.dir is not None  # type: ignore[attr-defined]
