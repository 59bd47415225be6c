"""Which key domain a plaintext path belongs to: longest prefix wins, moves that would change a
file's domain are detected (pure, no I/O)."""

from __future__ import annotations

import pytest

from vcfs.domainmap import DomainMap, normalize_prefix
from vcfs.errors import UsageError

MAP = DomainMap("default", {"eu": ["/eu/"], "eu-gold": ["eu/gold"], "us": ["/us/", "/tenant-42/"]})


@pytest.mark.parametrize(
    ("path", "domain"),
    [
        ("/eu/cam1/a.ts", "eu"),
        ("/eu/gold/x", "eu-gold"),  # the longer prefix wins
        ("/eu/golden/x", "eu"),  # a prefix is a directory, not a string prefix
        ("/europe/x", "default"),
        ("/eu", "default"),  # the directory itself lives in its parent's domain
        ("/tenant-42/r.mp4", "us"),
        ("/x", "default"),
    ],
)
def test_domain_of(path: str, domain: str) -> None:
    assert MAP.domain_of(path) == domain


@pytest.mark.parametrize(
    ("old", "new", "is_dir", "same"),
    [
        ("/eu/a", "/eu/b/c", False, True),
        ("/eu/a", "/us/a", False, False),
        ("/eu/a", "/a", False, False),
        ("/a", "/b", False, True),
        ("/eu/x", "/eu/y", True, True),
        ("/eu", "/eu2", True, False),  # moving the prefix directory itself
        ("/eu/x", "/eu/gold/x", True, False),
        ("/archive", "/old", True, True),
        ("/stuff", "/stuff2", True, True),
        ("/eu-parent", "/x", True, True),
    ],
)
def test_same_domain_move(old: str, new: str, is_dir: bool, same: bool) -> None:
    assert MAP.same_domain_move(old, new, is_dir) is same


def test_directory_holding_a_prefix_cannot_move() -> None:
    m = DomainMap("default", {"eu": ["/data/eu/"]})
    assert not m.same_domain_move("/data", "/data2", True)


def test_prefix_given_twice_is_refused() -> None:
    with pytest.raises(UsageError, match="two key domains"):
        DomainMap("default", {"a": ["/x/"], "b": ["x"]})


@pytest.mark.parametrize("bad", ["", "/", "..", "/a/../b"])
def test_bad_prefix(bad: str) -> None:
    with pytest.raises(UsageError):
        normalize_prefix(bad)
