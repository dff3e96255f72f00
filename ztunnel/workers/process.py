"""A worker process of a multi-core ztunnel: ``python -m ztunnel.workers.process --fd N``.

The supervisor starts it with one end of a socketpair as fd ``N`` and tells
it everything over that socket (:mod:`ztunnel.workers.codec`):

1. ``HELLO``: the config and test options;
2. ``STATE``: the controller's updates, as the supervisor applied them (a
   full snapshot first), into this process's own
   :class:`~node.state.StateStore`;
3. ``CERT`` / ``CERT_DROP`` / ``CERT_REFUSED``: workload certificates;
4. ``QUERY``: connections or metrics for the admin API, answered by ``ANSWER``;
5. ``DRAIN``: stop accepting, drain for the grace period, exit 0.

After the first snapshot the worker binds the listeners (SO_REUSEPORT: every
worker joins the same group) and sends ``READY``. It keeps its own HBONE pool.
When the supervisor goes away (EOF) it drains and exits, so no worker outlives
it. Malformed frames end the worker (the supervisor restarts it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from typing import Any

from controller.api.model import TrustBundle
from controller.api.spiffe import SpiffeId
from node.errors import StateError
from node.state import StateStore
from veil.errors import VeilError

from ..admin.denies import deny_event
from ..limits import enable_request_migration, raise_nofile_limit
from ..metrics import Registry
from ..metrics.aggregate import export_registry
from ..metrics.traffic import ConnectionReport
from ..proxy.errors import ListenerError
from ..worker import LISTENER_NAMES, ProxyEngine, tune_gc
from .certs import PushedCertificates
from .codec import (
    Frame,
    Hello,
    IpcError,
    Kind,
    decode_certificate,
    decode_hello,
    decode_state,
    encode_json,
    parse_json,
)
from .link import FrameLink

__all__ = ["WorkerProcess", "main"]

log = logging.getLogger("veil.ztunnel.worker")


class WorkerProcess:
    """The state of one worker, driven by the frames the supervisor sends."""

    def __init__(self, link: FrameLink, hello: Hello) -> None:
        self.link = link
        self.hello = hello
        config = hello.config
        self.store = StateStore(config.node_name, hello.join_bundle.trust_domain)
        self.certs = PushedCertificates(self._want)
        self.registry = Registry()
        self.engine = ProxyEngine(
            config,
            store=self.store,
            certs=self.certs,
            trust_bundle=self.trust_bundle,
            registry=self.registry,
            transparent=hello.transparent,
            mark=hello.mark,
            peer_hbone_port=hello.peer_hbone_port,
        )
        # Denies feed the supervisor's /denies (veilctl monitor).
        self.engine.traffic.deny_listeners.append(self._forward_deny)
        self.done = asyncio.Event()
        self.tune_gc = True
        self._draining: asyncio.Task[None] | None = None

    def trust_bundle(self) -> TrustBundle:
        bundle = self.store.current.trust_bundle
        return bundle if bundle is not None else self.hello.join_bundle

    def _forward_deny(self, report: ConnectionReport) -> None:
        if report.verdict == "deny":
            self.link.send(encode_json(Kind.DENY, deny_event(report)))

    def _want(self, identity: SpiffeId) -> None:
        self.link.send(encode_json(Kind.CERT_WANTED, {"identity": str(identity)}))

    def handle(self, frame: Frame) -> None:
        """Applies one frame from the supervisor; IpcError for a malformed one."""
        if frame.kind is Kind.STATE:
            update = decode_state(frame)
            try:
                self.store.apply(update)
            except StateError as e:
                raise IpcError(f"supervisor sent a state update that does not apply: {e}") from e
            if not self.engine.listeners and not self.engine.draining and self.store.current.synced:
                self.engine.bind_listeners()
                ports = {n: self.engine.address(n)[1] for n in LISTENER_NAMES}
                self.link.send(encode_json(Kind.READY, {"pid": os.getpid(), "ports": ports}))
                if self.tune_gc:
                    tune_gc()  # the process is ours alone: same as a single-process ztunnel
        elif frame.kind is Kind.CERT:
            self.certs.install(decode_certificate(frame))
        elif frame.kind is Kind.CERT_DROP:
            self.certs.drop(SpiffeId.parse(_text(parse_json(frame), "identity")))
        elif frame.kind is Kind.CERT_REFUSED:
            body = parse_json(frame)
            self.certs.refused(SpiffeId.parse(_text(body, "identity")), _text(body, "error"))
        elif frame.kind is Kind.QUERY:
            body = parse_json(frame)
            self.link.send(
                encode_json(Kind.ANSWER, {"id": body.get("id"), "body": self._answer(body)})
            )
        elif frame.kind is Kind.DRAIN:
            grace = parse_json(frame).get("grace")
            self.drain(float(grace) if isinstance(grace, (int, float)) else None)
        else:
            raise IpcError(f"a worker does not accept {frame.kind.name} frames")

    def _answer(self, query: dict[str, Any]) -> object:
        what = query.get("what")
        if what == "connections":
            return self.engine.connections.dump()
        if what == "draining":
            return {"draining": self.engine.draining}
        if what == "metrics":
            return [f.to_json() for f in export_registry(self.registry)]
        return {"error": f"unknown query {what!r}"}

    def drain(self, grace: float | None = None) -> None:
        """Starts the drain (idempotent); ``done`` is set when it finished."""
        if self._draining is not None:
            return
        g = self.hello.config.drain_grace_period if grace is None else grace
        # Now, not when the task first runs: the answer to the supervisor's
        # next query must find the listeners closed (it then reports not ready).
        self.engine.stop_accepting()
        self._draining = asyncio.get_running_loop().create_task(self._drain(g))

    async def _drain(self, grace: float) -> None:
        try:
            await self.engine.drain(grace)
        finally:
            self.done.set()


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise IpcError(f"field {name!r} is missing or not a string")
    return value


async def serve(sock: socket.socket) -> int:
    link = await FrameLink.open(sock)
    frames = link.frames()
    first = await anext(frames, None)
    if first is None:
        return 0  # the supervisor went away before saying anything
    if first.kind is not Kind.HELLO:
        log.error("worker: expected HELLO from the supervisor, got %s", first.kind.name)
        return 2
    hello = decode_hello(first)
    worker = WorkerProcess(link, hello)
    loop = asyncio.get_running_loop()
    # SIGTERM (the whole process group signalled) drains like a DRAIN frame;
    # SIGINT (Ctrl-C reaches every process of the terminal's group) is left
    # to the supervisor, which then sends DRAIN.
    loop.add_signal_handler(signal.SIGTERM, worker.drain)
    loop.add_signal_handler(signal.SIGINT, lambda: None)

    exit_code = 0

    async def pump() -> None:
        nonlocal exit_code
        try:
            async for frame in frames:
                worker.handle(frame)
                await link.flush()
        except ListenerError as e:
            # Not the supervisor's fault: say what the kernel refused.
            log.error("worker %d: %s (hint: %s)", hello.index, e.message, e.hint)
            exit_code = 3
            worker.drain(0.0)
            return
        except (IpcError, VeilError, ValueError) as e:
            log.error("worker %d: bad message from the supervisor (%s); exiting", hello.index, e)
            worker.drain(0.0)
            return
        log.info("worker %d: supervisor closed the channel; draining", hello.index)
        worker.drain()

    reader = loop.create_task(pump(), name="veil-worker-link")
    await worker.done.wait()
    reader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reader
    link.close()
    log.info("worker %d (pid %d) stopped", hello.index, os.getpid())
    return exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ztunnel.workers.process")
    parser.add_argument("--fd", type=int, required=True, help="the supervisor's socket")
    parser.add_argument("--index", type=int, default=0, help="worker number (for logs)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s %(name)s[w{args.index}] %(message)s",
        stream=sys.stderr,
    )
    sock = socket.socket(fileno=args.fd)
    raise_nofile_limit()
    enable_request_migration()
    # Imported here so the module loads without the CLI package.
    from ..cli import access_log_off_the_loop

    listener = access_log_off_the_loop()
    try:
        try:
            import uvloop
        except ImportError:
            return asyncio.run(serve(sock))
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(serve(sock))
    finally:
        listener.stop()


if __name__ == "__main__":
    sys.exit(main())
