"""Which key domain a plaintext path belongs to (data residency). Pure: no I/O, no keys.

The store config maps path prefixes such as ``/eu/`` or ``/tenant-42/`` to key domains; a file
is wrapped under the current KEK of the domain its *plaintext* path maps to when it is
created. The longest matching prefix wins; a path under no prefix belongs to the default
domain. This is the one place that decides it: the FUSE adapter asks it at create, rename
and link time, rewrap asks it to move files to the domain their path calls for, and a name
layer that encrypts file names must hand it the plaintext path, never the stored name.

Paths are absolute, ``/``-separated, relative to the mount root ("/eu/cam1/a.ts"). A prefix
is a directory: it starts and ends with ``/``, so ``/eu/`` covers ``/eu/x`` but not
``/europe/x``, nor the directory ``/eu`` itself (which lives in its parent's domain).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from vcfs.errors import UsageError


def normalize_prefix(prefix: str) -> str:
    """``eu`` / ``/eu`` / ``/eu/`` all name the directory prefix ``/eu/``."""
    parts = [p for p in prefix.strip().split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise UsageError(f"bad domain prefix {prefix!r}", hint="use a directory path such as /eu/ or /tenant-42/")
    return "/" + "/".join(parts) + "/"


class DomainMap:
    """Prefix -> domain, with the default domain for everything else."""

    def __init__(self, default: str, prefixes: Mapping[str, Iterable[str]]) -> None:
        self.default = default
        owner: dict[str, str] = {}
        for domain, plist in prefixes.items():
            for raw in plist:
                p = normalize_prefix(raw)
                if owner.get(p, domain) != domain:
                    raise UsageError(f"prefix {p} is given to two key domains ({owner[p]} and {domain})")
                owner[p] = domain
        # Longest first, so the first match is the most specific one.
        self._prefixes = sorted(owner.items(), key=lambda item: len(item[0]), reverse=True)

    @property
    def prefixes(self) -> list[tuple[str, str]]:
        return list(self._prefixes)

    def domain_of(self, path: str) -> str:
        """The key domain of the file at plaintext ``path`` (``/a/b``)."""
        for prefix, domain in self._prefixes:
            if path.startswith(prefix):
                return domain
        return self.default

    def same_domain_move(self, old: str, new: str, is_dir: bool) -> bool:
        """Whether moving ``old`` to ``new`` keeps every file under the same domain.

        A file: both paths map to one domain. A directory: its children's domain is the same
        at both places and no prefix lies inside either (files below such a prefix would
        change domain, or a moved prefix directory would leave its domain). Conservative on
        purpose: a refused move is done by ``mv`` as copy + delete, which re-encrypts.
        """
        if not is_dir:
            return self.domain_of(old) == self.domain_of(new)
        old_dir, new_dir = old.rstrip("/") + "/", new.rstrip("/") + "/"
        if self.domain_of(old_dir) != self.domain_of(new_dir):
            return False
        return not any(p.startswith(old_dir) or p.startswith(new_dir) for p, _ in self._prefixes)
