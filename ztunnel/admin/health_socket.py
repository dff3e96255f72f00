"""Readiness and liveness on a unix socket private to one ztunnel instance.

Why a socket besides ``:15021``: during a DaemonSet surge the old and the new
ztunnel share the node's network namespace and bind ``:15021`` with
SO_REUSEPORT, so the kubelet's HTTP probe may be answered by the *old*
instance and mark the new pod ready before its own listeners are bound. A
unix socket in a per-pod ``emptyDir`` has no such ambiguity: only the
ztunnel of that pod can have bound it, so an exec probe
(``veil ztunnel health --ready``) reading it learns this instance's state.

The protocol is one line each way. The client sends ``ready`` or ``live``;
the server answers one JSON object::

    {"check": "ready", "ok": false, "reasons": ["listeners: ..."],
     "pid": 42, "instance": "5f0c..."}

``live`` depends on nothing but the event loop answering (a controller
outage must never get the ztunnel restarted); ``ready`` is
:meth:`~ztunnel.admin.readiness.Readiness.check`, the same answer as
``/healthz/ready``. The socket is mode 0600 and replaces atomically whatever
a previous container of the same pod left at the path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from node.unix_socket import SocketClaim, bind_over
from veil.probe import ProbeUnavailable, ask

from ..errors import ZtunnelError
from .readiness import Readiness

__all__ = [
    "CHECKS",
    "HealthAnswer",
    "HealthSocket",
    "HealthUnavailable",
    "query_health",
]

log = logging.getLogger("veil.ztunnel.admin")

CHECKS = ("ready", "live")
# A request is one short word; anything longer is not a client of ours.
_MAX_REQUEST = 64
_READ_TIMEOUT = 2.0


class HealthUnavailable(ZtunnelError):
    """Nothing answered on the health socket, or the answer was not one."""


@dataclass(frozen=True, slots=True)
class HealthAnswer:
    check: str
    ok: bool
    reasons: tuple[str, ...]
    pid: int
    instance: str

    def describe(self) -> str:
        state = ("ready" if self.check == "ready" else "alive") if self.ok else f"not {self.check}"
        text = f"{state} (pid {self.pid}, instance {self.instance})"
        if self.reasons:
            text += ": " + "; ".join(self.reasons)
        return text


class HealthSocket:
    """Serves ``ready`` / ``live`` for one ztunnel instance on a unix socket."""

    def __init__(self, path: Path, readiness: Readiness) -> None:
        self.path = path
        self.instance = secrets.token_hex(8)
        self._readiness = readiness
        self._server: asyncio.AbstractServer | None = None
        self._claim: SocketClaim | None = None

    def answer(self, request: bytes) -> dict[str, object]:
        """The reply to one request line (pure apart from the readiness check)."""
        word = request.strip().decode("ascii", "replace")
        base: dict[str, object] = {"pid": os.getpid(), "instance": self.instance}
        if word == "live":
            return {"check": "live", "ok": True, "reasons": [], **base}
        if word == "ready":
            result = self._readiness.check()
            return {"check": "ready", "ok": result.ready, "reasons": list(result.reasons), **base}
        return {
            "check": word[:_MAX_REQUEST],
            "ok": False,
            "reasons": [f"unknown check; send one of {', '.join(CHECKS)}"],
            **base,
        }

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError, ValueError):
                line = await asyncio.wait_for(reader.readline(), _READ_TIMEOUT)
                reply = json.dumps(self.answer(line[:_MAX_REQUEST])).encode() + b"\n"
                writer.write(reply)
                await writer.drain()
        except (ConnectionError, OSError):
            pass  # the prober went away
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def start(self) -> None:
        try:
            sock, self._claim = bind_over(self.path, mode=0o600)
        except OSError as e:
            raise HealthUnavailable(
                f"cannot serve the health socket at {self.path}: {e.strerror or e}",
                hint="give --health-socket a path in a writable directory (in the DaemonSet: "
                "the pod's emptyDir volume)",
            ) from None
        self._server = await asyncio.start_unix_server(
            self._handle, sock=sock, limit=_MAX_REQUEST * 2
        )
        log.info("health socket on unix:%s (instance %s)", self.path, self.instance)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
        if self._claim is not None:
            self._claim.release()
            self._claim = None


def query_health(path: Path, check: str = "ready", timeout: float = 3.0) -> HealthAnswer:
    """Asks the ztunnel at ``path``; raises :class:`HealthUnavailable`.

    The socket client itself is :func:`veil.probe.ask`, which the DaemonSet's
    exec probes run directly (``python -m veil.probe``) because it starts fast.
    """
    try:
        body = ask(path, check, timeout, what="ztunnel health socket")
        return HealthAnswer(
            check=str(body["check"]),
            ok=body["ok"] is True,
            reasons=tuple(str(r) for r in body["reasons"]),
            pid=int(body["pid"]),
            instance=str(body["instance"]),
        )
    except ProbeUnavailable as e:
        hint = e.hint
        if e.message.startswith("no ztunnel health socket"):
            hint = (
                "the ztunnel has not started yet, or runs with another --health-socket "
                "(VEIL_ZTUNNEL_HEALTH_SOCKET)"
            )
        raise HealthUnavailable(e.message, hint=hint) from None
    except (KeyError, TypeError, ValueError):
        raise HealthUnavailable(
            f"the answer on {path} is not a ztunnel health answer",
            hint="check that --health-socket points at the ztunnel's socket",
        ) from None
