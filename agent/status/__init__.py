"""The agent's local status API: JSON over HTTP on a unix socket, for veilctl.

Only the local root user can reach it (the socket is 0600 in a 0700 directory);
it is never exposed on a TCP port.
"""

from .client import StatusClient, StatusUnavailable
from .server import StatusServer

__all__ = ["StatusClient", "StatusServer", "StatusUnavailable"]
