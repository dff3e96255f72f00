"""A Kubernetes exec probe that costs almost nothing: ``python -m veil.probe``.

The ztunnel answers health checks on a unix socket private to its pod (see
:mod:`ztunnel.admin.health_socket`): one line in (``ready`` or ``live``), one
JSON object out. The kubelet runs the probe every few seconds on every node,
so the client lives here, in the foundation that imports only the standard
library: ``python -m veil.probe SOCKET [ready|live]`` starts in tens of
milliseconds, where ``veil ztunnel health`` loads every room's command line.

Exit codes: 0 healthy, 1 unhealthy or no answer, 2 usage.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from veil.errors import VeilError

__all__ = ["CHECKS", "ProbeUnavailable", "ask", "main"]

CHECKS = ("ready", "live")
_MAX_ANSWER = 65536


class ProbeUnavailable(VeilError):
    """The health socket is missing, did not answer, or answered nonsense."""


def ask(
    path: Path, check: str = "ready", timeout: float = 3.0, *, what: str = "health socket"
) -> dict[str, Any]:
    """Sends ``check`` to the health socket at ``path``; returns its JSON answer.

    ``what`` names the socket in errors (e.g. "ztunnel health socket").
    """
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}")
    data = b""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(check.encode() + b"\n")
            while not data.endswith(b"\n") and len(data) < _MAX_ANSWER:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except FileNotFoundError:
        raise ProbeUnavailable(
            f"no {what} at {path}",
            hint="the process has not started yet, or listens on another path",
        ) from None
    except OSError as e:
        raise ProbeUnavailable(
            f"the {what} {path} did not answer: {e.strerror or e}",
            hint="the process is starting, stopping or hung; see its log",
        ) from None
    try:
        body = json.loads(data)
        if not isinstance(body, dict) or not isinstance(body.get("ok"), bool):
            raise ValueError("no boolean 'ok'")
        return body
    except ValueError:
        raise ProbeUnavailable(
            f"the answer on {path} is not a health answer: {data[:80]!r}",
            hint="check that the path points at the process's health socket",
        ) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not 1 <= len(args) <= 2 or (len(args) == 2 and args[1] not in CHECKS):
        print("usage: python -m veil.probe SOCKET [ready|live]", file=sys.stderr)
        return 2
    check = args[1] if len(args) == 2 else "ready"
    try:
        answer = ask(Path(args[0]), check)
    except ProbeUnavailable as e:
        print(f"{check}: {e}", file=sys.stderr)
        return 1
    if answer["ok"]:
        return 0
    reasons = answer.get("reasons") or []
    print(f"{check}: not ok: {'; '.join(str(r) for r in reasons)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
