"""The ztunnel's proxy: the 15001 / 15006 / 15008 listeners and what they relay.

* :mod:`.route` (15001) and :mod:`.decide` (15008, 15006): the pure
  per-connection decisions, each returning a small frozen value;
* :mod:`.outbound` (15001), :mod:`.inbound` (15008, HBONE) and :mod:`.plaintext`
  (15006): one ``handle(sock)`` each, acting on the decision (I/O only);
* :mod:`.sockets`: transparent listeners, marked (and optionally transparent)
  upstream and pod sockets, original destination, RST close;
* :mod:`.relay`: the plaintext TCP-to-TCP relay (same node, 15006, passthrough)
  and the one result type every relay reports, in client terms;
* :mod:`.connections`: the registry of live connections (admin dump, policy
  re-check, drain); :mod:`.context`: what the listeners share, and the
  register / count / log bookkeeping;
* :mod:`.listener`: the accept loop.

:class:`ztunnel.app.Ztunnel` wires these to the state store, certificates,
HBONE pool and server, and the operations endpoints.
"""

from .connections import ConnectionInfo, ConnectionRegistry, Direction, LiveConnection
from .context import ProxyContext, proxied, refuse
from .decide import (
    Admit,
    InboundDecision,
    InboundSource,
    PlaintextDecision,
    Reject,
    decide_inbound,
    decide_plaintext,
    inbound_source,
)
from .errors import ListenerError, NoRouteError, ProxyError, TunnelError, UpstreamConnectError
from .inbound import InboundProxy
from .listener import ConnectionHandler, Listener
from .outbound import OutboundProxy
from .plaintext import PlaintextProxy
from .relay import ByteCounters, Counters, RelayResult, TunnelCounters, relay_sockets, tunnel_result
from .sockets import (
    Address,
    connect_to_pod,
    connect_upstream,
    listener_socket,
    reset,
    upstream_socket,
)

__all__ = [
    "Address",
    "Admit",
    "ByteCounters",
    "ConnectionHandler",
    "ConnectionInfo",
    "ConnectionRegistry",
    "Counters",
    "Direction",
    "InboundDecision",
    "InboundProxy",
    "InboundSource",
    "Listener",
    "ListenerError",
    "LiveConnection",
    "NoRouteError",
    "OutboundProxy",
    "PlaintextDecision",
    "PlaintextProxy",
    "ProxyContext",
    "ProxyError",
    "Reject",
    "RelayResult",
    "TunnelCounters",
    "TunnelError",
    "UpstreamConnectError",
    "connect_to_pod",
    "connect_upstream",
    "decide_inbound",
    "decide_plaintext",
    "inbound_source",
    "listener_socket",
    "proxied",
    "refuse",
    "relay_sockets",
    "reset",
    "tunnel_result",
    "upstream_socket",
]
