"""Per-request endpoint choice: least outstanding requests, round robin on ties.

Each request picks again (not each connection), so one keep-alive client does
not pin one backend. The counts are this process's in-flight requests per
endpoint; :meth:`Balancer.pick` is synchronous and the caller releases the
endpoint when the response is done.
"""

from __future__ import annotations

from collections.abc import Sequence

from .view import Endpoint

__all__ = ["Balancer"]


class Balancer:
    def __init__(self) -> None:
        self._active: dict[tuple[str, int], int] = {}
        self._turn = 0

    def pick(self, endpoints: Sequence[Endpoint]) -> Endpoint:
        """The endpoint with the fewest requests in flight; raises IndexError when empty."""
        if not endpoints:
            raise IndexError("no endpoints")
        self._turn += 1
        n = len(endpoints)
        best = endpoints[self._turn % n]
        best_load = self._active.get(best.key, 0)
        for i in range(1, n):
            e = endpoints[(self._turn + i) % n]
            load = self._active.get(e.key, 0)
            if load < best_load:
                best, best_load = e, load
        self._active[best.key] = best_load + 1
        return best

    def release(self, endpoint: Endpoint) -> None:
        left = self._active.get(endpoint.key, 0) - 1
        if left > 0:
            self._active[endpoint.key] = left
        else:
            self._active.pop(endpoint.key, None)

    def in_flight(self) -> dict[str, int]:
        return {f"{ip}:{port}": n for (ip, port), n in sorted(self._active.items())}
