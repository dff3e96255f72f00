"""The network-namespace lab: real nodes and pods built from namespaces and veths.

One topology builder shared by the netns tests, ``veil demo`` and perf/. See
:mod:`lab.topology` for the layout, :mod:`lab.tproxy` for the
nftables TPROXY steering used before the eBPF redirection,
:mod:`lab.capture` for watching what crosses the underlay and
:mod:`lab.apps` for the echo/whoami/sink/source workloads.
"""

from lab.capture import UnderlayCapture
from lab.errors import LabError
from lab.netns import in_netns
from lab.owner import cleanup_stale
from lab.process import LabProcess, wait_listening
from lab.topology import DEFAULT_CONTROLLER_IP, POD_GATEWAY, LabNode, LabPod, Topology
from lab.tproxy import disable_tproxy, enable_tproxy

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
