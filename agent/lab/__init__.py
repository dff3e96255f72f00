"""The network-namespace lab: real nodes and pods built from namespaces and veths.

One topology builder shared by the netns tests, ``veil demo`` and perf/. See
:mod:`agent.lab.topology` for the layout, :mod:`agent.lab.tproxy` for the
nftables TPROXY steering used before the eBPF redirection,
:mod:`agent.lab.capture` for watching what crosses the underlay and
:mod:`agent.lab.apps` for the echo/whoami/sink/source workloads.
"""

from agent.lab.capture import UnderlayCapture
from agent.lab.errors import LabError
from agent.lab.netns import in_netns
from agent.lab.owner import cleanup_stale
from agent.lab.process import LabProcess, wait_listening
from agent.lab.topology import DEFAULT_CONTROLLER_IP, POD_GATEWAY, LabNode, LabPod, Topology
from agent.lab.tproxy import disable_tproxy, enable_tproxy

__all__ = [
    "DEFAULT_CONTROLLER_IP",
    "POD_GATEWAY",
    "LabError",
    "LabNode",
    "LabPod",
    "LabProcess",
    "Topology",
    "UnderlayCapture",
    "cleanup_stale",
    "disable_tproxy",
    "enable_tproxy",
    "in_netns",
    "wait_listening",
]
