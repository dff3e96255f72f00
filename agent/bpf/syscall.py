"""The agent's name for :mod:`node.bpf` (raw bpf(2) calls), kept for its callers.

The code lives in node/ because the ztunnel needs it too and must not
import the agent.
"""

from node.bpf import *  # noqa: F403
from node.bpf import __all__ as __all__
