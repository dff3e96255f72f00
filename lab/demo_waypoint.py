"""The L7 part of ``veil demo``: a waypoint in its own pod, checked end to end.

When the registry declares a waypoint replica (a workload labelled
``veil.io/waypoint``) and a Service that opts into it (``veil.io/use-waypoint``),
:class:`L7Demo` adds a RequestAuthentication with a key it generates for this
run (inline JWKS, so no signing key lives in the example file), starts the
payments HTTP app and the waypoint (joined like a node process, in its own
network namespace), and checks from checkout's pod, through its ztunnel and
the waypoint:

* ``GET /pay`` 200 and ``DELETE /pay`` 403 (AuthorizationPolicy on methods
  and paths);
* ``POST /admin`` with a valid token carrying ``role: admin`` 200, without a
  token 403, with an expired token 401 and with a forged one 401
  (RequestAuthentication, and a ``when`` condition on a claim);
* payments' app saw exactly the allowed requests, without the token.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from lab.apps import http_request

if TYPE_CHECKING:
    from lab.mesh import LabMesh, MeshPod
    from lab.process import LabProcess

__all__ = ["AUDIENCE", "ISSUER", "L7_APP_PORT", "L7Demo"]

L7_APP_PORT = 8081
ISSUER = "https://idp.demo.veil"
AUDIENCE = "payments-api"


class _Checks(Protocol):
    def check(self, name: str, fn: Callable[[], str]) -> None: ...


@dataclass
class L7Demo:
    mesh: LabMesh
    pod: str  # the waypoint replica's workload name
    service_vip: str
    service_port: int
    key: ec.EllipticCurvePrivateKey
    forger: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    app: LabProcess | None = None
    out: Callable[[str], None] = print

    @classmethod
    def prepare(cls, mesh: LabMesh) -> L7Demo | None:
        """Writes the RequestAuthentication into the lab's registry (before the
        controller starts); None when the registry declares no waypoint."""
        pods = mesh.waypoint_pods()
        if not pods:
            return None
        replica = pods[0]
        name = replica.labels["veil.io/waypoint"]
        svc = next(
            (
                s
                for s in mesh.document.get("services") or []
                if (s.get("labels") or {}).get("veil.io/use-waypoint") == name
                and s.get("namespace") == replica.namespace
            ),
            None,
        )
        if svc is None or not svc.get("vips"):
            return None
        key = ec.generate_private_key(ec.SECP256R1())
        jwk = {**json.loads(ECAlgorithm.to_jwk(key.public_key())), "kid": "demo", "alg": "ES256"}
        auth = {
            "name": "payments-jwt",
            "namespace": replica.namespace,
            "spec": {
                "targetRefs": [{"kind": "Service", "name": str(svc["name"])}],
                "jwtRules": [
                    {
                        "issuer": ISSUER,
                        "audiences": [AUDIENCE],
                        "jwks": json.dumps({"keys": [jwk]}),
                    }
                ],
            },
        }

        def add(doc: dict[str, Any]) -> None:
            doc["requestAuthentications"] = [
                *(
                    a
                    for a in doc.get("requestAuthentications") or []
                    if a.get("name") != "payments-jwt"
                ),
                auth,
            ]

        mesh.update_registry(add)
        port = int(svc["ports"][0]["port"])
        return cls(mesh, replica.name, str(svc["vips"][0]), port, key)

    def start(self) -> None:
        payments = self.mesh.pod("payments")
        self.app = self.mesh.topo.start_app(
            payments.lab,
            "http",
            L7_APP_PORT,
            log_path=self.mesh.workdir / "logs" / "payments-http.log",
        )
        self.mesh.start_waypoint(self.pod)

    # -- requests from checkout's pod -----------------------------------------

    def token(self, key: ec.EllipticCurvePrivateKey | None = None, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "sub": "alice", "aud": AUDIENCE, "exp": now + 600, **claims}
        return jwt.encode(body, key or self.key, algorithm="ES256", headers={"kid": "demo"})

    def request(self, method: str, path: str, token: str | None = None) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with self.mesh.in_pod("checkout"):
            sock = socket.create_connection((self.service_vip, self.service_port), timeout=5.0)
        with sock:
            sock.settimeout(10.0)
            return http_request(sock, method, path, headers)

    def expect(self, method: str, path: str, status: int, token: str | None = None) -> str:
        got, body = self.request(method, path, token)
        if got != status:
            raise AssertionError(
                f"{method} {path} answered {got} {body[:120]!r}, expected {status}"
            )
        return f"{got} {body.strip()[:60].decode(errors='replace')}"

    def seen(self) -> list[dict[str, Any]]:
        assert self.app is not None
        out = []
        for line in self.app.log_text().splitlines():
            if line.startswith("seen "):
                out.append(json.loads(line[5:]))
        return out

    def run_checks(self, demo: _Checks, out: Callable[[str], None]) -> None:
        self.out = out
        vip = f"{self.service_vip}:{self.service_port}"
        demo.check(
            f"L7: checkout GET /pay via {vip} (waypoint) -> 200",
            lambda: self.expect("GET", "/pay", 200),
        )
        demo.check(
            "L7: checkout DELETE /pay -> 403 (policy)",
            lambda: self.expect("DELETE", "/pay", 403),
        )
        demo.check(
            "L7: POST /admin with a valid token, role admin -> 200",
            lambda: self.expect("POST", "/admin", 200, self.token(role="admin")),
        )
        demo.check(
            "L7: POST /admin without a token -> 403",
            lambda: self.expect("POST", "/admin", 403),
        )
        demo.check(
            "L7: POST /admin with an expired token -> 401",
            lambda: self.expect(
                "POST", "/admin", 401, self.token(role="admin", exp=int(time.time()) - 3600)
            ),
        )
        demo.check(
            "L7: POST /admin with a forged token -> 401",
            lambda: self.expect("POST", "/admin", 401, self.token(self.forger, role="admin")),
        )
        waypoint: MeshPod = self.mesh.pod(self.pod)

        def app_saw() -> str:
            seen = self.seen()
            calls = [(s["method"], s["path"]) for s in seen]
            if calls != [("GET", "/pay"), ("POST", "/admin")]:
                raise AssertionError(f"payments' app saw {calls}, expected GET /pay, POST /admin")
            if any(s["authorization"] for s in seen):
                raise AssertionError("the token reached the app (forwardOriginalToken is off)")
            # The waypoint forwards under its own identity and carries the
            # client in x-forwarded-for; the destination ztunnel dials the app
            # from the node (the waypoint's address is not a workload of node-b).
            clients = sorted({s["client"] for s in seen})
            return (
                f"exactly the 2 allowed requests (via waypoint {waypoint.ip}, arriving "
                f"from {', '.join(clients)}), token removed"
            )

        demo.check("L7: payments' app saw the allowed requests only", app_saw)

        def veilctl_waypoint() -> str:
            from lab.mesh import veilctl_argv

            done = self.mesh.topo.run(waypoint.lab, veilctl_argv("waypoint"))
            text = done.stdout.decode()
            self.out(f"$ veilctl waypoint    (pod {waypoint.key})\n{text.rstrip()}")
            if "payments-api-l7" not in text or "payments-api:80" not in text:
                raise AssertionError("veilctl waypoint does not show the policy and destination")
            return "shows the destination, its endpoint and the attached policy"

        demo.check("L7: veilctl waypoint", veilctl_waypoint)
