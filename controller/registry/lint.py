"""Warnings about a valid registry that probably does not do what its author meant.

Errors refuse a document; these only warn, because the state is well formed and
may be intended (a policy written ahead of the workloads it selects). Both
sources report them: the YAML watcher logs each new warning at WARNING and keeps
the list in :class:`~controller.registry.holder.RegistryStatus`, and the
Kubernetes converter adds them to its notes. Checked here:

* a principal (exact, or a ``prefix*`` that spells out the trust domain) in a
  trust domain other than the registry's: no peer of this mesh carries it;
* an AuthorizationPolicy with L7 terms (methods, paths, hosts, request
  principals, ``when``) but no ``targetRefs``: ztunnels enforce it and cannot
  see L7, so its ALLOW rules with L7 terms match nothing and its DENY rules
  deny on their L4 terms alone (attach it to a waypoint with ``targetRefs``);
* an AuthorizationPolicy or PeerAuthentication whose ``matchLabels`` selector
  matches no workload in its scope (its namespace, or every namespace for the
  root namespace).
"""

from __future__ import annotations

from collections import defaultdict

from controller.api.model import (
    ROOT_NAMESPACE,
    AuthorizationPolicy,
    Labels,
    PeerAuthentication,
    RegistryState,
    Workload,
)

__all__ = ["principal_trust_domain", "registry_warnings"]

_SCHEME = "spiffe://"


def principal_trust_domain(principal: str) -> str | None:
    """The trust domain a principal names, or None when a wildcard leaves it open."""
    body = principal[len(_SCHEME) :] if principal.startswith(_SCHEME) else principal
    if body.startswith("*"):
        return None
    td, slash, _ = body.partition("/")
    # "cluster.loc*" stops inside the trust domain: it is not spelt out.
    return td if slash and "*" not in td else None


def _foreign(policy: AuthorizationPolicy, trust_domain: str) -> list[str]:
    out: list[str] = []
    for r, rule in enumerate(policy.rules):
        for s, source in enumerate(rule.sources):
            for field, values in (
                ("principals", source.principals),
                ("notPrincipals", source.not_principals),
            ):
                for i, value in enumerate(values):
                    td = principal_trust_domain(value)
                    if td is not None and td != trust_domain:
                        out.append(
                            f"AuthorizationPolicy {policy.key}: "
                            f'field "spec.rules[{r}].from[{s}].source.{field}[{i}]": '
                            f"{value!r} is in trust domain {td!r}, not the mesh's "
                            f"{trust_domain!r}; no peer of this mesh can match it"
                        )
    return out


# ``when`` keys a ztunnel evaluates itself; every other key is L7.
_L4_CONDITION_KEYS = frozenset(
    {"source.principal", "source.namespace", "source.ip", "destination.port"}
)


def _l7_at_ztunnel(policy: AuthorizationPolicy) -> str | None:
    if policy.target_refs:
        return None
    l7 = any(
        any(c.key not in _L4_CONDITION_KEYS for c in rule.conditions)
        or any(s.request_principals or s.not_request_principals for s in rule.sources)
        or any(
            o.hosts or o.not_hosts or o.methods or o.not_methods or o.paths or o.not_paths
            for o in rule.operations
        )
        for rule in policy.rules
    )
    if not l7:
        return None
    effect = (
        "its rules with L7 terms match nothing"
        if policy.action.value == "ALLOW"
        else "its rules with L7 terms deny on their L4 terms alone"
    )
    return (
        f"AuthorizationPolicy {policy.key} has L7 terms but no targetRefs: ztunnels enforce "
        f"it and cannot see HTTP, so {effect}; attach it to a waypoint with targetRefs"
    )


def _selects_nothing(
    policy: AuthorizationPolicy | PeerAuthentication,
    by_namespace: dict[str, list[Workload]],
    everyone: tuple[Workload, ...],
) -> str | None:
    selector: Labels | None = policy.selector
    if selector is None or not len(selector):
        return None  # the whole namespace: normal even while it is empty
    scope = (
        everyone if policy.namespace == ROOT_NAMESPACE else by_namespace.get(policy.namespace, [])
    )
    if any(selector.matches(w.labels) for w in scope):
        return None
    kind = (
        "AuthorizationPolicy" if isinstance(policy, AuthorizationPolicy) else "PeerAuthentication"
    )
    labels = ", ".join(f"{k}={v}" for k, v in selector.items())
    where = (
        "any namespace" if policy.namespace == ROOT_NAMESPACE else f"namespace {policy.namespace}"
    )
    return (
        f'{kind} {policy.key}: field "spec.selector.matchLabels": {labels} matches no '
        f"workload in {where}; it applies to nothing until such a workload appears"
    )


def registry_warnings(state: RegistryState) -> tuple[str, ...]:
    """Every warning for ``state``, in a stable order (policies by key)."""
    by_namespace: dict[str, list[Workload]] = defaultdict(list)
    for w in state.workloads:
        by_namespace[w.namespace].append(w)
    out: list[str] = []
    for p in state.authorization_policies:
        out.extend(_foreign(p, state.trust_domain))
        for note in (_l7_at_ztunnel(p), _selects_nothing(p, by_namespace, state.workloads)):
            if note is not None:
                out.append(note)
    for a in state.peer_authentications:
        note = _selects_nothing(a, by_namespace, state.workloads)
        if note is not None:
            out.append(note)
    return tuple(out)
