"""Operations endpoints: admin (loopback), Prometheus metrics, readiness."""

from .dump import config_dump
from .readiness import Readiness, ReadinessCheck, ReadinessResult
from .server import ConnectionsProvider, OpsServer, register_state_gauges

__all__ = [
    "ConnectionsProvider",
    "OpsServer",
    "Readiness",
    "ReadinessCheck",
    "ReadinessResult",
    "config_dump",
    "register_state_gauges",
]
