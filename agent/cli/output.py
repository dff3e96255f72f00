"""Rendering for veilctl: readable tables by default, stable JSON or YAML on request.

JSON and YAML output is the data itself (lists of objects with fixed keys),
sorted deterministically, so scripts can rely on it across releases. Errors
follow the chosen format too: under ``-o json`` a failure prints one JSON
object on stdout, so a script reading stdout never has to parse prose.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import yaml

__all__ = [
    "EXIT_FINDINGS",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "FORMATS",
    "Column",
    "dump_data",
    "render",
    "render_error",
    "render_kv",
    "rfc3339",
]

# veilctl's exit codes: 0 all good, 1 findings or an error, 2 usage, 3 a
# component could not be reached.
EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

# Every format a veilctl command accepts with -o; "pem" only where certificates are shown.
FORMATS = ("table", "json", "yaml")


class Column:
    """A table column: header text and the key in each row mapping."""

    __slots__ = ("header", "key")

    def __init__(self, header: str, key: str) -> None:
        self.header = header
        self.key = key


def rfc3339(value: datetime | str | float | None) -> str | None:
    """One time format everywhere: RFC 3339 in UTC with a ``Z`` and whole seconds.

    Accepts a datetime, an ISO 8601 string (as the components serve them) or
    epoch seconds; anything unparsable is returned as given, never dropped.
    """
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        at = datetime.fromtimestamp(float(value), UTC)
    elif isinstance(value, datetime):
        at = value
    else:
        try:
            at = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return str(value)
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _plain(data: Any) -> Any:
    """JSON-compatible data (so YAML shows the same values as JSON)."""
    return json.loads(json.dumps(data, sort_keys=True, default=str))


def dump_data(data: Any, fmt: str, out: TextIO) -> None:
    """Writes ``data`` as JSON (indented, sorted keys) or YAML (block style)."""
    if fmt == "yaml":
        yaml.safe_dump(_plain(data), out, sort_keys=True, default_flow_style=False)
        return
    json.dump(data, out, indent=2, sort_keys=True, default=str)
    out.write("\n")


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
    """Prints ``rows`` as a table (``fmt == "table"``), or as JSON or YAML."""
    out = out or sys.stdout
    if fmt in ("json", "yaml"):
        dump_data(list(rows), fmt, out)
        return
    if not rows:
        out.write(empty + "\n")
        return
    cells = [[_cell(r.get(c.key)) for c in columns] for r in rows]
    widths = [max(len(c.header), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    out.write(
        "  ".join(c.header.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip() + "\n"
    )
    for row in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n")


def render_kv(data: Mapping[str, Any], fmt: str, out: TextIO | None = None) -> None:
    """Prints one object as aligned ``key: value`` lines, or as JSON or YAML."""
    out = out or sys.stdout
    if fmt in ("json", "yaml"):
        dump_data(data, fmt, out)
        return
    width = max((len(k) for k in data), default=0)
    for k, v in data.items():
        out.write(f"{k.ljust(width)}  {_cell(v)}\n")


def render_error(
    fmt: str,
    message: str,
    *,
    hint: str | None,
    exit_code: int,
    component: str | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> None:
    """Reports a failure: a JSON/YAML object on stdout under ``-o json|yaml``,
    else ``error:``/``hint:`` lines on stderr."""
    if fmt in ("json", "yaml"):
        doc: dict[str, Any] = {"error": {"message": message, "hint": hint, "exit_code": exit_code}}
        if component is not None:
            doc["error"]["component"] = component
        dump_data(doc, fmt, out or sys.stdout)
        return
    stream = err or sys.stderr
    prefix = f"{component} unreachable: " if component else ""
    print(f"error: {prefix}{message}", file=stream)
    if hint:
        print(f"  hint: {hint}", file=stream)
