"""The controller's workload registry: sources, validation and the current state.

Sources turn their input into one :class:`~controller.api.model.RegistryState`:
the YAML file (:mod:`.document`, watched by :mod:`.watcher`) and, in a cluster,
the Kubernetes API (which reuses :mod:`.policy` and :func:`build_state`). The
:class:`RegistryHolder` keeps the last good state and tells the Discovery hub
about every new one.
"""

from .build import Origin, build_state, describe, is_enrolled
from .changes import RegistryChange, diff_states
from .document import parse_fragment, parse_registry, parse_registry_bytes, read_registry_file
from .errors import RegistryError
from .fragments import RegistryFragment, assemble
from .holder import RegistryHolder, RegistryStatus, describe_state
from .lint import registry_warnings
from .policy import (
    parse_authorization_policy,
    parse_peer_authentication,
    parse_request_authentication,
)
from .watcher import (
    DEFAULT_HOLD_SECONDS,
    DEFAULT_SETTLE_SECONDS,
    RegistryFileWatcher,
    list_registry_files,
)

__all__ = [
    "DEFAULT_HOLD_SECONDS",
    "DEFAULT_SETTLE_SECONDS",
    "Origin",
    "RegistryChange",
    "RegistryError",
    "RegistryFileWatcher",
    "RegistryFragment",
    "RegistryHolder",
    "RegistryStatus",
    "assemble",
    "build_state",
    "describe",
    "describe_state",
    "diff_states",
    "is_enrolled",
    "list_registry_files",
    "parse_authorization_policy",
    "parse_fragment",
    "parse_peer_authentication",
    "parse_registry",
    "parse_registry_bytes",
    "parse_request_authentication",
    "read_registry_file",
    "registry_warnings",
]
