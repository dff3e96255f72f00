"""Declarative settings: one flag and one ``VEIL_*`` variable per config field.

The controller, agent and ztunnel each build one frozen Config from a table of
:class:`Setting` rows. This module holds the shared mechanics: adding the flags
to a parser, and resolving each field with the precedence flag, then
environment variable, then the Config's own default. A value that does not
parse raises the room's error type naming the flag or variable that carried it.

Every flag's help shows a typed metavar (DURATION, HOST:PORT, PATH, PORT, ...)
inferred from its parser unless the row names one, and the default when the
caller passes the Config's defaults (:func:`dataclass_defaults`); durations
are shown the way a user writes them (``25s``, ``24h``), never as seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from .errors import VeilError

__all__ = [
    "Setting",
    "add_setting_arguments",
    "dataclass_defaults",
    "finish_help",
    "format_duration",
    "metavar_for",
    "resolve_settings",
]


@dataclass(frozen=True, slots=True)
class Setting:
    field: str
    flag: str
    env: str
    parse: Callable[[str], Any]
    help: str
    is_switch: bool = False
    metavar: str | None = None


def format_duration(value: float | timedelta) -> str:
    """``90`` -> ``1m30s``, ``86400`` -> ``24h``, ``0.5`` -> ``500ms``: as a user writes it."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds < 1 and seconds != 0:
        return f"{seconds * 1000:g}ms"
    whole = int(seconds)
    if whole != seconds:
        return f"{seconds:g}s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        n, whole = divmod(whole, size)
        if n:
            parts.append(f"{n}{unit}")
    text = "".join(parts) or "0s"
    # 24h reads better than 1d for certificate lifetimes, and is what we document.
    return "24h" if text == "1d" else text


def metavar_for(s: Setting) -> str:
    """A typed metavar: the row's own, else one inferred from its parser and field."""
    if s.metavar:
        return s.metavar
    name = getattr(s.parse, "__name__", "").lower()
    field = s.field.lower()
    if "duration" in name or field.endswith(("_ttl", "_timeout", "_interval", "_period")):
        return "DURATION"
    if field == "listen_address":  # an IP only: the listeners have their own ports
        return "ADDRESS"
    if "host_port" in name or field.endswith("_address") or "listen" in field:
        return "HOST:PORT"
    if "path" in name or field.endswith(("_dir", "_socket", "_file")):
        return "PATH"
    if name.endswith("port") or field.endswith("_port"):
        return "PORT"
    if "ip" in name:
        return "IP"
    if "bool" in name:
        return "BOOL"
    if s.parse is int or name.endswith("int"):
        return "N"
    if s.parse is float:
        return "NUMBER"
    if field in ("node", "node_name"):
        return "NAME"
    return field.upper()


def dataclass_defaults(cls: type) -> dict[str, Any]:
    """``field -> default`` of a Config dataclass (fields without one are left out)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _default_text(value: Any, metavar: str) -> str | None:
    if value is None or value == "" or value == () or value is False:
        return None
    if metavar == "DURATION" and isinstance(value, (int, float, timedelta)):
        return format_duration(value)
    if metavar == "HOST:PORT" and isinstance(value, tuple) and len(value) == 2:
        host = str(value[0])
        return f"[{host}]:{value[1]}" if ":" in host else f"{host}:{value[1]}"
    if isinstance(value, Path):
        return str(value)
    if value is True:
        return "on"
    return str(value)


def add_setting_arguments(
    parser: argparse.ArgumentParser,
    settings: Iterable[Setting],
    *,
    skip: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """One flag per setting; flags default to unset so the environment can apply.

    ``defaults`` (usually :func:`dataclass_defaults` of the Config) puts each
    field's default in its help text.
    """
    skipped = set(skip)
    for s in settings:
        if s.field in skipped:
            continue
        metavar = metavar_for(s)
        shown = _default_text((defaults or {}).get(s.field), metavar)
        suffix = f" (default: {shown}; env {s.env})" if shown else f" (env {s.env})"
        if s.is_switch:
            parser.add_argument(
                s.flag,
                dest=s.field,
                action="store_const",
                const="1",
                default=None,
                help=f"{s.help} (env {s.env})",
            )
        else:
            parser.add_argument(
                s.flag, dest=s.field, default=None, metavar=metavar, help=s.help + suffix
            )


def resolve_settings(
    settings: Iterable[Setting],
    args: argparse.Namespace | Mapping[str, Any] | None,
    environ: Mapping[str, str],
    error: type[VeilError],
) -> dict[str, Any]:
    """Field values given by flags or environment; absent fields are left out.

    ``args`` values may be strings (parsed here) or already-typed values.
    """
    given: Mapping[str, Any]
    if args is None:
        given = {}
    elif isinstance(args, argparse.Namespace):
        given = vars(args)
    else:
        given = args
    values: dict[str, Any] = {}
    for s in settings:
        raw = given.get(s.field)
        origin = s.flag
        if raw is None and s.env in environ:
            raw, origin = environ[s.env], s.env
        if raw is None:
            continue
        if isinstance(raw, str):
            try:
                values[s.field] = s.parse(raw)
            except ValueError as e:
                raise error(f"invalid {origin}: {e}", hint=f"{s.flag}: {s.help}") from None
        else:
            values[s.field] = raw
    return values


def _flag_metavar(action: argparse.Action) -> str | None:
    """A typed metavar for a hand-written flag, from its name and type."""
    name = action.dest.lower()
    kind = getattr(action.type, "__name__", "") if action.type is not None else ""
    probe = Setting(name, "", "", action.type if callable(action.type) else str, "")
    if action.type is float and ("timeout" in name or "interval" in name):
        return "SECONDS"
    if "duration" in kind.lower() or name in ("ttl", "timeout", "interval"):
        return "DURATION"
    if name in ("controller", "controller_mtls", "controller_address", "listen", "join_listen"):
        return "HOST:PORT"
    if name.endswith(("_dir", "_file", "_out", "_socket", "registry")) or kind in ("Path", "_path"):
        return "PATH"
    if name in ("node", "node_name"):
        return "NAME"
    inferred = metavar_for(probe)
    return inferred if inferred != name.upper() else None


def finish_help(parser: argparse.ArgumentParser) -> None:
    """Gives every option of ``parser`` and its subcommands a typed metavar and
    shows its default in the help, where a flag was written without them.

    Called once on the assembled ``veil`` parser, so each room's flags follow
    the same rules without repeating them.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                finish_help(sub)
            continue
        if not action.option_strings or action.nargs == 0 or action.help == argparse.SUPPRESS:
            continue
        if action.metavar in (None, "VALUE") and action.choices is None:
            typed = _flag_metavar(action)
            if typed is not None:
                action.metavar = typed
        text = action.help or ""
        default = action.default
        if (
            default not in (None, "", False, argparse.SUPPRESS)
            and "default" not in text
            and not isinstance(default, (list, tuple))
        ):
            shown = format_duration(default) if isinstance(default, timedelta) else str(default)
            if isinstance(default, float) and action.metavar == "SECONDS":
                shown = f"{default:g}"
            action.help = f"{text} (default: {shown})" if text else f"default: {shown}"
