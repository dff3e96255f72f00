"""Kernel networking the agent drives through rtnetlink (pyroute2): tc, policy routing, veths.

Every function takes an open ``IPRoute``; the socket belongs to the network
namespace it was created in, so callers pick the node's namespace once, when
they open it, and can then call from any thread.
"""

from agent.net.routing import (
    PolicyRouting,
    ensure_policy_routing,
    policy_routing,
    remove_policy_routing,
)
from agent.net.tc import TC_HANDLE, TC_PRIORITY, TcFilter, attach_bpf, detach_bpf, list_bpf_filters
from agent.net.veth import HostInterface, host_interface, host_interface_for_ip

__all__ = [
    "TC_HANDLE",
    "TC_PRIORITY",
    "HostInterface",
    "PolicyRouting",
    "TcFilter",
    "attach_bpf",
    "detach_bpf",
    "ensure_policy_routing",
    "host_interface",
    "host_interface_for_ip",
    "list_bpf_filters",
    "policy_routing",
    "remove_policy_routing",
]
