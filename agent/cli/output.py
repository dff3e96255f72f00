"""Rendering for veilctl: readable tables by default, stable JSON with ``-o json``.

JSON output is the data itself (lists of objects with fixed keys), sorted
deterministically, so scripts can rely on it across releases.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

__all__ = ["Column", "render", "render_kv"]


class Column:
    """A table column: header text and the key in each row mapping."""

    __slots__ = ("header", "key")

    def __init__(self, header: str, key: str) -> None:
        self.header = header
        self.key = key


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ",".join(_cell(v) for v in value) or "-"
    if isinstance(value, Mapping):
        return ",".join(f"{k}={_cell(v)}" for k, v in sorted(value.items())) or "-"
    return str(value)


def render(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[Column],
    fmt: str,
    out: TextIO | None = None,
    empty: str = "(none)",
) -> None:
    """Prints ``rows`` as a table (``fmt == "table"``) or as JSON."""
    out = out or sys.stdout
    if fmt == "json":
        json.dump(list(rows), out, indent=2, sort_keys=True, default=str)
        out.write("\n")
        return
    if not rows:
        out.write(empty + "\n")
        return
    cells = [[_cell(r.get(c.key)) for c in columns] for r in rows]
    widths = [max(len(c.header), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    out.write("  ".join(c.header.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip() + "\n")
    for row in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n")


def render_kv(data: Mapping[str, Any], fmt: str, out: TextIO | None = None) -> None:
    """Prints one object as aligned ``key: value`` lines, or as JSON."""
    out = out or sys.stdout
    if fmt == "json":
        json.dump(data, out, indent=2, sort_keys=True, default=str)
        out.write("\n")
        return
    width = max((len(k) for k in data), default=0)
    for k, v in data.items():
        out.write(f"{k.ljust(width)}  {_cell(v)}\n")
