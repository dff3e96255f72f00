"""HTTP request-target normalisation before L7 policy matching (pure).

A path rule is only as good as the path it is matched against: ``/./admin``,
``//admin`` and ``/%61dmin`` all reach ``/admin`` on a typical backend, so a
DENY on ``/admin*`` must see them as ``/admin``. The waypoint normalises the
path, matches the normalised form and forwards the normalised form, so the
backend serves exactly the path that was authorized.

What :func:`normalize_target` does, in order (Istio's default normalisation
plus merged slashes, and stricter where a backend could disagree with us):

1. splits off the query (kept as is; policies match the path alone);
2. refuses what no origin-form target contains: no leading ``/``, a ``#``,
   a raw ``\\``, control characters, spaces, non-ASCII;
3. percent-decodes the RFC 3986 *unreserved* characters (``%61`` -> ``a``,
   ``%2E`` -> ``.``), upper-cases the hex of every other escape, and refuses
   an encoded ``/`` or ``\\`` (``%2F``, ``%5C``): a backend that decodes them
   would see another path than the one authorized;
4. merges runs of ``/``;
5. removes dot segments (RFC 3986 section 5.2.4): ``/a/./b/../c`` -> ``/a/c``;
   ``..`` above the root stays at the root;
6. refuses a dot segment carrying path parameters (``..;``, ``.;x``): Java
   servlet containers treat ``/public/..;/admin`` as ``/admin`` while RFC
   3986 says it is a literal segment, and the two must never disagree.

Case is kept: paths match case-sensitively, as in Istio (``/ADMIN`` does
not match ``/admin*``). A backend that treats paths case-insensitively needs
policies written for every case it accepts; docs/waypoint.md says so.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BadPath", "NormalizedTarget", "normalize_path", "normalize_target"]

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
_ENCODED_SLASHES = frozenset({"2F", "5C"})
MAX_TARGET = 8192


class BadPath(ValueError):
    """A request target the waypoint answers with 400; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class NormalizedTarget:
    path: str  # normalised, what policies match and the backend receives
    query: str  # without the "?", "" when absent

    @property
    def target(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


def _decode(path: str) -> str:
    out: list[str] = []
    i = 0
    n = len(path)
    while i < n:
        c = path[i]
        if c == "%":
            hx = path[i + 1 : i + 3]
            if len(hx) != 2 or hx[0] not in _HEX or hx[1] not in _HEX:
                raise BadPath(f"malformed percent-encoding at offset {i}")
            hx = hx.upper()
            if hx in _ENCODED_SLASHES:
                raise BadPath(f"encoded {'/' if hx == '2F' else chr(92)} (%{hx}) in the path")
            ch = chr(int(hx, 16))
            out.append(ch if ch in _UNRESERVED else f"%{hx}")
            i += 3
            continue
        if c == "\\":
            raise BadPath("backslash in the path")
        if ord(c) <= 0x20 or ord(c) >= 0x7F:
            raise BadPath(f"character {c!r} is not allowed in a path")
        out.append(c)
        i += 1
    return "".join(out)


def _remove_dots(path: str) -> str:
    segments = path.split("/")[1:]
    stack: list[str] = []
    trailing = False
    for seg in segments:
        base = seg.split(";", 1)[0]
        if base in (".", "..") and base != seg:
            raise BadPath(f"dot segment with parameters ({seg!r})")
        if seg == ".":
            trailing = True
        elif seg == "..":
            if stack:
                stack.pop()
            trailing = True
        else:
            stack.append(seg)
            trailing = False
    out = "/" + "/".join(stack)
    if trailing and not out.endswith("/"):
        out += "/"
    return out


def normalize_path(path: str) -> str:
    """The normalised form of an origin-form path (no query); raises BadPath."""
    if not path.startswith("/"):
        raise BadPath("the path must start with '/'")
    decoded = _decode(path)
    while "//" in decoded:
        decoded = decoded.replace("//", "/")
    return _remove_dots(decoded)


def normalize_target(target: str) -> NormalizedTarget:
    """Splits and normalises an origin-form request target (``/p?q``); raises BadPath."""
    if len(target) > MAX_TARGET:
        raise BadPath(f"request target longer than {MAX_TARGET} bytes")
    if "#" in target:
        raise BadPath("fragment ('#') in the request target")
    path, _, query = target.partition("?")
    for c in query:
        if c == "\\" or ord(c) <= 0x20 or ord(c) >= 0x7F:
            raise BadPath(f"character {c!r} is not allowed in a query")
    return NormalizedTarget(normalize_path(path), query)
