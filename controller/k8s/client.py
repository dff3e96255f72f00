"""The one module that talks HTTP to the Kubernetes API server.

It drives kubernetes_asyncio's :class:`ApiClient` (authentication, TLS,
in-cluster configuration and token refresh) but keeps objects as the API's JSON
instead of generated model classes: the registry needs a handful of fields from
each object, custom resources have no model class anyway, and one code path then
serves every type. Every failure, from a refused connection to a ``409
Conflict``, leaves this module as a :class:`~controller.k8s.errors.KubernetesError`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException

from .errors import KubernetesError
from .kinds import TOKEN_REVIEWS, ResourceKind
from .watch import MAX_LINE_BYTES, WatchEvent, WatchProtocolError, parse_watch_line

__all__ = ["JsonObject", "KubeClient"]

log = logging.getLogger("veil.controller.k8s")

JsonObject = dict[str, Any]

# Requests other than watches: connect within 10 s, whole call within 30 s.
_REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30, connect=10, sock_connect=10)
_MERGE_PATCH = "application/merge-patch+json"
USER_AGENT = "veil-controller"


def _status_error(status: int, body: bytes, what: str) -> KubernetesError:
    """A KubernetesError from an HTTP error response (a ``Status`` object if possible)."""
    reason, message = "", ""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if isinstance(doc, dict):
        reason = str(doc.get("reason") or "")
        message = str(doc.get("message") or "")
    if not message:
        message = body[:200].decode("utf-8", "replace").strip() or f"HTTP {status}"
    return KubernetesError(f"{what}: {message} (HTTP {status})", status=status, reason=reason)


class KubeClient:
    """Raw-JSON calls on one authenticated :class:`ApiClient`."""

    def __init__(self, api: k8s_client.ApiClient) -> None:
        self._api = api
        # Names Veil in API server audit logs and in `kubectl get --raw /metrics`.
        api.user_agent = USER_AGENT

    @classmethod
    def in_cluster(cls) -> KubeClient:
        """Uses the pod's ServiceAccount (token re-read as the kubelet rotates it)."""
        configuration = k8s_client.Configuration()
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except k8s_config.ConfigException as e:
            raise KubernetesError(
                f"not running in a Kubernetes pod: {e}",
                hint="use --source yaml outside Kubernetes, or run the controller from "
                "daemonset/ (kubectl apply -k daemonset/)",
            ) from None
        return cls(k8s_client.ApiClient(configuration))

    @classmethod
    def for_host(
        cls, host: str, token: str, *, ca_file: str | None = None, verify_tls: bool = True
    ) -> KubeClient:
        """An explicit API server URL and bearer token (tests, out-of-cluster runs)."""
        configuration = k8s_client.Configuration(
            host=host,
            api_key={"BearerToken": token},
            api_key_prefix={"BearerToken": "Bearer"},
        )
        configuration.ssl_ca_cert = ca_file
        configuration.verify_ssl = verify_tls
        return cls(k8s_client.ApiClient(configuration))

    async def close(self) -> None:
        await self._api.close()

    async def _send(
        self,
        method: str,
        path: str,
        *,
        query: Sequence[tuple[str, str]] = (),
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
        timeout: aiohttp.ClientTimeout = _REQUEST_TIMEOUT,
    ) -> aiohttp.ClientResponse:
        try:
            resp: aiohttp.ClientResponse = await self._api.call_api(
                path,
                method,
                query_params=list(query),
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=dict(body) if body is not None else None,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=timeout,
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise KubernetesError(
                f"{method} {path}: no answer from the API server ({type(e).__name__}: {e})"
            ) from None
        except ApiException as e:
            raise KubernetesError(f"{method} {path}: {e.reason}", status=e.status or 0) from None
        return resp

    async def _json(
        self,
        method: str,
        path: str,
        *,
        query: Sequence[tuple[str, str]] = (),
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> JsonObject:
        resp = await self._send(method, path, query=query, body=body, content_type=content_type)
        try:
            data = await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise KubernetesError(f"{method} {path}: answer cut short ({e})") from None
        finally:
            resp.release()
        if not 200 <= resp.status < 300:
            raise _status_error(resp.status, data, f"{method} {path}")
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise KubernetesError(
                f"{method} {path}: answer is not JSON", status=resp.status
            ) from None
        if not isinstance(doc, dict):
            raise KubernetesError(
                f"{method} {path}: answer is not a JSON object", status=resp.status
            )
        return doc

    # -- reads -------------------------------------------------------------------------

    async def list(
        self, kind: ResourceKind, namespace: str | None = None, *, page_size: int = 500
    ) -> tuple[list[JsonObject], str]:
        """All objects of ``kind`` and the list's resourceVersion (where a watch resumes).

        Pages with ``limit``/``continue``; if a continue token expires mid-list
        (410) the list starts over, because pages from two snapshots must not mix.
        """
        path = kind.collection_path(namespace)
        for _attempt in range(3):
            items: list[JsonObject] = []
            token = ""
            try:
                while True:
                    query = [("limit", str(page_size))]
                    if token:
                        query.append(("continue", token))
                    page = await self._json("GET", path, query=query)
                    raw_items = page.get("items") or []
                    if not isinstance(raw_items, list):
                        raise KubernetesError(f"GET {path}: 'items' is not a list")
                    items.extend(i for i in raw_items if isinstance(i, dict))
                    meta = page.get("metadata")
                    meta = meta if isinstance(meta, dict) else {}
                    token = str(meta.get("continue") or "")
                    if not token:
                        return items, str(meta.get("resourceVersion") or "")
            except KubernetesError as e:
                if e.gone and token:
                    log.info("list %s: continue token expired, listing again", kind.plural)
                    continue
                raise
        raise KubernetesError(f"GET {path}: the list kept expiring while paging", status=410)

    @asynccontextmanager
    async def watch(
        self,
        kind: ResourceKind,
        resource_version: str,
        *,
        timeout_seconds: int,
        namespace: str | None = None,
    ) -> AsyncIterator[AsyncIterator[WatchEvent]]:
        """A watch from ``resource_version`` with bookmarks, as an async iterator of events.

        The server ends the stream after ``timeout_seconds``; silence for longer
        than that plus a margin means a dead connection and raises.
        """
        path = kind.collection_path(namespace)
        query = [
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(timeout_seconds)),
        ]
        if resource_version:
            query.append(("resourceVersion", resource_version))
        timeout = aiohttp.ClientTimeout(connect=10, sock_connect=10, sock_read=timeout_seconds + 15)
        resp = await self._send("GET", path, query=query, timeout=timeout)
        try:
            if resp.status != 200:
                try:
                    data = await resp.read()
                except (aiohttp.ClientError, OSError, TimeoutError):
                    data = b""
                raise _status_error(resp.status, data, f"watch {path}")
            yield self._events(resp, path)
        finally:
            resp.close()

    @staticmethod
    async def _events(resp: aiohttp.ClientResponse, path: str) -> AsyncIterator[WatchEvent]:
        while True:
            try:
                line = await resp.content.readuntil(b"\n", max_size=MAX_LINE_BYTES)
            except (ValueError, HttpProcessingError):
                raise KubernetesError(
                    f"watch {path}: an event exceeded {MAX_LINE_BYTES} bytes"
                ) from None
            except (aiohttp.ClientError, OSError, TimeoutError, asyncio.IncompleteReadError) as e:
                raise KubernetesError(
                    f"watch {path}: connection lost ({type(e).__name__})"
                ) from None
            if not line:
                return  # the server ended the watch (timeoutSeconds)
            line = line.strip()
            if not line:
                continue
            try:
                yield parse_watch_line(line)
            except WatchProtocolError as e:
                raise KubernetesError(f"watch {path}: {e}") from None

    async def served_versions(self, group: str) -> tuple[str, ...]:
        """The versions the server offers for an API group (API discovery); [] if none.

        ``""`` is the core group (``GET /api``); others are ``GET /apis/<group>``.
        A 404 means the group is not served at all (an uninstalled CRD, a server
        too old or too new); any other failure raises.
        """
        path = "/api" if not group else f"/apis/{group}"
        try:
            doc = await self._json("GET", path)
        except KubernetesError as e:
            if e.not_found:
                return ()
            raise
        versions: list[str] = []
        for entry in doc.get("versions") or []:
            if isinstance(entry, str):  # /api answers a list of strings
                versions.append(entry)
            elif isinstance(entry, dict) and isinstance(entry.get("version"), str):
                versions.append(entry["version"])
        return tuple(versions)

    async def get(self, kind: ResourceKind, namespace: str | None, name: str) -> JsonObject:
        return await self._json("GET", kind.object_path(namespace, name))

    async def get_optional(
        self, kind: ResourceKind, namespace: str | None, name: str
    ) -> JsonObject | None:
        """Like :meth:`get`, but None for 404."""
        try:
            return await self.get(kind, namespace, name)
        except KubernetesError as e:
            if e.not_found:
                return None
            raise

    # -- writes ------------------------------------------------------------------------

    async def create(
        self, kind: ResourceKind, namespace: str | None, body: Mapping[str, Any]
    ) -> JsonObject:
        """POST; raises KubernetesError(409) when the object already exists."""
        return await self._json("POST", kind.collection_path(namespace), body=body)

    async def replace(
        self, kind: ResourceKind, namespace: str | None, name: str, body: Mapping[str, Any]
    ) -> JsonObject:
        """PUT; with ``metadata.resourceVersion`` set, 409 means someone wrote first."""
        return await self._json("PUT", kind.object_path(namespace, name), body=body)

    async def patch_status(
        self, kind: ResourceKind, namespace: str | None, name: str, patch: Mapping[str, Any]
    ) -> JsonObject:
        """A JSON merge patch on the status subresource (never touches the spec)."""
        return await self._json(
            "PATCH",
            kind.object_path(namespace, name, "status"),
            body=patch,
            content_type=_MERGE_PATCH,
        )

    async def create_token_review(self, token: str, audiences: Sequence[str]) -> JsonObject:
        """POST authentication.k8s.io/v1 TokenReview; returns the review with its status."""
        body = {
            "apiVersion": TOKEN_REVIEWS.api_version,
            "kind": TOKEN_REVIEWS.kind,
            "spec": {"token": token, "audiences": list(audiences)},
        }
        return await self._json("POST", TOKEN_REVIEWS.collection_path(), body=body)
