"""The controller's one current RegistryState, and who is told when it changes.

Registry sources (the YAML file watcher, the Kubernetes watcher) build complete
states and :meth:`RegistryHolder.publish` them; the swap is a single reference
assignment, so readers (the Identity service checking node-scoped issuance, the
Discovery hub) always see one consistent state. A source that fails calls
:meth:`RegistryHolder.report_error`: the previous state keeps serving and the
error stays visible in :attr:`RegistryHolder.last_error` until a good state
replaces it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from controller.api.model import RegistryState

from .errors import RegistryError

__all__ = ["RegistryHolder", "RegistryStatus", "describe_state"]

log = logging.getLogger("veil.controller.registry")

Listener = Callable[[RegistryState], object]  # the return value is ignored


def _count(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"


def describe_state(state: RegistryState) -> str:
    """A one-line summary for logs and the startup line."""
    enrolled = sum(1 for w in state.workloads if w.enrolled)
    nodes = len({w.node for w in state.workloads})
    return ", ".join(
        (
            _count(len(state.namespaces), "namespace"),
            f"{_count(len(state.workloads), 'workload')} ({enrolled} enrolled) on "
            f"{_count(nodes, 'node')}",
            _count(len(state.services), "service"),
            _count(
                len(state.authorization_policies), "authorization policy", "authorization policies"
            ),
            _count(len(state.peer_authentications), "peer authentication"),
            _count(len(state.request_authentications), "request authentication"),
        )
    )


@dataclass(frozen=True, slots=True)
class RegistryStatus:
    """What an operator needs to know about the registry right now."""

    generation: int  # number of states published so far
    loaded_at: float | None  # wall-clock time of the last successful publish
    source: str  # where the current state came from
    last_error: str | None  # the failure that is being ignored, if any
    last_error_at: float | None
    summary: str
    # A valid version held back because it removes too much at once (a torn
    # write looks like that), and why; None when nothing is waiting.
    held: str | None = None
    # Warnings about the current state (see controller.registry.lint).
    warnings: tuple[str, ...] = ()


class RegistryHolder:
    """Holds the current state; sources publish, consumers read or subscribe.

    All methods are meant to be called from the controller's event loop thread;
    listeners run synchronously inside :meth:`publish`.
    """

    def __init__(
        self, initial: RegistryState | None = None, *, trust_domain: str | None = None
    ) -> None:
        self._state = (
            initial
            if initial is not None
            else RegistryState(trust_domain=trust_domain or RegistryState().trust_domain)
        )
        self._trust_domain = trust_domain
        self._listeners: list[Listener] = []
        self._generation = 0
        self._loaded_at: float | None = None
        self._source = "empty"
        self._last_error: RegistryError | None = None
        self._last_error_at: float | None = None
        self._held: str | None = None
        self._warnings: tuple[str, ...] = ()

    def current(self) -> RegistryState:
        return self._state

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def last_error(self) -> RegistryError | None:
        """The most recent source failure since the last good publish, else None."""
        return self._last_error

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Calls ``listener(state)`` on every publish; returns the unsubscribe function."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def publish(self, state: RegistryState, *, source: str = "") -> None:
        """Makes ``state`` current and notifies listeners; clears ``last_error``.

        Raises RegistryError (and changes nothing) when the state's trust domain
        is not the controller's: identities in it would not verify.
        """
        if self._trust_domain is not None and state.trust_domain != self._trust_domain:
            raise RegistryError(
                f"trustDomain {state.trust_domain!r} differs from the controller's trust domain "
                f"{self._trust_domain!r}",
                hint="set trustDomain to the controller's (or start the controller with "
                "--trust-domain matching the registry)",
                where=source,
                field="trustDomain",
            )
        self._state = state
        self._generation += 1
        self._loaded_at = time.time()
        self._source = source or self._source
        self._last_error = None
        self._last_error_at = None
        for listener in list(self._listeners):
            try:
                listener(state)
            except Exception:
                # One broken consumer must not stop the others from seeing the state.
                log.exception("registry listener %r failed", listener)

    def report_error(self, error: RegistryError) -> None:
        """Records a source failure; the current state stays in service."""
        self._last_error = error
        self._last_error_at = time.time()
        log.error(
            "registry update rejected, still serving the previous registry (generation %d): %s",
            self._generation,
            error,
        )

    def clear_error(self) -> None:
        """The source is back to the content of the current state (e.g. a restored file)."""
        if self._last_error is not None:
            log.info("registry source is valid again; the error is cleared")
        self._last_error = None
        self._last_error_at = None

    def note_held(self, reason: str | None) -> None:
        """Records (or, with None, clears) a version that waits before it is applied."""
        self._held = reason

    def set_warnings(self, warnings: tuple[str, ...]) -> None:
        """The source's warnings about the current state, shown in :meth:`status`."""
        self._warnings = warnings

    @property
    def warnings(self) -> tuple[str, ...]:
        return self._warnings

    def status(self) -> RegistryStatus:
        return RegistryStatus(
            generation=self._generation,
            loaded_at=self._loaded_at,
            source=self._source,
            last_error=str(self._last_error) if self._last_error is not None else None,
            last_error_at=self._last_error_at,
            summary=describe_state(self._state),
            held=self._held,
            warnings=self._warnings,
        )
