"""Kubernetes mode assembled: what ``veil controller run --source kubernetes`` starts.

:func:`build_kubernetes_source` returns a :class:`KubernetesRuntime` holding the
pieces the server wires in place of their standalone counterparts:

* ``runtime.ca``: the CertificateAuthority, stored in the Secret ``veil-ca`` (or
  the plugged-in ``cacerts`` CA when present) instead of the state directory;
* ``runtime.authenticator``: TokenReview instead of join tokens;
* ``runtime.run()``: the registry source (list/watch -> RegistryHolder), leader
  election, policy status conditions, the trust-bundle ConfigMap and CA reloads,
  instead of the YAML file watcher.

**Two replicas.** Both serve nodes: Identity reads the RegistryState (each
replica watches the API itself) and signs with the CA both load from the same
Secret; Discovery streams each replica's own state. Nodes connected to
different replicas may see an update a few milliseconds apart, as with any
watch. The leader alone writes: policy statuses, the CA Secret when absent,
the trust-bundle ConfigMap, and imports of a changed plugged-in CA. CA writes
are optimistic (resourceVersion), so even two replicas that both believe they
lead cannot fork the CA; status writes are idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.api.model import TrustBundle
from controller.api.spiffe import DEFAULT_TRUST_DOMAIN
from controller.ca import CertificateAuthority
from controller.errors import CaError
from controller.registry import RegistryHolder

from .backoff import Backoff
from .bundle import TRUST_BUNDLE_CONFIGMAP, TrustBundlePublisher
from .client import KubeClient
from .errors import KubernetesError
from .leader import LeaderElector, LeaseTiming
from .reflector import WatchSettings
from .secret_store import (
    CA_SECRET,
    PLUGGED_CA_SECRET,
    CaSecretUnavailable,
    PluggedCa,
    SecretCaStore,
    plugged_ca_files,
    read_plugged_ca,
)
from .source import KubernetesSource
from .status import StatusWriter
from .tokenreview import AUDIENCE, TokenReviewAuthenticator

__all__ = ["KubernetesOptions", "KubernetesRuntime", "build_kubernetes_source"]

log = logging.getLogger("veil.controller.k8s")


def _default_identity() -> str:
    # POD_NAME comes from the downward API in daemonset/controller.yaml.
    return os.environ.get("POD_NAME") or socket.gethostname()


def _default_namespace() -> str:
    return os.environ.get("POD_NAMESPACE") or "veil-system"


@dataclass(frozen=True, slots=True)
class KubernetesOptions:
    """Settings of Kubernetes mode; the defaults match daemonset/."""

    trust_domain: str = DEFAULT_TRUST_DOMAIN
    namespace: str = field(default_factory=_default_namespace)
    identity: str = field(default_factory=_default_identity)
    node_service_account: str = "veil-node"
    audience: str = AUDIENCE
    lease_name: str = "veil-controller"
    ca_secret: str = CA_SECRET
    plugged_ca_secret: str = PLUGGED_CA_SECRET
    trust_bundle_configmap: str = TRUST_BUNDLE_CONFIGMAP
    watch: WatchSettings = field(default_factory=WatchSettings)
    lease: LeaseTiming = field(default_factory=LeaseTiming)
    ca_check_interval: float = 10.0  # re-read the CA Secret (rotations by the leader)
    plugged_ca_interval: float = 30.0  # re-read cacerts (a replaced plugged-in CA)
    startup_poll: float = 1.0


class KubernetesRuntime:
    def __init__(
        self,
        *,
        options: KubernetesOptions,
        client: KubeClient,
        holder: RegistryHolder,
        elector: LeaderElector,
        elector_task: asyncio.Task[None],
        store: SecretCaStore,
        ca: CertificateAuthority,
        plugged: PluggedCa | None,
    ) -> None:
        self.options = options
        self.client = client
        self.holder = holder
        self.elector = elector
        self.store = store
        self.ca = ca
        self._elector_task = elector_task
        self._run_task: asyncio.Task[Any] | None = None
        self._plugged_rv = plugged.resource_version if plugged else ""
        self.authenticator = TokenReviewAuthenticator(
            client,
            namespace=options.namespace,
            service_account=options.node_service_account,
            audiences=(options.audience,),
        )
        self.source = KubernetesSource(client, holder, options.trust_domain, settings=options.watch)
        self.status = StatusWriter(client, self.source.lookup, lambda: elector.is_leader)
        self.source.set_status_writer(self.status)
        self.publisher = TrustBundlePublisher(
            client, options.namespace, lambda: elector.is_leader, options.trust_bundle_configmap
        )
        loop = asyncio.get_running_loop()

        def bundle_changed(bundle: TrustBundle) -> None:
            # CA listeners may run on a worker thread (a rotation in to_thread).
            if not loop.is_closed():
                loop.call_soon_threadsafe(self.publisher.set, bundle)

        ca.add_listener(bundle_changed)
        self.publisher.set(ca.trust_bundle())
        elector.add_listener(self._on_leadership)
        self._on_leadership(elector.is_leader)

    def _on_leadership(self, leader: bool) -> None:
        if leader:
            self.status.poke()
            self.publisher.poke()

    async def wait_synced(self) -> None:
        """Returns once the first complete RegistryState is published (serve nodes after this)."""
        await self.source.wait_synced()

    async def _watch_plugged_ca(self) -> None:
        """Imports a replaced ``cacerts`` Secret (leader only; others reload the CA Secret)."""
        backoff = Backoff()
        while True:
            await asyncio.sleep(self.options.plugged_ca_interval)
            if not self.elector.is_leader:
                continue
            try:
                plugged = await read_plugged_ca(
                    self.client, self.options.namespace, self.options.plugged_ca_secret
                )
                if plugged is None or plugged.resource_version == self._plugged_rv:
                    continue

                def rotate(p: PluggedCa = plugged) -> None:
                    with plugged_ca_files(p) as (cert, key, chain):
                        self.ca.rotate(ca_cert=cert, ca_key=key, ca_chain=chain)

                await asyncio.to_thread(rotate)
                self._plugged_rv = plugged.resource_version
                log.info(
                    "imported the replaced plugged-in CA from Secret %s",
                    self.options.plugged_ca_secret,
                )
                backoff.reset()
            except (KubernetesError, CaError) as e:
                log.error("plugged-in CA not imported: %s", e)
                await asyncio.sleep(backoff.next_delay())

    async def run(self) -> None:
        """Runs every Kubernetes-mode loop until cancelled (or :meth:`close`)."""
        self._run_task = asyncio.current_task()
        tasks = [
            asyncio.create_task(self.source.run(), name="k8s-source"),
            asyncio.create_task(self.status.run(), name="k8s-status"),
            asyncio.create_task(self.publisher.run(), name="k8s-trust-bundle"),
            asyncio.create_task(
                self.ca.watch_state_dir(self.options.ca_check_interval), name="k8s-ca-reload"
            ),
            asyncio.create_task(self._watch_plugged_ca(), name="k8s-plugged-ca"),
        ]
        try:
            done, _ = await asyncio.wait(
                [*tasks, self._elector_task], return_when=asyncio.FIRST_EXCEPTION
            )
            for t in done:
                t.result()  # re-raise a crash: the controller must not run half-alive
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t

    async def close(self) -> None:
        """Stops :meth:`run`, releases the Lease (a standby takes over at once), closes clients."""
        run_task, self._run_task = self._run_task, None
        if run_task is not None and run_task is not asyncio.current_task():
            run_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run_task
        self._elector_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._elector_task
        await asyncio.to_thread(self.store.close)
        await self.client.close()


async def build_kubernetes_source(
    holder: RegistryHolder,
    options: KubernetesOptions | None = None,
    *,
    state_dir: Path,
    client_factory: Callable[[], KubeClient] = KubeClient.in_cluster,
    on_progress: Callable[[str], None] | None = None,
) -> KubernetesRuntime:
    """Connects to the cluster, joins the leader election and loads (or creates) the CA.

    Returns once the CA is available; call ``runtime.run()`` as a task and serve
    nodes after ``await runtime.wait_synced()``. ``state_dir`` is only named in
    CA error messages: in Kubernetes mode the CA lives in the Secret.
    ``on_progress`` hears what startup is waiting for (the health endpoint shows it).
    Cancelling it (SIGTERM during startup) cleans up whatever was started.
    """
    progress = on_progress or (lambda _text: None)
    progress(f"loading the CA from Secret {(options or KubernetesOptions()).ca_secret}")
    options = options or KubernetesOptions()
    client = client_factory()
    elector = LeaderElector(
        client, options.namespace, options.lease_name, options.identity, timing=options.lease
    )
    elector_task = asyncio.create_task(elector.run(), name="k8s-leader-election")
    store: SecretCaStore | None = None
    try:
        store = await asyncio.to_thread(
            SecretCaStore,
            client_factory,
            options.namespace,
            options.ca_secret,
            may_create=lambda: elector.is_leader,
        )
        ca, plugged = await _load_ca(client, store, elector, options, state_dir, progress)
    except BaseException:
        elector_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await elector_task
        if store is not None:
            await asyncio.to_thread(store.close)
        await client.close()
        raise
    log.info(
        "Kubernetes mode: CA %s from Secret %s/%s%s; leader election on Lease %s/%s as %s",
        ca.fingerprint[:16],
        options.namespace,
        options.ca_secret,
        " (plugged-in CA from cacerts)" if plugged else "",
        options.namespace,
        options.lease_name,
        options.identity,
    )
    return KubernetesRuntime(
        options=options,
        client=client,
        holder=holder,
        elector=elector,
        elector_task=elector_task,
        store=store,
        ca=ca,
        plugged=plugged,
    )


def _open_ca(
    state_dir: Path, trust_domain: str, store: SecretCaStore, plugged: PluggedCa | None
) -> CertificateAuthority:
    if plugged is None:
        return CertificateAuthority.load_or_create(state_dir, trust_domain, store=store)
    with plugged_ca_files(plugged) as (cert, key, chain):
        return CertificateAuthority.load_or_create(
            state_dir, trust_domain, ca_cert=cert, ca_key=key, ca_chain=chain, store=store
        )


async def _load_ca(
    client: KubeClient,
    store: SecretCaStore,
    elector: LeaderElector,
    options: KubernetesOptions,
    state_dir: Path,
    progress: Callable[[str], None],
) -> tuple[CertificateAuthority, PluggedCa | None]:
    """Waits until the CA Secret exists or we lead, then loads or creates the CA."""
    waited = False
    backoff = Backoff(initial=options.startup_poll, cap=max(options.startup_poll, 10.0))
    while True:
        try:
            if elector.is_leader or await asyncio.to_thread(store.exists):
                plugged = await read_plugged_ca(
                    client, options.namespace, options.plugged_ca_secret
                )
                ca = await asyncio.to_thread(
                    _open_ca, state_dir, options.trust_domain, store, plugged
                )
                return ca, plugged
            if not waited:
                progress(f"waiting for the leader to create the CA Secret {options.ca_secret}")
                log.info(
                    "waiting for the leading controller to create the CA Secret %s/%s",
                    options.namespace,
                    options.ca_secret,
                )
                waited = True
            await asyncio.sleep(options.startup_poll)
        except (KubernetesError, CaSecretUnavailable) as e:
            delay = backoff.next_delay()
            progress(f"CA not available yet: {e}")
            log.warning("CA not available yet (%s); retrying in %.1fs", e, delay)
            await asyncio.sleep(delay)
