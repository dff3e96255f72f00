"""``veil controller run``: the process around :class:`~controller.server.Controller`.

Owns what happens before and around the listeners: the run flags and the
health endpoint address, the bind probe that fails before the CA is created,
the Kubernetes source's startup (its kinds become health checks), the
HTTP health server, signal handling (SIGTERM ends the process in every phase,
also while startup waits) and the startup line a supervisor reads.
:mod:`controller.server` owns the gRPC listeners themselves.
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
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from controller.config import (
    ConfigError,
    ControllerConfig,
    ListenAddress,
    parse_listen_address,
)
from controller.config import add_run_arguments as _add_config_arguments
from controller.health import DEFAULT_HEALTH_PORT, HealthCheck, HealthServer, HealthState
from controller.metrics import ControllerMetrics, ControllerSnapshot, KindAvailability
from controller.registry import RegistryHolder
from controller.server import Controller, StartupInfo

if TYPE_CHECKING:
    from controller.k8s import KubernetesRuntime

__all__ = ["add_run_arguments", "check_can_bind", "health_address", "run_controller"]

log = logging.getLogger("veil.controller")

DEFAULT_HEALTH_ADDR = f"127.0.0.1:{DEFAULT_HEALTH_PORT}"


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``veil controller run`` flags: the configuration's, plus the health endpoint."""
    _add_config_arguments(parser)
    parser.add_argument(
        "--health-addr",
        dest="health_addr",
        default=None,
        metavar="VALUE",
        help="HTTP health endpoint (/healthz/ready, /healthz/live), loopback by default; "
        f"'off' disables it (default {DEFAULT_HEALTH_ADDR}; env VEIL_HEALTH_ADDR)",
    )


def health_address(args: argparse.Namespace, environ: Mapping[str, str]) -> ListenAddress | None:
    """``--health-addr``, then ``VEIL_HEALTH_ADDR``, then the loopback default; None for off."""
    text = getattr(args, "health_addr", None) or environ.get("VEIL_HEALTH_ADDR") or ""
    text = text.strip() or DEFAULT_HEALTH_ADDR
    if text == "off":
        return None
    try:
        return parse_listen_address(text, DEFAULT_HEALTH_PORT)
    except ValueError as e:
        raise ConfigError(
            f"--health-addr: {e}", hint="use HOST:PORT, e.g. 127.0.0.1:15014, or off"
        ) from None


def _kind_checks(k8s: KubernetesRuntime) -> list[HealthCheck]:
    return [
        HealthCheck(
            name=h.kind,
            ok=h.ok,
            required=h.required,
            state=h.state,
            detail=h.cause or f"listed as {h.api_version}",
            hint=h.hint,
        )
        for h in k8s.source.health()
    ]


def check_can_bind(*addresses: tuple[ListenAddress, str]) -> None:
    """Raises ConfigError when a listener address cannot be bound right now.

    A probe with a plain socket (closed at once; SO_REUSEADDR like gRPC's), so
    the failure is reported before anything is written to the state directory.
    """
    for addr, what in addresses:
        family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((addr.host, addr.port))
        except OSError as e:
            raise ConfigError(
                f"cannot listen on {addr} ({what} listener): {e.strerror or e}",
                hint="is another controller running there, or the address not on this "
                "host? Pick another with --listen / --join-listen (nothing was written)",
            ) from None
        finally:
            probe.close()


async def _serve(
    config: ControllerConfig,
    started: Callable[[StartupInfo], None],
    health_addr: ListenAddress | None = None,
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Handlers go in before anything is announced: a supervisor may send SIGTERM
    # the moment it reads the startup line.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    health = HealthState()
    metrics = ControllerMetrics(
        lambda: ControllerSnapshot(
            phase=health.phase,
            source=config.source,
            trust_domain=config.trust_domain,
            kinds=tuple(KindAvailability(c.name, c.required, c.state) for c in health.checks()),
        )
    )
    health_server: HealthServer | None = None
    k8s: KubernetesRuntime | None = None
    controller: Controller | None = None

    async def startup() -> StartupInfo:
        nonlocal k8s, controller
        if config.source == "kubernetes":
            from controller.k8s import KubernetesOptions, build_kubernetes_source
            from controller.k8s.client import KubeClient

            factory = KubeClient.in_cluster
            if config.kube_api is not None and config.kube_token_file is not None:
                api, token_file = config.kube_api, config.kube_token_file
                ca_file = str(config.kube_ca_file) if config.kube_ca_file else None

                def factory() -> KubeClient:
                    return KubeClient.for_host(api, token_file.read_text().strip(), ca_file=ca_file)

            k8s = await build_kubernetes_source(
                RegistryHolder(trust_domain=config.trust_domain),
                KubernetesOptions(trust_domain=config.trust_domain),
                state_dir=config.state_dir,
                client_factory=factory,
                on_progress=lambda text: health.set_phase("starting", text),
            )
            k8s_runtime = k8s
            health.checks = lambda: _kind_checks(k8s_runtime)
            health.set_phase("syncing", "waiting for the first list of the required kinds")
        if k8s is None:
            # Before the CA is created: a controller that cannot listen must not
            # leave a fresh CA behind (tokens would pin a root nobody serves).
            check_can_bind((config.listen, "mTLS"), (config.join_listen, "join"))
            if config.registry is None:
                log.warning(
                    "no --registry given: the mesh is empty (no workloads, services or "
                    "policies), so nodes can join but no workload gets a certificate; pass "
                    "--registry FILE (see docs/registry.md) or --source kubernetes"
                )
        controller = Controller(config, k8s, metrics)
        wired = controller
        metrics.set_snapshot(lambda: wired.snapshot(health.phase, health.report()["ready"]))
        return await controller.start()

    try:
        if health_addr is not None:
            health_server = HealthServer(health, metrics)
            await health_server.start(health_addr)
        # Startup may wait forever (an API server that refuses a required kind, a
        # CA Secret nobody creates): race it against the signal so SIGTERM ends
        # the process in every phase, not only once it serves.
        startup_task = asyncio.create_task(startup(), name="controller startup")
        stop_task = asyncio.create_task(stop.wait(), name="stop signal")
        await asyncio.wait({startup_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        stop_task.cancel()
        if not startup_task.done():
            log.info("shutting down during startup (%s: %s)", health.phase, health.detail)
            startup_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await startup_task
            return 0
        info = startup_task.result()
        health.set_phase("serving", "listeners open")
        started(info)
        await stop.wait()
        log.info("shutting down")
    finally:
        health.set_phase("stopping", "shutting down")
        if controller is not None:
            await controller.stop()
        if k8s is not None:
            await k8s.close()  # releases the Lease: the standby takes over at once
        if health_server is not None:
            await health_server.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0


def _print_startup(info: StartupInfo) -> None:
    print(info.line(), flush=True)


def run_controller(args: argparse.Namespace) -> int:
    """``veil controller run``: serves until SIGTERM/SIGINT; returns the exit code.

    Configuration, CA and registry problems raise ControllerError subclasses
    (printed by the ``veil`` CLI with their hint) before anything listens.
    """
    config = ControllerConfig.from_args(args, os.environ)
    health_addr = health_address(args, os.environ)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s %(message)s",
            stream=sys.stderr,
        )
    return asyncio.run(_serve(config, _print_startup, health_addr))
