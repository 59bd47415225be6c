"""The access policy: who (uid, group, executable) may do what (create, read, ...) where (path globs).

Pure: parsing a ``[policy]`` table and answering questions about it. No FUSE, no /proc, no
I/O except resolving user and group names at parse time. The FUSE adapter asks through
vcfs/access.py; the format and its safe default are documented in docs/AUDIT.md.

Decisions: an operation is allowed if at least one rule whose paths match and whose
principals include the caller allows it, and no such rule denies it. Everything else is
denied: with a policy configured, the default is no. (Without a policy the mount has plain
POSIX semantics, enforced by the kernel through ``default_permissions``; the policy only ever
takes away, never grants what POSIX refuses.)
"""

from __future__ import annotations

import grp
import os
import pwd
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from vcfs.caller import Caller
from vcfs.tomllines import Path, Problems

OPS = ("create", "write", "read", "readback", "list", "delete", "rename", "setattr")
ROLES: dict[str, frozenset[str]] = {
    # a recorder creates and writes recordings and may read back what it is writing (muxers
    # re-read to finalise: ffmpeg -movflags +faststart), never recordings it did not just write
    "recorder": frozenset({"create", "write", "readback"}),
    "reader": frozenset({"read", "list"}),
    "all": frozenset(OPS),
}
ANYONE = "*"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def glob_to_regex(glob: str) -> re.Pattern[str]:
    """Compile a path glob: ``*`` and ``?`` stay inside one path segment, ``**`` spans segments.

    ``/a/**`` matches ``/a`` itself and everything below it; ``[...]`` is a character class.
    """
    out, i = "", 0
    while i < len(glob):
        if glob.startswith("/**", i) and (i + 3 == len(glob) or glob[i + 3] == "/"):
            out += "(?:/.*)?"  # "/a/**" also matches "/a"; "/a/**/b" also matches "/a/b"
            i += 3
            continue
        ch = glob[i]
        if ch == "*":
            out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "[":
            end = glob.find("]", i + 2)
            if end < 0:
                out += re.escape(ch)
            else:
                body = glob[i + 1 : end]
                neg = body.startswith("!")
                body = (body[1:] if neg else body).replace("\\", "\\\\").replace("^", "\\^")
                out += "[" + ("^" if neg else "") + body + "]"
                i = end
        else:
            out += re.escape(ch)
        i += 1
    return re.compile(out + r"\Z" if out else r"/\Z")


@dataclass(frozen=True, slots=True)
class Principal:
    """A named set of callers: every criterion given must hold (uid AND group AND exe)."""

    name: str
    uids: frozenset[int] | None = None
    gids: frozenset[int] | None = None  # matches the request's gid or any supplementary group
    exes: frozenset[str] | None = None

    def matches(self, caller: Caller) -> bool:
        if self.uids is not None and caller.uid not in self.uids:
            return False
        if self.gids is not None and not (self.gids & (caller.groups | {caller.gid})):
            return False
        if self.exes is not None:
            exe = caller.exe
            if exe is not None and exe.endswith(" (deleted)"):  # the binary was upgraded under a running process
                exe = exe[: -len(" (deleted)")]
            if exe not in self.exes:
                return False
        return True


@dataclass(frozen=True, slots=True)
class Rule:
    paths: tuple[str, ...]
    principals: tuple[str, ...]
    allow: frozenset[str]
    deny: frozenset[str]
    patterns: tuple[re.Pattern[str], ...]

    def applies(self, names: Iterable[str], path: str) -> bool:
        if ANYONE not in self.principals and not set(names) & set(self.principals):
            return False
        return any(p.match(path) for p in self.patterns)


@dataclass(frozen=True, slots=True)
class Policy:
    principals: dict[str, Principal]
    rules: tuple[Rule, ...]
    enforce: bool = True  # False: decide and audit, but let everything through (a dry run)

    def names_of(self, caller: Caller) -> tuple[str, ...]:
        """The principals ``caller`` is (possibly several, possibly none)."""
        return tuple(name for name, p in self.principals.items() if p.matches(caller))

    def allows(self, names: tuple[str, ...], op: str, path: str) -> bool:
        allowed = False
        for rule in self.rules:
            if rule.applies(names, path):
                if op in rule.deny:
                    return False
                allowed = allowed or op in rule.allow
        return allowed


# ---- parsing -------------------------------------------------------------------------------------


def _ids(value: Any, where: Path, p: Problems, kind: str) -> frozenset[int] | None:
    if not isinstance(value, list):
        p.add(where, f"must be a list of {kind} ids or names")
        return None
    out = set()
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int | str):
            p.add((*where, i), f"must be a {kind} id or name")
        elif isinstance(item, int):
            out.add(item)
        else:
            try:
                out.add(pwd.getpwnam(item).pw_uid if kind == "user" else grp.getgrnam(item).gr_gid)
            except KeyError:
                p.add((*where, i), f"no {kind} named {item!r} on this host")
    return frozenset(out)


def _strings(value: Any, where: Path, p: Problems) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        p.add(where, "must be a list of strings")
        return []
    return list(value)


def _principal(name: str, table: Any, where: Path, p: Problems) -> Principal | None:
    if not _NAME.match(name):
        p.add(where, "principal names are letters, digits, '_', '.' and '-'")
    if not isinstance(table, dict):
        p.add(where, "must be a table with uids, gids and/or exes")
        return None
    unknown = set(table) - {"uids", "gids", "exes"}
    for key in sorted(unknown):
        p.add((*where, key), "unknown key (expected uids, gids, exes)")
    if not set(table) & {"uids", "gids", "exes"}:
        p.add(where, "a principal needs at least one of uids, gids, exes")
    uids = _ids(table["uids"], (*where, "uids"), p, "user") if "uids" in table else None
    gids = _ids(table["gids"], (*where, "gids"), p, "group") if "gids" in table else None
    exes = None
    if "exes" in table:
        exes = set()
        for i, exe in enumerate(_strings(table["exes"], (*where, "exes"), p)):
            if not os.path.isabs(exe):
                p.add((*where, "exes", i), "must be an absolute path")
            exes.add(os.path.normpath(exe))
    return Principal(name, uids, gids, frozenset(exes) if exes is not None else None)


def _ops(value: Any, where: Path, p: Problems) -> frozenset[str]:
    out: set[str] = set()
    for i, op in enumerate(_strings(value, where, p)):
        if op in ROLES:
            out |= ROLES[op]
        elif op in OPS:
            out.add(op)
        else:
            p.add((*where, i), f"unknown operation {op!r} (operations: {', '.join(OPS)}; roles: {', '.join(ROLES)})")
    return frozenset(out)


def _rule(table: Any, where: Path, p: Problems, principals: dict[str, Principal]) -> Rule | None:
    if not isinstance(table, dict):
        p.add(where, "must be a table")
        return None
    for key in sorted(set(table) - {"paths", "principals", "allow", "deny"}):
        p.add((*where, key), "unknown key (expected paths, principals, allow, deny)")
    for key in ("paths", "principals"):
        if key not in table:
            p.add(where, f"missing {key}")
    if "allow" not in table and "deny" not in table:
        p.add(where, "a rule needs allow and/or deny")
    paths = _strings(table.get("paths", []), (*where, "paths"), p)
    for i, glob in enumerate(paths):
        if not glob.startswith("/"):
            p.add((*where, "paths", i), "paths are globs from the mount's root and start with '/'")
    names = _strings(table.get("principals", []), (*where, "principals"), p)
    for i, name in enumerate(names):
        if name != ANYONE and name not in principals:
            p.add((*where, "principals", i), f"no principal named {name!r} is defined")
    allow = _ops(table.get("allow", []), (*where, "allow"), p)
    deny = _ops(table.get("deny", []), (*where, "deny"), p)
    return Rule(tuple(paths), tuple(names), allow, deny, tuple(glob_to_regex(g) for g in paths))


def parse_policy(table: Any, p: Problems, where: Path = ("policy",)) -> Policy | None:
    """Parse a ``[policy]`` table; mistakes go to ``p`` (the caller raises once with all of them)."""
    if not isinstance(table, dict):
        p.add(where, "must be a table")
        return None
    for key in sorted(set(table) - {"enforce", "principals", "rules"}):
        p.add((*where, key), "unknown key (expected enforce, principals, rules)")
    enforce = table.get("enforce", True)
    if not isinstance(enforce, bool):
        p.add((*where, "enforce"), "must be true or false")
    raw_principals = table.get("principals", {})
    principals: dict[str, Principal] = {}
    if not isinstance(raw_principals, dict):
        p.add((*where, "principals"), "must be a table of named principals")
    else:
        for name, body in raw_principals.items():
            got = _principal(name, body, (*where, "principals", name), p)
            if got is not None:
                principals[name] = got
    raw_rules = table.get("rules", [])
    rules = []
    if not isinstance(raw_rules, list):
        p.add((*where, "rules"), "must be an array of tables ([[policy.rules]])")
    else:
        for i, body in enumerate(raw_rules):
            rule = _rule(body, (*where, "rules", i), p, principals)
            if rule is not None:
                rules.append(rule)
    if not rules:
        p.add(where, "a policy without rules denies everything; add [[policy.rules]]")
    return Policy(principals, tuple(rules), enforce is not False)
