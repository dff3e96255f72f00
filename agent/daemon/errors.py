"""Errors of the node agent daemon (config, startup, status), below :class:`AgentError`."""

from __future__ import annotations

from agent.errors import AgentError

__all__ = ["AgentConfigError", "AgentStartupError"]


class AgentConfigError(AgentError):
    """A flag or ``VEIL_*`` variable has a value the agent cannot use."""


class AgentStartupError(AgentError):
    """The agent could not start: preflight, loading the programs, credentials, uplink."""
