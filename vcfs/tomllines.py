"""Line numbers for keys of a TOML document, so config errors can say where they are.

tomllib reports line numbers for syntax errors only; a value that parses but is wrong (an
unknown operation, a uid that is a string) would otherwise be reported by key path alone.
This is a small line scanner, not a TOML parser: it follows table headers (``[a.b]``),
arrays of tables (``[[a.b]]``, counted) and ``key =`` lines (dotted and quoted keys
included), which is what config files written by people look like. A key it cannot place is
reported at the line of the nearest enclosing table, or without a line.
"""

from __future__ import annotations

import re

Path = tuple[str | int, ...]

_HEADER = re.compile(r"^\s*(\[\[?)\s*(.+?)\s*(\]\]?)\s*(#.*)?$")
_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_KEY = re.compile(rf"^\s*({_PART}(?:\s*\.\s*{_PART})*)\s*=")


def _split_key(text: str) -> list[str]:
    parts, cur, quote = [], "", ""
    for ch in text:
        if quote:
            if ch == quote:
                quote = ""
            else:
                cur += ch
        elif ch in "\"'":
            quote = ch
        elif ch == ".":
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


class LineMap:
    """Maps key paths such as ``("policy", "rules", 2, "allow")`` to 1-based line numbers."""

    def __init__(self, text: str) -> None:
        self._lines: dict[Path, int] = {}
        counts: dict[tuple[str, ...], int] = {}
        table: Path = ()
        in_multiline = ""
        for no, line in enumerate(text.splitlines(), start=1):
            if in_multiline:  # skip the body of a multi-line string
                if in_multiline in line:
                    in_multiline = ""
                continue
            header = _HEADER.match(line)
            if header and header.group(1) == header.group(3)[::-1].replace("]", "["):
                keys = _split_key(header.group(2))
                if header.group(1) == "[[":
                    base = tuple(keys)
                    index = counts.get(base, 0)
                    counts[base] = index + 1
                    table = (*self._resolve(keys, counts, last_is_array=True), index)
                else:
                    table = self._resolve(keys, counts, last_is_array=False)
                self._lines.setdefault(table, no)
                continue
            key = _KEY.match(line)
            if key:
                self._lines.setdefault((*table, *_split_key(key.group(1))), no)
                rest = line[key.end() :]
                for delim in ('"""', "'''"):
                    if rest.count(delim) == 1:
                        in_multiline = delim

    @staticmethod
    def _resolve(keys: list[str], counts: dict[tuple[str, ...], int], last_is_array: bool) -> Path:
        """Insert the current index of every enclosing array of tables into a header's path."""
        out: list[str | int] = []
        for i in range(len(keys)):
            out.append(keys[i])
            prefix = tuple(keys[: i + 1])
            is_last = i == len(keys) - 1
            if prefix in counts and not (is_last and last_is_array):
                out.append(counts[prefix] - 1)
        return tuple(out)

    def line(self, path: Path) -> int | None:
        """The line of ``path``, or of its nearest enclosing key or table."""
        for n in range(len(path), 0, -1):
            found = self._lines.get(path[:n])
            if found is not None:
                return found
        return None


def dotted(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


class Problems:
    """Collects every mistake in a config document, each with its line, so one run shows them all."""

    def __init__(self, source: str, lines: LineMap | None) -> None:
        self.source = source
        self._lines = lines
        self.items: list[str] = []

    def add(self, path: Path, message: str) -> None:
        line = self._lines.line(path) if self._lines is not None else None
        where = f"line {line}: " if line is not None else ""
        self.items.append(f"{where}{dotted(path)}: {message}")

    def __bool__(self) -> bool:
        return bool(self.items)
