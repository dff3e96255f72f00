"""Fixtures for Kubernetes-mode tests: the API server double on its own thread.

The double runs on a private event loop in a background thread, like a real API
server in another process. That matters: the CA Secret store makes synchronous
calls (the CA signs inside a lock), which would deadlock against a server that
shares the test's event loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import pytest

from controller.k8s.client import KubeClient
from controller.k8s.leader import LeaseTiming
from controller.k8s.reflector import WatchSettings

from .apiserver_double import ApiServerDouble, RegisteredToken

T = TypeVar("T")

# Fast loops for tests: the production defaults wait seconds.
FAST_WATCH = WatchSettings(min_timeout=20, max_timeout=30, backoff_initial=0.05, backoff_cap=0.3)
FAST_LEASE = LeaseTiming(lease_duration=2.0, renew_deadline=1.5, retry_period=0.2)


class ThreadedApiServer:
    """Runs an :class:`ApiServerDouble` on its own loop; methods are thread-safe proxies."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="apiserver-double", daemon=True
        )
        self._thread.start()
        self.double = self._await(self._make())
        self.url = self._await(self.double.start())
        self.token = self.double.token

    @staticmethod
    async def _make() -> ApiServerDouble:
        return ApiServerDouble()

    def _await(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Runs ``fn`` on the server's loop and returns its result."""
        done: Future[T] = Future()

        def run() -> None:
            try:
                done.set_result(fn(*args, **kwargs))
            except BaseException as e:
                done.set_exception(e)

        self._loop.call_soon_threadsafe(run)
        return done.result(10)

    def put(self, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        return self.call(self.double.put, plural, obj)

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.call(self.double.get, plural, namespace, name)

    def delete(self, plural: str, namespace: str, name: str) -> None:
        self.call(self.double.delete, plural, namespace, name)

    def compact(self) -> None:
        self.call(self.double.compact)

    def drop_watches(self) -> None:
        self.call(self.double.drop_watches)

    def inject_watch_error(self, code: int = 410) -> None:
        self.call(self.double.inject_watch_error, code)

    def register_token(self, token: str, info: RegisteredToken) -> None:
        self.call(self.double.register_token, token, info)

    def set(self, **attrs: Any) -> None:
        def apply() -> None:
            for k, v in attrs.items():
                setattr(self.double, k, v)

        self.call(apply)

    def read(self, fn: Callable[[ApiServerDouble], T]) -> T:
        return self.call(fn, self.double)

    def client(self) -> KubeClient:
        return KubeClient.for_host(self.url, self.token)

    def close(self) -> None:
        try:
            self._await(self.double.stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()


@pytest.fixture
def apiserver() -> Iterator[ThreadedApiServer]:
    server = ThreadedApiServer()
    try:
        yield server
    finally:
        server.close()


async def eventually(
    check: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02, what: str = ""
) -> None:
    """Polls ``check`` until it holds; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(interval)
    assert check(), f"timed out after {timeout}s waiting for {what or check}"


def namespace(name: str, mode: str | None = None) -> dict[str, Any]:
    labels = {"veil.io/dataplane-mode": mode} if mode else {}
    return {"metadata": {"name": name, "labels": labels}}


def pod(
    name: str,
    ns: str,
    ip: str,
    *,
    node: str = "node-a",
    sa: str = "default",
    labels: dict[str, str] | None = None,
    ready: bool = True,
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "app"}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def authz(name: str, ns: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "security.veil.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }
