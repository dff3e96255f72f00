"""Pure diffing of registry states, keyed by (resource type, key).

The hub keeps the published resources as a ``{(type, key): resource}`` map; a
new state is compared entry by entry. Resources are frozen dataclasses, so
equality is a field-by-field compare and an unchanged object that a source
passes through again (the same instance) costs one identity check.
"""

from __future__ import annotations

from collections.abc import Mapping

from controller.api.model import RegistryState, Resource, ResourceType, resource_key

__all__ = ["Change", "Key", "diff_resources", "index_state"]

Key = tuple[ResourceType, str]
# (key, the new resource) for an upsert, (key, None) for a removal.
Change = tuple[Key, Resource | None]


def index_state(state: RegistryState) -> dict[Key, Resource]:
    """Every resource of ``state`` by its (type, key); later duplicates win."""
    return {resource_key(r): r for r in state.resources()}


def diff_resources(old: Mapping[Key, Resource], new: Mapping[Key, Resource]) -> list[Change]:
    """What turns ``old`` into ``new``: upserts in ``new``'s order, then removals."""
    changes: list[Change] = []
    added = 0
    for key, resource in new.items():
        before = old.get(key)
        if before is None:
            added += 1
            changes.append((key, resource))
        elif before is not resource and before != resource:
            changes.append((key, resource))
    # Keys present in both maps number len(new) - added; only when ``old`` has
    # more than that did something disappear, so the common case skips the scan.
    if len(old) > len(new) - added:
        changes.extend((key, None) for key in old if key not in new)
    return changes
