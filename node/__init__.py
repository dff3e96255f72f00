"""Node-side identity: join with a token, keep node credentials, request SVIDs.

The agent and the ztunnel use :func:`load_node_credentials` and
:meth:`NodeCredentials.client` for their mTLS channel to the controller, and the
CSR helpers in :mod:`node.csr` for workload keys.
"""

from __future__ import annotations

from .credentials import (
    NodeCredentials,
    load_node_credentials,
    save_node_credentials,
    save_trust_bundle,
)
from .csr import build_csr, check_issued_chain, generate_key, key_pem
from .join import join, refresh_trust_bundle, renew_node_certificate, request_certificate
from .pinning import fetch_server_chain, select_pinned_root, split_host_port

__all__ = [
    "NodeCredentials",
    "build_csr",
    "check_issued_chain",
    "fetch_server_chain",
    "generate_key",
    "join",
    "key_pem",
    "load_node_credentials",
    "refresh_trust_bundle",
    "renew_node_certificate",
    "request_certificate",
    "save_node_credentials",
    "save_trust_bundle",
    "select_pinned_root",
    "split_host_port",
]
