"""Declarative settings: one flag and one ``VEIL_*`` variable per config field.

The controller, agent and ztunnel each build one frozen Config from a table of
:class:`Setting` rows. This module holds the shared mechanics: adding the flags
to a parser, and resolving each field with the precedence flag, then
environment variable, then the Config's own default. A value that does not
parse raises the room's error type naming the flag or variable that carried it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import VeilError

__all__ = ["Setting", "add_setting_arguments", "resolve_settings"]


@dataclass(frozen=True, slots=True)
class Setting:
    field: str
    flag: str
    env: str
    parse: Callable[[str], Any]
    help: str
    is_switch: bool = False


def add_setting_arguments(
    parser: argparse.ArgumentParser, settings: Iterable[Setting], *, skip: Iterable[str] = ()
) -> None:
    """One flag per setting; flags default to unset so the environment can apply."""
    skipped = set(skip)
    for s in settings:
        if s.field in skipped:
            continue
        if s.is_switch:
            parser.add_argument(
                s.flag, dest=s.field, action="store_const", const="1", default=None,
                help=f"{s.help} (env {s.env})",
            )
        else:
            parser.add_argument(
                s.flag, dest=s.field, default=None, metavar="VALUE", help=f"{s.help} (env {s.env})"
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
