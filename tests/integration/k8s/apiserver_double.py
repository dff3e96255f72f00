"""A Kubernetes API server test double: real REST JSON and watch streams on loopback.

There is no kube-apiserver we can run here, so Kubernetes-mode tests talk to this
aiohttp server instead. It speaks the wire protocol the real one does, for the
types Veil uses:

* lists with ``limit``/``continue`` pages and ``metadata.resourceVersion``;
* watches (``?watch=true``) as chunked JSON lines: ADDED, MODIFIED, DELETED,
  BOOKMARK (when ``allowWatchBookmarks=true``) and ERROR events, ending after
  ``timeoutSeconds``; a watch from a compacted resourceVersion gets ``410 Gone``
  either as an ERROR event carrying a ``Status`` (what kube-apiserver does) or as
  an HTTP 410 (what some proxies and older servers do), selectable per test;
* GET/POST/PUT/DELETE with ``409 Conflict`` on stale resourceVersions and
  ``AlreadyExists``; JSON merge patches on the ``status`` subresource;
* TokenReview (authentication.k8s.io/v1) for tokens a test registers, with
  audiences, expiry and the bound-pod claims of projected tokens;
* bearer-token authentication of every request.

Tests drive it directly: :meth:`put`/:meth:`delete` change objects (and emit
watch events), :meth:`compact` makes old versions 410, :meth:`drop_watches`
cuts every watch connection mid-stream, :meth:`inject_watch_error` sends an
ERROR event.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["ApiServerDouble", "RegisteredToken"]

Obj = dict[str, Any]


@dataclass(frozen=True)
class _Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


_RESOURCES = {
    r.plural: r
    for r in (
        _Resource("", "v1", "namespaces", "Namespace", False),
        _Resource("", "v1", "pods", "Pod", True),
        _Resource("", "v1", "serviceaccounts", "ServiceAccount", True),
        _Resource("", "v1", "services", "Service", True),
        _Resource("", "v1", "secrets", "Secret", True),
        _Resource("", "v1", "configmaps", "ConfigMap", True),
        _Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
        _Resource("security.veil.io", "v1", "authorizationpolicies", "AuthorizationPolicy", True),
        _Resource("security.veil.io", "v1", "peerauthentications", "PeerAuthentication", True),
        _Resource(
            "security.veil.io", "v1", "requestauthentications", "RequestAuthentication", True
        ),
        _Resource("coordination.k8s.io", "v1", "leases", "Lease", True),
        _Resource("authentication.k8s.io", "v1", "tokenreviews", "TokenReview", False),
    )
}
_WITH_GENERATION = {"authorizationpolicies", "peerauthentications", "requestauthentications"}


def _status(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _error(code: int, reason: str, message: str) -> web.Response:
    return web.json_response(_status(code, reason, message), status=code)


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge(result.get(key), value)
    return result


@dataclass
class RegisteredToken:
    username: str
    audiences: tuple[str, ...] = ("veil",)
    pod_name: str = ""
    pod_uid: str = ""
    node_name: str = ""
    expires_at: float | None = None  # time.time()


@dataclass(eq=False)
class _Watcher:
    resource: _Resource
    namespace: str | None
    queue: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)


@dataclass
class _Event:
    rv: int
    plural: str
    type: str
    obj: Obj


class ApiServerDouble:
    def __init__(self, token: str = "controller-token") -> None:
        self.token = token
        self.objects: dict[tuple[str, str, str], Obj] = {}  # (plural, ns, name)
        self.events: list[_Event] = []
        self.rv = 1000
        self.compacted_rv = 0
        self.gone_as_http = False  # 410 as HTTP status instead of an ERROR event
        self.bookmark_interval = 0.5
        self.validate_bound_pods = True  # like kube-apiserver: a token dies with its pod
        self.tokens: dict[str, RegisteredToken] = {}
        self.requests: list[tuple[str, str]] = []
        self.status_patches: list[tuple[str, str, str, Obj]] = []
        self.fail_next: dict[tuple[str, str], int] = {}  # (method, plural) -> HTTP status
        self.fail_always: dict[tuple[str, str], int] = {}  # the same, until removed
        self.expire_next_continue = False  # the next list page request gets 410 Expired
        # API discovery (GET /apis/<group>): the versions each group serves.
        self.served_groups: dict[str, list[str]] = {
            "discovery.k8s.io": ["v1"],
            "security.veil.io": ["v1"],
            "coordination.k8s.io": ["v1"],
            "authentication.k8s.io": ["v1"],
        }
        self._watchers: set[_Watcher] = set()
        self._pages: dict[str, list[Obj]] = {}
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- what tests call ---------------------------------------------------------------

    def _next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def _emit(self, plural: str, etype: str, obj: Obj) -> None:
        ev = _Event(self.rv, plural, etype, copy.deepcopy(obj))
        self.events.append(ev)
        for w in list(self._watchers):
            if w.resource.plural == plural and (
                w.namespace is None or w.namespace == obj["metadata"].get("namespace")
            ):
                w.queue.put_nowait(("event", ev))

    def put(self, plural: str, obj: Mapping[str, Any]) -> Obj:
        """Creates or replaces an object (as a controller-less `kubectl apply` would)."""
        res = _RESOURCES[plural]
        new = copy.deepcopy(dict(obj))
        meta = new.setdefault("metadata", {})
        ns = meta.get("namespace", "") if res.namespaced else ""
        if res.namespaced and not ns:
            raise ValueError(f"{plural} needs metadata.namespace")
        key = (plural, ns, meta["name"])
        old = self.objects.get(key)
        new.setdefault("apiVersion", res.api_version)
        new.setdefault("kind", res.kind)
        meta["uid"] = meta.get("uid") or (old["metadata"]["uid"] if old else str(uuid.uuid4()))
        meta.setdefault(
            "creationTimestamp",
            old["metadata"]["creationTimestamp"] if old else time.strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        if plural in _WITH_GENERATION:
            gen = old["metadata"].get("generation", 1) if old else 0
            if old is None or old.get("spec") != new.get("spec"):
                gen += 1
            meta["generation"] = gen
            if old is not None and "status" in old and "status" not in new:
                new["status"] = copy.deepcopy(old["status"])
        meta["resourceVersion"] = str(self._next_rv())
        self.objects[key] = new
        self._emit(plural, "MODIFIED" if old else "ADDED", new)
        return copy.deepcopy(new)

    def get(self, plural: str, namespace: str, name: str) -> Obj | None:
        obj = self.objects.get((plural, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def delete(self, plural: str, namespace: str, name: str) -> None:
        obj = self.objects.pop((plural, namespace, name))
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self._next_rv())
        self._emit(plural, "DELETED", obj)

    def compact(self) -> None:
        """Forgets history: watches from any version older than the current one get 410 Gone."""
        self.compacted_rv = self.rv
        self.events.clear()

    def drop_watches(self) -> None:
        """Cuts every open watch connection without ending the chunked stream."""
        for w in list(self._watchers):
            w.queue.put_nowait(("drop", None))

    def inject_watch_error(self, code: int = 410, reason: str = "Expired") -> None:
        """Sends an ERROR event carrying a Status to every open watch, then ends it."""
        for w in list(self._watchers):
            w.queue.put_nowait(("error", _status(code, reason, f"injected error {code}")))

    @property
    def open_watches(self) -> int:
        return len(self._watchers)

    def register_token(self, token: str, info: RegisteredToken) -> None:
        self.tokens[token] = info

    # -- HTTP ------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return _error(401, "Unauthorized", "Unauthorized")
        parts = [p for p in request.path.split("/") if p]
        if parts == ["api"]:
            return web.json_response({"kind": "APIVersions", "versions": ["v1"]})
        if len(parts) == 2 and parts[0] == "apis":
            versions = self.served_groups.get(parts[1])
            if not versions:
                return _error(404, "NotFound", f"the server could not find {request.path}")
            return web.json_response(
                {
                    "kind": "APIGroup",
                    "name": parts[1],
                    "versions": [
                        {"groupVersion": f"{parts[1]}/{v}", "version": v} for v in versions
                    ],
                }
            )
        if parts[:2] == ["api", "v1"]:
            rest = parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            rest = parts[3:]
        else:
            return _error(404, "NotFound", f"the server could not find {request.path}")
        ns: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] in _RESOURCES:
            ns, rest = rest[1], rest[2:]
        if not rest or rest[0] not in _RESOURCES:
            return _error(404, "NotFound", f"the server could not find {request.path}")
        res = _RESOURCES[rest[0]]
        failing = self.fail_next.pop((request.method, res.plural), 0)
        failing = failing or self.fail_always.get((request.method, res.plural), 0)
        if failing == 403:
            return _error(
                403,
                "Forbidden",
                f'{res.plural} is forbidden: User "system:serviceaccount:veil-system:'
                f'veil-controller" cannot list resource "{res.plural}"',
            )
        if failing:
            return _error(failing, "InternalError", f"injected failure {failing}")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else ""
        if name is None:
            if request.method == "GET":
                if request.query.get("watch") in ("true", "1"):
                    return await self._watch(request, res, ns)
                return self._list(request, res, ns)
            if request.method == "POST":
                body = await request.json()
                if res.plural == "tokenreviews":
                    return self._token_review(body)
                return self._create(res, ns, body)
            return _error(405, "MethodNotAllowed", request.method)
        key = (res.plural, ns or "", name)
        if request.method == "GET":
            obj = self.objects.get(key)
            if obj is None:
                return _error(404, "NotFound", f'{res.plural} "{name}" not found')
            return web.json_response(obj)
        if request.method == "PUT":
            return self._replace(res, key, await request.json())
        if request.method == "PATCH":
            return await self._patch(request, res, key, sub)
        if request.method == "DELETE":
            if key not in self.objects:
                return _error(404, "NotFound", f'{res.plural} "{name}" not found')
            self.delete(*key)
            return web.json_response(_status(200, "", "deleted") | {"status": "Success"})
        return _error(405, "MethodNotAllowed", request.method)

    def _scoped(self, res: _Resource, ns: str | None) -> list[Obj]:
        items = [
            o
            for (plural, ons, _), o in sorted(self.objects.items())
            if plural == res.plural and (ns is None or ons == ns)
        ]
        return [copy.deepcopy(o) for o in items]

    def _list(self, request: web.Request, res: _Resource, ns: str | None) -> web.Response:
        limit = int(request.query.get("limit", "0") or 0)
        token = request.query.get("continue", "")
        if token and self.expire_next_continue:
            self.expire_next_continue = False
            self._pages.pop(token, None)
        if token:
            if token not in self._pages:
                return _error(410, "Expired", "the provided continue parameter is too old")
            items, rv = self._pages.pop(token), int(token.split(":")[0])
        else:
            items, rv = self._scoped(res, ns), self.rv
        page, rest = (items[:limit], items[limit:]) if limit else (items, [])
        meta: Obj = {"resourceVersion": str(rv)}
        if rest:
            nxt = f"{rv}:{base64.urlsafe_b64encode(uuid.uuid4().bytes).decode()}"
            self._pages[nxt] = rest
            meta["continue"] = nxt
        return web.json_response(
            {
                "kind": f"{res.kind}List",
                "apiVersion": res.api_version,
                "metadata": meta,
                "items": page,
            }
        )

    async def _watch(
        self, request: web.Request, res: _Resource, ns: str | None
    ) -> web.StreamResponse:
        rv_param = request.query.get("resourceVersion", "")
        since = int(rv_param) if rv_param.isdigit() else None
        bookmarks = request.query.get("allowWatchBookmarks") == "true"
        timeout = float(request.query.get("timeoutSeconds", "1800"))
        too_old = since is not None and since != 0 and since < self.compacted_rv
        if too_old and self.gone_as_http:
            return _error(
                410, "Expired", f"too old resource version: {since} ({self.compacted_rv})"
            )
        watcher = _Watcher(res, ns)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)

        async def send(etype: str, obj: Obj) -> None:
            await resp.write(json.dumps({"type": etype, "object": obj}).encode() + b"\n")

        if too_old:
            await send("ERROR", _status(410, "Expired", f"too old resource version: {since}"))
            await resp.write_eof()
            return resp
        self._watchers.add(watcher)
        try:
            if since is None or since == 0:
                for obj in self._scoped(res, ns):
                    await send("ADDED", obj)
            else:
                for ev in list(self.events):
                    if (
                        ev.rv > since
                        and ev.plural == res.plural
                        and (ns is None or ev.obj["metadata"].get("namespace") == ns)
                    ):
                        await send(ev.type, ev.obj)
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                wait = min(left, self.bookmark_interval) if bookmarks else left
                try:
                    what, item = await asyncio.wait_for(watcher.queue.get(), wait)
                except TimeoutError:
                    if bookmarks and self.bookmark_interval < left:
                        marker = {
                            "kind": res.kind,
                            "apiVersion": res.api_version,
                            "metadata": {"resourceVersion": str(self.rv)},
                        }
                        await send("BOOKMARK", marker)
                    continue
                if what == "event":
                    await send(item.type, item.obj)
                elif what == "error":
                    await send("ERROR", item)
                    break
                elif what == "drop":
                    # Close the socket without the final chunk: a dropped connection.
                    if request.transport is not None:
                        request.transport.abort()
                    return resp
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._watchers.discard(watcher)
        return resp

    def _create(self, res: _Resource, ns: str | None, body: Obj) -> web.Response:
        name = body.get("metadata", {}).get("name", "")
        if not name:
            return _error(422, "Invalid", "metadata.name: Required value")
        if (res.plural, ns or "", name) in self.objects:
            return _error(409, "AlreadyExists", f'{res.plural} "{name}" already exists')
        body.setdefault("metadata", {})["namespace"] = ns or ""
        if not res.namespaced:
            body["metadata"].pop("namespace")
        body["metadata"].pop("resourceVersion", None)
        return web.json_response(self.put(res.plural, body), status=201)

    def _replace(self, res: _Resource, key: tuple[str, str, str], body: Obj) -> web.Response:
        current = self.objects.get(key)
        if current is None:
            return _error(404, "NotFound", f'{res.plural} "{key[2]}" not found')
        want_rv = body.get("metadata", {}).get("resourceVersion")
        if want_rv and want_rv != current["metadata"]["resourceVersion"]:
            return _error(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {res.plural} "{key[2]}": the object has been '
                "modified; please apply your changes to the latest version and try again",
            )
        body["metadata"]["uid"] = current["metadata"]["uid"]
        return web.json_response(self.put(res.plural, body))

    async def _patch(
        self, request: web.Request, res: _Resource, key: tuple[str, str, str], sub: str
    ) -> web.Response:
        if request.content_type != "application/merge-patch+json":
            return _error(
                415, "UnsupportedMediaType", f"unsupported patch type {request.content_type}"
            )
        current = self.objects.get(key)
        if current is None:
            return _error(404, "NotFound", f'{res.plural} "{key[2]}" not found')
        patch = await request.json()
        want_rv = (patch.get("metadata") or {}).get("resourceVersion")
        if want_rv and want_rv != current["metadata"]["resourceVersion"]:
            return _error(409, "Conflict", "the object has been modified")
        updated = copy.deepcopy(current)
        if sub == "status":
            # The status subresource ignores everything but .status.
            updated["status"] = _merge(current.get("status"), patch.get("status"))
            self.status_patches.append((res.plural, key[1], key[2], patch))
        else:
            updated = _merge(current, {k: v for k, v in patch.items() if k != "status"})
        updated["metadata"]["resourceVersion"] = str(self._next_rv())
        self.objects[key] = updated
        self._emit(res.plural, "MODIFIED", updated)
        return web.json_response(updated)

    def _token_review(self, body: Obj) -> web.Response:
        spec = body.get("spec") or {}
        token = spec.get("token", "")
        wanted = list(spec.get("audiences") or [])
        review: Obj = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
        }
        info = self.tokens.get(token)
        error = ""
        if info is None:
            error = "[invalid bearer token, square/go-jose: error in cryptographic primitive]"
        elif info.expires_at is not None and info.expires_at <= time.time():
            error = "[invalid bearer token, service account token has expired]"
        elif wanted and not set(wanted) & set(info.audiences):
            error = f"[invalid bearer token, token audiences {list(info.audiences)} is invalid for the target audiences {wanted}]"
        elif self.validate_bound_pods and info.pod_name:
            ns = info.username.split(":")[2] if info.username.count(":") == 3 else ""
            pod = self.objects.get(("pods", ns, info.pod_name))
            if pod is None or pod["metadata"]["uid"] != info.pod_uid:
                error = "[invalid bearer token, service account token has been invalidated]"
        if error or info is None:
            review["status"] = {"authenticated": False, "error": error, "user": {}}
            return web.json_response(review, status=201)
        extra: dict[str, list[str]] = {}
        if info.pod_name:
            extra["authentication.kubernetes.io/pod-name"] = [info.pod_name]
            extra["authentication.kubernetes.io/pod-uid"] = [info.pod_uid]
        if info.node_name:
            extra["authentication.kubernetes.io/node-name"] = [info.node_name]
        review["status"] = {
            "authenticated": True,
            "user": {
                "username": info.username,
                "uid": str(uuid.uuid5(uuid.NAMESPACE_OID, info.username)),
                "groups": ["system:serviceaccounts", "system:authenticated"],
                "extra": extra,
            },
            "audiences": [a for a in wanted if a in info.audiences] or list(info.audiences),
        }
        return web.json_response(review, status=201)
