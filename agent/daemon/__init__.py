"""The node agent daemon: keeps this node's pods enrolled in the data plane.

* :mod:`agent.daemon.config`: :class:`AgentConfig` from flags and ``VEIL_*`` variables;
* :mod:`agent.daemon.reconcile`: the pure enrollment planner (:func:`plan`);
* :mod:`agent.daemon.audit`: the pure node audit behind ``veilctl verify``;
* :mod:`agent.daemon.agent`: the process (``AgentDaemon``, ``run_agent``), imported
  on demand because it pulls in gRPC and aiohttp;
* :mod:`agent.daemon.loader`, :mod:`agent.daemon.identity`, :mod:`agent.daemon.netinfo`,
  :mod:`agent.daemon.startup`, :mod:`agent.daemon.uninstall`,
  :mod:`agent.daemon.views`: its parts.
"""

from agent.daemon.audit import AuditInput, AuditReport, Finding, Listener, audit
from agent.daemon.config import AgentConfig, config_from_args
from agent.daemon.errors import AgentConfigError, AgentStartupError
from agent.daemon.reconcile import (
    Action,
    AwaitVeth,
    DesiredPod,
    Enroll,
    MarkLocal,
    Refresh,
    Unenroll,
    VethLookup,
    desired_pods,
    plan,
)

__all__ = [
    "Action",
    "AgentConfig",
    "AgentConfigError",
    "AgentStartupError",
    "AuditInput",
    "AuditReport",
    "AwaitVeth",
    "DesiredPod",
    "Enroll",
    "Finding",
    "Listener",
    "MarkLocal",
    "Refresh",
    "Unenroll",
    "VethLookup",
    "audit",
    "config_from_args",
    "desired_pods",
    "plan",
]
