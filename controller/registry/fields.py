"""Field-level reading and validation of untrusted registry input.

Registry documents come from people (the YAML file) and from the Kubernetes API.
:class:`Fields` reads one mapping, rejects unknown fields with the list of the
allowed ones, and turns every problem into a :class:`RegistryError` that names
the object and the full field path (``spec.rules[0].from[1].source.ipBlocks[2]``).
The ``check_*`` functions validate single values and return them normalised; they
raise :class:`Invalid`, which :class:`Fields` (or a caller) attaches to a field.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NoReturn, TypeVar

from controller.api.model import Labels
from controller.api.spiffe import InvalidSpiffeId, SpiffeId

from .errors import RegistryError

__all__ = [
    "Fields",
    "Invalid",
    "check_cidr",
    "check_dns1035_label",
    "check_dns1123_label",
    "check_dns1123_subdomain",
    "check_ip",
    "check_label_key",
    "check_label_value",
    "check_namespace_pattern",
    "check_port",
    "check_principal",
    "show",
]

T = TypeVar("T")

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_NAME_HINT = "use lowercase letters, digits and '-', starting and ending with a letter or digit"


class Invalid(Exception):
    """A single value is invalid; the caller knows which field it came from."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def show(value: object) -> str:
    """A value as the user wrote it: strings in double quotes, other types named."""
    if isinstance(value, str):
        return json.dumps(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, int | float):
        return f"{value} (a number)"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


def _need_str(value: object) -> str:
    if not isinstance(value, str):
        raise Invalid(f"expected a string, got {show(value)}", "quote the value in YAML")
    return value


def check_dns1123_label(value: object) -> str:
    """Namespace names: at most 63 characters, ``[a-z0-9-]``."""
    s = _need_str(value)
    if not s or len(s) > 63 or not _DNS1123_LABEL.match(s):
        raise Invalid(
            f"{show(s)} is not a valid DNS-1123 label (at most 63 characters)", _NAME_HINT
        )
    return s


def check_dns1123_subdomain(value: object) -> str:
    """Pod, service account, node and policy names: at most 253 characters, dots allowed."""
    s = _need_str(value)
    if not s or len(s) > 253 or not _DNS1123_SUBDOMAIN.match(s):
        raise Invalid(
            f"{show(s)} is not a valid DNS-1123 subdomain (at most 253 characters)",
            _NAME_HINT + "; '.' separates parts",
        )
    return s


def check_dns1035_label(value: object) -> str:
    """Service names: at most 63 characters and starting with a letter."""
    s = _need_str(value)
    if not s or len(s) > 63 or not _DNS1035_LABEL.match(s):
        raise Invalid(
            f"{show(s)} is not a valid DNS-1035 label (at most 63 characters)",
            "Service names start with a lowercase letter; " + _NAME_HINT,
        )
    return s


def check_ip(value: object) -> str:
    """An IPv4 or IPv6 address, returned in canonical form."""
    s = _need_str(value)
    try:
        return str(ipaddress.ip_address(s))
    except ValueError:
        raise Invalid(
            f"{show(s)} is not an IP address", "write e.g. 10.244.1.10 or fd00::10"
        ) from None


def check_cidr(value: object) -> str:
    """An IP block: a CIDR or a single address, returned as a normalised network.

    Host bits are cleared, as Istio does (``10.1.2.3/24`` is ``10.1.2.0/24``), and a
    bare address becomes a /32 or /128, so the policy engine sees one form only.
    """
    s = _need_str(value)
    try:
        return str(ipaddress.ip_network(s, strict=False))
    except ValueError:
        raise Invalid(
            f"{show(s)} is not a CIDR or IP address", "write e.g. 10.244.0.0/16 or 10.244.1.10"
        ) from None


def check_port(value: object) -> int:
    """A TCP port 1-65535. Numeric strings are accepted (Istio writes ports as strings)."""
    if isinstance(value, bool):
        raise Invalid(f"expected a port number, got {show(value)}")
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 5:
        value = int(value)
    if not isinstance(value, int):
        raise Invalid(f"expected a port number 1-65535, got {show(value)}")
    if not 1 <= value <= 65535:
        raise Invalid(f"port {value} is out of range", "ports are 1-65535")
    return value


def check_label_key(value: object) -> str:
    """A Kubernetes label key: ``[prefix/]name`` with a DNS subdomain prefix."""
    s = _need_str(value)
    prefix, slash, name = s.rpartition("/")
    ok = bool(name) and len(name) <= 63 and _LABEL_NAME.match(name) is not None
    if slash:
        ok = (
            ok
            and bool(prefix)
            and len(prefix) <= 253
            and _DNS1123_SUBDOMAIN.match(prefix) is not None
        )
    if not ok:
        raise Invalid(
            f"{show(s)} is not a valid label key",
            "label keys are [prefix/]name: name at most 63 characters of letters, digits, "
            "'-', '_' and '.'; prefix a DNS subdomain",
        )
    return s


def check_label_value(value: object) -> str:
    """A Kubernetes label value: empty, or at most 63 characters."""
    s = _need_str(value)
    if s and (len(s) > 63 or not _LABEL_NAME.match(s)):
        raise Invalid(
            f"{show(s)} is not a valid label value",
            "label values are at most 63 letters, digits, '-', '_' and '.'",
        )
    return s


_PRINCIPAL_FORM = "<trust-domain>/ns/<namespace>/sa/<service-account>"
_PRINCIPAL_HINT = (
    f"write {_PRINCIPAL_FORM} (e.g. cluster.local/ns/shop/sa/checkout), optionally with "
    "spiffe:// in front; Istio's wildcards are '*', 'prefix*' and '*suffix'"
)
_TD_CHARS = re.compile(r"^[a-z0-9._-]*$")
_NS_CHARS = re.compile(r"^[a-z0-9-]*$")
_SA_CHARS = re.compile(r"^[a-z0-9.-]*$")
# The five segments of a workload principal: (name in messages, literal or None,
# characters allowed, full-segment check).
_SEGMENTS: tuple[tuple[str, str | None, re.Pattern[str], re.Pattern[str] | None], ...] = (
    ("the trust domain", None, _TD_CHARS, re.compile(r"^[a-z0-9._-]{1,255}$")),
    ('"ns"', "ns", _NS_CHARS, None),
    ("the namespace", None, _NS_CHARS, _DNS1123_LABEL),
    ('"sa"', "sa", _SA_CHARS, None),
    ("the service account", None, _SA_CHARS, _DNS1123_SUBDOMAIN),
)


def _segment_problem(index: int, text: str, part: str) -> str | None:
    """Why ``text`` cannot be segment ``index`` (``part``: "full", "prefix" or "suffix")."""
    what, literal, chars, full = _SEGMENTS[index]
    if literal is not None:
        ok = {
            "full": text == literal,
            "prefix": literal.startswith(text),
            "suffix": literal.endswith(text),
        }[part]
        return None if ok else f"{show(text)} stands where {what} belongs"
    if not chars.match(text):
        return f"{what} {show(text)} has characters outside lowercase letters, digits" + (
            ", '.', '-' and '_'" if index == 0 else (", '-'" if index == 2 else ", '.' and '-'")
        )
    if part == "full":
        limit = 255 if index == 0 else (63 if index == 2 else 253)
        if full is not None and (not full.match(text) or len(text) > limit):
            return f"{what} {show(text)} is not a valid name"
    return None


def _principal_problem(body: str) -> str | None:
    """Why ``body`` (a principal without ``spiffe://``) can match no workload identity.

    Exact principals must have all five segments; ``prefix*`` and ``*suffix``
    must be the start or the end of such a principal (a prefix may stop inside
    a segment, e.g. ``cluster.local/ns/shop-*``). Only the shape is checked, so
    matching stays a plain string test in the policy engine.
    """
    if body == "*":
        return None
    stars = body.count("*")
    if stars > 1 or (stars == 1 and not (body.startswith("*") or body.endswith("*"))):
        return (
            "'*' may only be the whole value or its first or last character "
            "(Istio matches principals by exact value, prefix or suffix, never by pattern)"
        )
    if body.endswith("*"):
        parts, part = body[:-1].split("/"), "prefix"
        indexed = list(enumerate(parts))
    elif body.startswith("*"):
        parts, part = body[1:].split("/"), "suffix"
        indexed = [(len(_SEGMENTS) - len(parts) + i, p) for i, p in enumerate(parts)]
    else:
        parts, part = body.split("/"), "full"
        indexed = list(enumerate(parts))
    if len(parts) > len(_SEGMENTS) or (part == "full" and len(parts) != len(_SEGMENTS)):
        return f"has {len(parts)} '/'-separated segments; a workload principal has 5"
    for n, (index, text) in enumerate(indexed):
        # The partial segment of a prefix is its last, of a suffix its first.
        partial = (part == "prefix" and n == len(indexed) - 1) or (part == "suffix" and n == 0)
        problem = _segment_problem(index, text, part if partial else "full")
        if problem is not None:
            return problem
    return None


def check_principal(value: object) -> str:
    """A principal, kept as written: an exact workload identity or an Istio wildcard.

    Exact: ``cluster.local/ns/shop/sa/checkout`` (Istio's form) or the full
    ``spiffe://`` ID. Wildcards are Istio's three plain string tests: ``*`` (any
    authenticated peer), ``prefix*`` and ``*suffix``, with one ``*`` at either
    end; the fixed part must be the start or end of a workload principal. Node
    identities (``<td>/veil/node/<name>``) and other SPIFFE paths are refused:
    only workload identities are peers, so such an entry would match nobody.
    """
    s = _need_str(value)
    body = s[len("spiffe://") :] if s.startswith("spiffe://") else s
    if not body:
        raise Invalid(f"{show(s)} is empty", _PRINCIPAL_HINT)
    problem = _principal_problem(body)
    if problem is None and "*" not in body:
        try:
            SpiffeId.parse(f"spiffe://{body}")
        except InvalidSpiffeId as e:
            problem = e.message
    if problem is not None:
        parts = body.split("/")
        if len(parts) == 4 and parts[1:3] == ["veil", "node"]:
            problem = "is a node identity; only workload identities are peers on HBONE"
        raise Invalid(f"{show(s)} is not a workload principal: {problem}", _PRINCIPAL_HINT)
    return s


def check_namespace_pattern(value: object) -> str:
    """A namespace in a policy source: a name, or Istio's ``*``, ``prefix*``, ``*suffix``."""
    s = _need_str(value)
    if s == "*":
        return s
    stars = s.count("*")
    if stars == 0:
        return check_dns1123_label(s)
    hint = "write a namespace name, '*', 'prefix*' or '*suffix' (one '*', at either end)"
    if stars > 1 or not (s.startswith("*") or s.endswith("*")):
        raise Invalid(
            f"{show(s)}: '*' may only be the whole value or its first or last character", hint
        )
    fixed = s.strip("*")
    ok = _NS_CHARS.match(fixed) is not None and len(fixed) < 63
    ok = ok and not (s.endswith("*") and fixed.startswith("-"))
    ok = ok and not (s.startswith("*") and fixed.endswith("-"))
    if not ok:
        raise Invalid(f"{show(s)} cannot match any namespace name (DNS-1123 label)", hint)
    return s


class Fields:
    """One mapping read from untrusted input, with its location for error messages.

    ``where`` names the object (``workloads[3] (shop/checkout)``); ``path`` is the
    field path of this mapping inside it (``spec.rules[0]``), empty at the top.
    ``unsupported`` maps known-but-unsupported field names to the reason, so a
    user who writes an L7 Istio field learns why it is refused.
    """

    def __init__(
        self,
        raw: object,
        where: str,
        allowed: Sequence[str],
        *,
        path: str = "",
        unsupported: Mapping[str, str] | None = None,
    ) -> None:
        self.where = where
        self.path = path
        if not isinstance(raw, Mapping):
            self._fail_at(path, f"expected a mapping, got {show(raw)}")
        self._raw: Mapping[object, object] = raw
        for key in raw:
            if key in allowed:
                continue
            reason = (unsupported or {}).get(key) if isinstance(key, str) else None
            if reason is not None:
                self._fail_at(self.field(str(key)), f"is not supported: {reason}")
            self._fail_at(
                self.field(str(key)),
                "unknown field",
                hint=f"allowed fields here: {', '.join(allowed)}",
            )

    def field(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def _fail_at(self, field: str, message: str, hint: str | None = None) -> NoReturn:
        raise RegistryError(message, hint=hint, where=self.where, field=field)

    def fail(self, name: str, message: str, hint: str | None = None) -> NoReturn:
        """Raises a RegistryError for field ``name`` of this mapping."""
        self._fail_at(self.field(name), message, hint)

    def has(self, name: str) -> bool:
        return self._raw.get(name) is not None

    def present(self, name: str) -> bool:
        """The field is written, even as null (``workloads:``)."""
        return name in self._raw

    def raw(self, name: str) -> object:
        return self._raw.get(name)

    def value(self, name: str, check: Callable[[object], T], default: T | None = None) -> T:
        """The checked value of field ``name``; required unless ``default`` is given."""
        raw = self._raw.get(name)
        if raw is None:
            if default is not None:
                return default
            self.fail(name, "is required")
        try:
            return check(raw)
        except Invalid as e:
            self.fail(name, e.message, e.hint)

    def text(self, name: str, default: str | None = None) -> str:
        return self.value(name, _need_str, default)

    def flag(self, name: str, default: bool) -> bool:
        raw = self._raw.get(name)
        if raw is None:
            return default
        if not isinstance(raw, bool):
            self.fail(name, f"expected true or false, got {show(raw)}")
        return raw

    def items(self, name: str, *, required: bool = False) -> Iterator[tuple[str, object]]:
        """``(field path, item)`` for each entry of list field ``name``."""
        raw = self._raw.get(name)
        if raw is None:
            if required:
                self.fail(name, "is required")
            return
        if not isinstance(raw, list):
            self.fail(name, f"expected a list, got {show(raw)}")
        if required and not raw:
            self.fail(name, "must list at least one entry")
        for i, item in enumerate(raw):
            yield f"{self.field(name)}[{i}]", item

    def values(
        self, name: str, check: Callable[[object], T], *, required: bool = False
    ) -> tuple[T, ...]:
        """A list field whose entries are each checked by ``check``."""
        out: list[T] = []
        for path, item in self.items(name, required=required):
            try:
                out.append(check(item))
            except Invalid as e:
                self._fail_at(path, e.message, e.hint)
        return tuple(out)

    def child(
        self,
        name: str,
        allowed: Sequence[str],
        *,
        unsupported: Mapping[str, str] | None = None,
    ) -> Fields | None:
        """The nested mapping ``name``, or None when absent."""
        raw = self._raw.get(name)
        if raw is None:
            return None
        return Fields(raw, self.where, allowed, path=self.field(name), unsupported=unsupported)

    def labels(self, name: str) -> Labels:
        """A ``{key: value}`` mapping of Kubernetes labels (or a selector's matchLabels)."""
        raw = self._raw.get(name)
        if raw is None:
            return Labels()
        if not isinstance(raw, Mapping):
            self.fail(name, f"expected a mapping of labels, got {show(raw)}")
        pairs: list[tuple[str, str]] = []
        for key, val in raw.items():
            try:
                k = check_label_key(key)
            except Invalid as e:
                self.fail(name, e.message, e.hint)
            try:
                pairs.append((k, check_label_value(val)))
            except Invalid as e:
                self._fail_at(f"{self.field(name)}.{k}", e.message, e.hint)
        return Labels(pairs)
