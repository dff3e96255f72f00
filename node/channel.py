"""The node's one channel to the controller, shared by the agent and the ztunnel.

:class:`ControllerChannel` owns the mTLS client a node process talks to the
controller through, and keeps it usable across two events:

- **new node credentials on disk** (the agent renewed the node certificate,
  or ``veil node join`` ran again): :meth:`ControllerChannel.reload` reopens
  the client with them; callers hold the channel, not a client, so their next
  call uses the new one;
- **a controller outage ending**: while an RPC fails as unreachable, a probe
  checks every ``probe_interval`` whether the controller's port answers. When
  it does, the channel opens a fresh client (gRPC's own reconnect backoff
  would otherwise keep the old one failing for up to two minutes) and
  signals the reconnection: :meth:`on_reconnect` subscribers run (the
  certificate manager requests every missing certificate at once) and
  :meth:`sleep`, the watch's backoff sleep, returns early.

The channel satisfies both ``node.watch.WatchSource`` and the ztunnel's
certificate signer protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Protocol

from controller.api.client import ControllerClient
from controller.api.errors import ApiError
from controller.api.model import ResourceType, TrustBundle, WatchUpdate
from controller.api.ports import CONTROLLER_PORT
from veil.errors import VeilError

from .credentials import NodeCredentials, load_node_credentials
from .pinning import split_host_port

__all__ = ["ControllerChannel", "ControllerRpc", "open_client"]

log = logging.getLogger("veil.node.channel")

# gRPC status names that mean "the controller did not answer", as opposed to
# an answer that refused the request.
_UNREACHABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})
# A port that answers while every RPC still fails (a broken TLS setup) must
# not turn into a request storm: the probe signals at most this often.
_MIN_SIGNAL_INTERVAL = 2.0


class ControllerRpc(Protocol):
    """The calls a node makes on one client (``ControllerClient`` satisfies it)."""

    async def create_certificate(
        self, csr_pem: bytes, identity: str, ttl_seconds: int = 0, timeout: float = 10.0
    ) -> tuple[bytes, ...]: ...

    def watch(
        self, node: str = "", types: Iterable[ResourceType] = (), epoch: str = "", version: int = 0
    ) -> AsyncIterator[WatchUpdate]: ...

    async def close(self) -> None: ...


def open_client(creds: NodeCredentials, address: str) -> ControllerRpc:
    """An mTLS client to ``address`` as the node ``creds`` belong to."""
    return ControllerClient(
        address,
        key_pem=creds.key_pem,
        cert_chain_pem=b"".join(creds.cert_chain_pem),
        trust_bundle_pem=b"".join(creds.trust_bundle_pem),
    )


async def _port_answers(address: str, timeout: float) -> bool:
    """True when a TCP connection to ``address`` (HOST:PORT) succeeds."""
    try:
        host, port = split_host_port(address, CONTROLLER_PORT)
    except (VeilError, ValueError):
        return False
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class ControllerChannel:
    """The controller channel for one node process. Use one per process.

    ``types`` limits the watch to some resource types (the agent's choice);
    ``address`` overrides the controller address stored at join.
    """

    def __init__(
        self,
        state_dir: Path,
        creds: NodeCredentials,
        *,
        address: str | None = None,
        types: Iterable[ResourceType] = (),
        probe_interval: float = 0.5,
        connect: Callable[[NodeCredentials, str], ControllerRpc] = open_client,
        port_answers: Callable[[str, float], Awaitable[bool]] = _port_answers,
    ) -> None:
        self.state_dir = state_dir
        self.creds = creds
        self.address = address or creds.controller_address
        self._types = tuple(types)
        self._probe_interval = probe_interval
        self._connect = connect
        self._port_answers = port_answers
        self.client: ControllerRpc = connect(creds, self.address)
        self.reachable = True  # optimistic until an RPC says otherwise
        self.reconnects = 0
        # Failed RPCs by gRPC status name (a closed set), for the metrics.
        self.errors: dict[str, int] = {}
        self._generation = 0  # bumped at every reconnection signal
        self._watch_generation = 0  # the generation when the last watch stream began
        self._signal = asyncio.Event()
        self._last_signal = float("-inf")
        self._subscribers: list[Callable[[], None]] = []
        self._probe: asyncio.Task[None] | None = None
        self._closed = False

    # -- what callers use -------------------------------------------------------

    def trust_bundle(self) -> TrustBundle:
        """The roots stored with the node credentials."""
        return self.creds.trust_bundle()

    async def create_certificate(
        self, csr_pem: bytes, identity: str, ttl_seconds: int = 0, timeout: float = 10.0
    ) -> tuple[bytes, ...]:
        """Signs a workload CSR on the current client (see ``ControllerClient``)."""
        client = self.client
        try:
            chain = await client.create_certificate(csr_pem, identity, ttl_seconds, timeout)
        except ApiError as e:
            self._rpc_failed(client, e)
            raise
        self._answered()
        return chain

    async def watch(
        self,
        node: str = "",
        types: Iterable[ResourceType] = (),
        epoch: str = "",
        version: int = 0,
    ) -> AsyncIterator[WatchUpdate]:
        """The current client's watch (limited to the channel's types, if any)."""
        client = self.client
        self._watch_generation = self._generation
        first = True
        try:
            async for update in client.watch(node, self._types or types, epoch, version):
                if first:
                    first = False
                    self._answered()
                yield update
        except ApiError as e:
            self._rpc_failed(client, e)
            raise

    async def sleep(self, seconds: float) -> None:
        """The watch's backoff sleep: ends early when the controller is reachable again.

        Returns at once when a reconnection was signalled since the last watch
        stream began, so a retry never waits out a timer the outage set.
        """
        seen = self._watch_generation
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while self._generation == seen:
                    self._signal.clear()
                    await self._signal.wait()

    def on_reconnect(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Runs ``callback`` whenever the controller is reachable again; returns
        a function that unsubscribes."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    # -- credentials on disk -------------------------------------------------------

    async def reload(self) -> bool:
        """Reopens the client when the credentials on disk differ from the ones
        in use. True when it did."""
        try:
            creds = await asyncio.to_thread(load_node_credentials, self.state_dir)
        except (VeilError, OSError) as e:
            log.warning("cannot re-read node credentials: %s", e)
            return False
        if (creds.cert_chain_pem, creds.trust_bundle_pem) == (
            self.creds.cert_chain_pem,
            self.creds.trust_bundle_pem,
        ):
            return False
        log.info("node credentials changed on disk; reconnecting to the controller with them")
        self.creds = creds
        await self._reopen()
        return True

    async def follow_credentials(self, interval: float) -> None:
        """Checks the state directory every ``interval`` seconds; returns only by cancellation."""
        while True:
            await asyncio.sleep(interval)
            await self.reload()

    async def close(self) -> None:
        self._closed = True
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None
        await self.client.close()

    # -- reachability ----------------------------------------------------------------

    def _answered(self) -> None:
        if not self.reachable:
            self._reachable_again("the controller answered")

    def _rpc_failed(self, client: ControllerRpc, error: ApiError) -> None:
        self.errors[error.code] = self.errors.get(error.code, 0) + 1
        # A failure on a client already replaced says nothing about the new one.
        if error.code not in _UNREACHABLE or self._closed or client is not self.client:
            return
        self.reachable = False
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(
                self._probe_until_reachable(), name="veil-controller-probe"
            )

    async def _probe_until_reachable(self) -> None:
        # Paced after the last signal: a port that answers while every RPC
        # still fails must not become a reconnect (and request) storm.
        await asyncio.sleep(max(0.0, self._last_signal + _MIN_SIGNAL_INTERVAL - time.monotonic()))
        while not self.reachable and not self._closed:
            if await self._port_answers(self.address, max(self._probe_interval, 1.0)):
                # A fresh client: the old channel may sit in gRPC's reconnect
                # backoff long after the controller came back.
                await self._reopen()
                self._reachable_again(f"the controller's port {self.address} answers")
                return
            await asyncio.sleep(self._probe_interval)

    def _reachable_again(self, why: str) -> None:
        self.reachable = True
        self._last_signal = time.monotonic()
        self.reconnects += 1
        self._generation += 1
        self._signal.set()
        log.info("controller reachable again (%s)", why)
        for callback in list(self._subscribers):
            try:
                callback()
            except Exception:
                log.exception("controller reconnection subscriber failed")

    async def _reopen(self) -> None:
        old, self.client = self.client, self._connect(self.creds, self.address)
        # Streams on the old client end on their own (the watch reconnects).
        await asyncio.sleep(0)
        await old.close()
