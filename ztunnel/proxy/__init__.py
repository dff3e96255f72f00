"""The ztunnel's proxy: the 15001 / 15006 / 15008 listeners and what they relay.

* :mod:`.sockets`: transparent listeners, marked (and optionally transparent)
  upstream sockets, original destination, RST close;
* :mod:`.relay`: the plaintext TCP-to-TCP relay (same node, 15006, passthrough);
* :mod:`.outbound` (15001), :mod:`.inbound` (15008, HBONE) and :mod:`.plaintext`
  (15006): per-connection decisions and relays;
* :mod:`.connections`: the registry of live connections (admin dump, policy
  re-check, drain); :mod:`.context`: what the listeners share, and the
  register / count / log bookkeeping;
* :mod:`.listener`: the accept loop.

:class:`ztunnel.app.Ztunnel` wires these to the state store, certificates,
HBONE pool and server, and the operations endpoints.
"""

from .connections import ConnectionInfo, ConnectionRegistry, Direction, LiveConnection
from .context import ProxyContext, proxied, refuse
from .errors import ListenerError, NoRouteError, ProxyError, TunnelError, UpstreamConnectError
from .inbound import InboundProxy, InboundSource, inbound_source
from .listener import Listener
from .outbound import OutboundProxy
from .plaintext import handle_plaintext
from .relay import ByteCounters, Counters, RelayResult, relay_sockets
from .sockets import Address, connect_upstream, listener_socket, reset, upstream_socket

__all__ = [
    "Address",
    "ByteCounters",
    "ConnectionInfo",
    "ConnectionRegistry",
    "Counters",
    "Direction",
    "InboundProxy",
    "InboundSource",
    "Listener",
    "ListenerError",
    "LiveConnection",
    "NoRouteError",
    "OutboundProxy",
    "ProxyContext",
    "ProxyError",
    "RelayResult",
    "TunnelError",
    "UpstreamConnectError",
    "connect_upstream",
    "handle_plaintext",
    "inbound_source",
    "listener_socket",
    "proxied",
    "refuse",
    "relay_sockets",
    "reset",
    "upstream_socket",
]
