"""The agent room's error family: everything the node agent raises on purpose.

Every error says what was wrong and what to do next (``hint``), so the CLI can
print it without a traceback. Kernel and library errors (OSError, pyroute2's
NetlinkError, bcc's bare ``Exception``) are translated at the boundary where
they happen; nothing above agent/bpf and agent/net sees them.
"""

from __future__ import annotations

from veil.errors import VeilError

__all__ = [
    "AgentError",
    "BpfError",
    "MapError",
    "NetlinkError",
    "PreflightError",
    "VethNotFoundError",
]


class AgentError(VeilError):
    """Root of the agent room's errors."""


class PreflightError(AgentError):
    """The node cannot run the data plane; ``problems`` lists each one with its fix."""

    def __init__(self, problems: tuple[str, ...], *, hint: str | None = None) -> None:
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"node preflight failed:\n{lines}", hint=hint)
        self.problems = problems


class BpfError(AgentError):
    """Compiling, loading or pinning a BPF program or map failed."""


class MapError(BpfError):
    """Reading or writing a pinned BPF map failed, or its layout is not the expected one."""


class NetlinkError(AgentError):
    """A tc, rule, route or link operation failed."""


class VethNotFoundError(AgentError):
    """No host-side interface leads to a pod address."""
