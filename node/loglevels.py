"""Runtime log levels for node processes (``veilctl log --level proxy=debug``).

The agent (status socket) and the ztunnel (admin API) both expose their log
levels; this module owns the spec syntax and the mapping from component names
to Python loggers, so both speak the same language:

- ``LEVEL`` alone sets the process default (the root logger);
- ``COMPONENT=LEVEL[,COMPONENT=LEVEL...]`` sets named components, where a
  component is ``access`` (the access log), ``default``, a short name under the
  process's own prefix (``proxy`` in the ztunnel is ``veil.ztunnel.proxy``) or a
  full ``veil.*`` logger name.

Levels: debug, info, warning, error, critical, and ``off``. Changes last until
the process restarts; the startup ``--log-level`` is the baseline.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from .errors import NodeError

__all__ = [
    "LEVELS",
    "LogLevelError",
    "apply_levels",
    "current_levels",
    "logger_name",
    "parse_level_spec",
]

LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    # Above CRITICAL: nothing passes, not even the access log.
    "off": logging.CRITICAL + 10,
}
_NAMES = {v: k for k, v in LEVELS.items()}
_DEFAULT = ("default", "all", "root", "*")


class LogLevelError(NodeError):
    """A log level spec that does not parse."""


def parse_level_spec(spec: str) -> list[tuple[str, str]]:
    """``"proxy=debug,access=off"`` -> ``[("proxy", "debug"), ("access", "off")]``."""
    pairs: list[tuple[str, str]] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        component, sep, level = part.rpartition("=")
        if not sep:
            component, level = "default", part
        component, level = component.strip(), level.strip().lower()
        if level not in LEVELS:
            raise LogLevelError(
                f"unknown log level {level!r} in {spec!r}",
                hint=f"use one of {', '.join(LEVELS)}, e.g. --level proxy=debug",
            )
        if not component or any(c.isspace() for c in component):
            raise LogLevelError(
                f"invalid component {component!r} in {spec!r}",
                hint="write COMPONENT=LEVEL, e.g. proxy=debug or access=off",
            )
        pairs.append((component, level))
    if not pairs:
        raise LogLevelError("empty log level spec", hint="e.g. --level debug or proxy=debug")
    return pairs


def logger_name(component: str, prefix: str) -> str:
    """The Python logger behind ``component`` ("" is the root logger)."""
    if component in _DEFAULT:
        return ""
    if component == "access":
        return "veil.access"
    if component == "veil" or component.startswith("veil."):
        return component
    return f"{prefix}.{component}"


def apply_levels(pairs: list[tuple[str, str]], prefix: str) -> dict[str, str]:
    """Sets each component's level; returns ``{logger: level}`` as applied."""
    applied: dict[str, str] = {}
    for component, level in pairs:
        name = logger_name(component, prefix)
        logging.getLogger(name or None).setLevel(LEVELS[level])
        applied[name or "default"] = level
    return applied


def _name(level: int) -> str:
    return _NAMES.get(level, logging.getLevelName(level).lower())


def current_levels() -> dict[str, object]:
    """The default level and every ``veil.*`` logger with a level of its own."""
    components: dict[str, str] = {}
    for name, logger in sorted(logging.root.manager.loggerDict.items()):
        if not name.startswith("veil") or not isinstance(logger, logging.Logger):
            continue
        if logger.level != logging.NOTSET:
            components[name] = _name(logger.level)
    return {"default": _name(logging.getLogger().level), "components": components}
