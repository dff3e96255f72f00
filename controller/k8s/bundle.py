"""Publishing the public trust bundle as the ConfigMap ``veil-system/veil-ca-root``.

Nodes must pin the CA before they send their token to the join listener, and a
projected ServiceAccount token carries no CA fingerprint (a standalone join
token does). The node DaemonSet therefore mounts this ConfigMap, which holds only
public root certificates (``root-cert.pem``), and verifies the controller
against it. The leader writes it at startup and whenever the CA's roots change
(rotation adds a root; pruning removes one), so nodes trust a new root before
anything is signed with it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from controller.api.model import TrustBundle

from .backoff import Backoff
from .client import KubeClient
from .errors import KubernetesError
from .kinds import CONFIG_MAPS

__all__ = ["BUNDLE_KEY", "TRUST_BUNDLE_CONFIGMAP", "TrustBundlePublisher", "configmap_body"]

log = logging.getLogger("veil.controller.k8s")

TRUST_BUNDLE_CONFIGMAP = "veil-ca-root"
BUNDLE_KEY = "root-cert.pem"


def configmap_body(
    namespace: str, name: str, bundle: TrustBundle, resource_version: str | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {"app.kubernetes.io/part-of": "veil", "app.kubernetes.io/component": "ca"},
    }
    if resource_version:
        meta["resourceVersion"] = resource_version
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": {
            BUNDLE_KEY: b"".join(bundle.roots).decode(),
            "trust-domain": bundle.trust_domain,
        },
    }


class TrustBundlePublisher:
    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        is_leader: Callable[[], bool],
        name: str = TRUST_BUNDLE_CONFIGMAP,
        *,
        backoff: Backoff | None = None,
    ) -> None:
        self._client = client
        self.namespace = namespace
        self.name = name
        self._is_leader = is_leader
        self._bundle: TrustBundle | None = None
        self._wake = asyncio.Event()
        self._backoff = backoff or Backoff()
        self.writes = 0

    def set(self, bundle: TrustBundle) -> None:
        """Called by the CA when its roots change (a CertificateAuthority listener)."""
        self._bundle = bundle
        self._wake.set()

    def poke(self) -> None:
        self._wake.set()

    async def publish_once(self) -> None:
        """Writes the ConfigMap if it differs from the bundle; raises KubernetesError."""
        if self._bundle is None:
            return
        for _ in range(3):
            current = await self._client.get_optional(CONFIG_MAPS, self.namespace, self.name)
            rv = None if current is None else str(current["metadata"].get("resourceVersion"))
            body = configmap_body(self.namespace, self.name, self._bundle, rv)
            if current is not None and current.get("data") == body["data"]:
                return
            try:
                if current is None:
                    await self._client.create(CONFIG_MAPS, self.namespace, body)
                else:
                    await self._client.replace(CONFIG_MAPS, self.namespace, self.name, body)
            except KubernetesError as e:
                if e.conflict:
                    continue
                raise
            self.writes += 1
            log.info(
                "published %d trust root(s) to ConfigMap %s/%s",
                len(self._bundle.roots),
                self.namespace,
                self.name,
            )
            return

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._is_leader():
                continue
            try:
                await self.publish_once()
                self._backoff.reset()
            except KubernetesError as e:
                delay = self._backoff.next_delay()
                log.warning("trust bundle ConfigMap not written (%s); retrying in %.1fs", e, delay)
                await asyncio.sleep(delay)
                self._wake.set()
