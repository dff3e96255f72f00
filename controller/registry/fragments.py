"""Registry documents parsed one by one, then assembled into one state.

A registry may be one file or a directory of files (one per namespace or team,
as GitOps repositories are usually laid out). Each document becomes a
:class:`RegistryFragment` on its own, so when one file of a large registry
changes only that file is parsed again; :func:`assemble` then merges the cached
fragments and runs the whole-registry checks of :func:`build_state`, which is
cheap next to YAML parsing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

from controller.api.model import (
    AuthorizationPolicy,
    Namespace,
    PeerAuthentication,
    RegistryState,
    RequestAuthentication,
    Resource,
    ResourceType,
    Service,
    Workload,
)
from controller.api.spiffe import DEFAULT_TRUST_DOMAIN

from .build import build_state
from .errors import RegistryError

__all__ = ["RegistryFragment", "assemble", "rebase"]


@dataclass(frozen=True, slots=True)
class RegistryFragment:
    """The objects of one document, validated one by one (not yet against each other)."""

    source: str  # the file it came from
    trust_domain: str | None  # None when the document does not set one
    namespaces: tuple[Namespace, ...] = ()
    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    authorization_policies: tuple[AuthorizationPolicy, ...] = ()
    peer_authentications: tuple[PeerAuthentication, ...] = ()
    request_authentications: tuple[RequestAuthentication, ...] = ()
    # Resource key -> where it is in the document, e.g. "workloads[3] (shop/checkout)".
    origin: Mapping[tuple[ResourceType, str], str] = field(default_factory=dict)
    # Whether the document names any object list (``workloads: []`` counts).
    declares_objects: bool = True

    def resources(self) -> tuple[Resource, ...]:
        return (
            *self.namespaces,
            *self.workloads,
            *self.services,
            *self.authorization_policies,
            *self.peer_authentications,
            *self.request_authentications,
        )


def _trust_domain(fragments: Sequence[RegistryFragment]) -> str:
    declared = {f.source: f.trust_domain for f in fragments if f.trust_domain is not None}
    domains = set(declared.values())
    if len(domains) > 1:
        listing = ", ".join(f"{src}: {td}" for src, td in declared.items())
        raise RegistryError(
            f"the registry files declare different trust domains ({listing})",
            hint="set trustDomain in one file only, or the same value everywhere",
            field="trustDomain",
        )
    return domains.pop() if domains else DEFAULT_TRUST_DOMAIN


def assemble(fragments: Sequence[RegistryFragment]) -> RegistryState:
    """One validated state from the fragments of every registry document.

    Errors name the document and the object (``registry.d/shop.yaml:
    workloads[3] (shop/checkout): ...``); with a single document its name
    prefixes the message instead, as for any error in that file.
    """
    if not any(f.declares_objects for f in fragments):
        # An empty mesh must be written on purpose, never be what a torn or
        # truncated write left behind (that would unenroll every pod).
        err = RegistryError(
            "the registry lists no objects: none of namespaces, workloads, services, "
            "authorizationPolicies, peerAuthentications, requestAuthentications is present",
            hint="to empty the mesh on purpose, write `workloads: []`",
        )
        raise err.located(fragments[0].source) if len(fragments) == 1 else err
    if len(fragments) == 1:
        (only,) = fragments
        try:
            return build_state(
                _trust_domain(fragments),
                only.namespaces,
                only.workloads,
                only.services,
                only.authorization_policies,
                only.peer_authentications,
                only.request_authentications,
                origin=only.origin,
            )
        except RegistryError as e:
            raise e.located(only.source) from None

    trust_domain = _trust_domain(fragments)
    origin = _Origins(fragments)
    return build_state(
        trust_domain,
        (n for f in fragments for n in f.namespaces),
        (w for f in fragments for w in f.workloads),
        (s for f in fragments for s in f.services),
        (p for f in fragments for p in f.authorization_policies),
        (a for f in fragments for a in f.peer_authentications),
        (r for f in fragments for r in f.request_authentications),
        origin=origin,
    )


class _Origins(Mapping[tuple[ResourceType, str], str]):
    """Where each key is, across documents: ``<file>: workloads[3] (shop/checkout)``.

    Built with dict operations only and formatted on lookup, because it is read
    only to name an object in an error. Construction also finds a key declared
    in two documents, which is itself an error.
    """

    def __init__(self, fragments: Sequence[RegistryFragment]) -> None:
        self._fragments = fragments
        self._owner: dict[tuple[ResourceType, str], int] = {}
        for i, fragment in enumerate(fragments):
            clash = self._owner.keys() & fragment.origin.keys()
            if clash:
                key = min(clash)
                raise RegistryError(
                    f"duplicate key {key[1]}; {self[key]} has the same name",
                    hint="names are unique per namespace (per kind) across all registry files",
                    where=f"{fragment.source}: {fragment.origin[key]}",
                )
            self._owner.update(dict.fromkeys(fragment.origin, i))

    def __getitem__(self, key: tuple[ResourceType, str]) -> str:
        fragment = self._fragments[self._owner[key]]
        return f"{fragment.source}: {fragment.origin[key]}"

    def __iter__(self) -> Iterator[tuple[ResourceType, str]]:
        return iter(self._owner)

    def __len__(self) -> int:
        return len(self._owner)


def rebase(fragments: Sequence[RegistryFragment], state: RegistryState) -> list[RegistryFragment]:
    """The fragments holding the objects as built into ``state`` (enrolled, endpoints set).

    Cached fragments rebased this way make the next :func:`assemble` reuse the
    built instances instead of rebuilding 10,000 workloads after every edit. A
    fragment whose objects are already the built ones is returned as is.
    """
    workloads = {w.key: w for w in state.workloads}
    services = {s.key: s for s in state.services}
    out = []
    for fragment in fragments:
        wl = tuple(workloads.get(w.key, w) for w in fragment.workloads)
        svc = tuple(services.get(s.key, s) for s in fragment.services)
        same = all(a is b for a, b in zip(wl, fragment.workloads, strict=True)) and all(
            a is b for a, b in zip(svc, fragment.services, strict=True)
        )
        out.append(fragment if same else replace(fragment, workloads=wl, services=svc))
    return out
