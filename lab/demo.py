"""``veil demo``: a two-node mesh of real namespaces, checked end to end.

It builds the mesh described by ``examples/registry.yaml`` (two nodes, three
pods each), runs the controller, and on each node joins, starts the ztunnel and
the agent (eBPF redirection). Then it checks what an SRE would want to see:

* checkout calls payments on the other node over mTLS and succeeds, and the
  server sees checkout's real IP;
* the same call through the payments Service VIP succeeds;
* another identity (shop/other) is refused by the policy "payments accepts
  calls only from checkout", before any server byte;
* a pod in a non-enrolled namespace is refused by STRICT;
* dual stack (when the registry gives the pods IPv6 addresses, as the example
  does): the same call over IPv6 goes through mTLS with checkout's real IPv6
  address, and shop/other is refused over IPv6 too;
* nothing crossed the underlay in plaintext, and HBONE carried TLS records
  (over IPv6 as well, in dual stack);
* ``veilctl pods``, ``veilctl connections`` and ``veilctl verify`` output;
* L7 through the waypoint (when the registry declares one, as the example
  does: Service shop/payments-api opts into shop-waypoint): the waypoint runs
  in its own pod, and checkout ``GET /pay`` is 200, ``DELETE /pay`` 403;
  ``POST /admin`` with a valid token carrying ``role: admin`` 200, without a
  token 403, with an expired or a forged token 401; payments' HTTP app saw the
  allowed requests (and none of the refused ones), then ``veilctl waypoint``.

It exits 0 only if every check held, prints a summary line, and removes
everything it created, including on Ctrl-C.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from lab.apps import whoami
from lab.capture import UnderlayCapture
from lab.demo_waypoint import L7_APP_PORT, L7Demo
from lab.mesh import LabMesh
from node.dataplane import HBONE_PORT

__all__ = ["add_demo_parser", "run_demo"]

REPO = Path(__file__).resolve().parent.parent
DEFAULT_REGISTRY = REPO / "examples" / "registry.yaml"
APP_PORT = 8080
MARKER = b"VEIL-DEMO-PLAINTEXT-MARKER"
MARKER6 = b"VEIL-DEMO-PLAINTEXT-MARKER-IPV6"


@dataclass
class Result:
    name: str
    ok: bool
    detail: str


class Demo:
    def __init__(self, mesh: LabMesh, out: Callable[[str], None]) -> None:
        self.mesh = mesh
        self.out = out
        self.results: list[Result] = []

    def check(self, name: str, fn: Callable[[], str]) -> None:
        try:
            detail = fn()
            self.results.append(Result(name, True, detail))
            self.out(f"  [ok]   {name}: {detail}")
        except Exception as e:
            self.results.append(Result(name, False, str(e)))
            self.out(f"  [FAIL] {name}: {e}")

    def call(self, client: str, ip: str, port: int, payload: bytes = b"") -> str:
        """Connects from ``client``'s pod and asks the whoami app who it saw."""
        with self.mesh.in_pod(client):
            sock = socket.create_connection((ip, port), timeout=5.0)
        with sock:
            if payload:
                sock.sendall(payload)
            seen = whoami(sock)
        return seen.peer_ip

    def refused(self, client: str, ip: str, port: int) -> str:
        """Expects the connection to fail, or to close before any server byte."""
        try:
            with self.mesh.in_pod(client):
                sock = socket.create_connection((ip, port), timeout=5.0)
        except OSError as e:
            return f"connect failed ({e.strerror or e})"
        with sock:
            sock.settimeout(5.0)
            try:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: demo\r\n\r\n")
                data = sock.recv(4096)
            except OSError as e:
                return f"connection reset ({e.strerror or e}), no server byte"
            if data:
                raise AssertionError(f"server answered {data[:80]!r}: the call was not refused")
            return "closed before any server byte"


def keep_commands(mesh: LabMesh) -> list[str]:
    """The exact command that runs veilctl on each lab node (its netns, its agent socket)."""
    import shlex

    from .mesh import veilctl_argv
    from .process import netns_argv

    return [
        shlex.join(
            netns_argv(
                mesh.topo.node(node).netns,
                veilctl_argv("--agent-socket", str(mesh.agent_socket(node)), "status"),
            )
        )
        + f"    # node {node}"
        for node in mesh.topo.nodes
    ]


def run_demo(registry: Path, keep: bool, out: Callable[[str], None]) -> int:
    started = time.monotonic()
    out("Veil demo: building two nodes with three pods each (network namespaces)")
    with LabMesh(registry) as mesh:
        topo = mesh.topo
        out(f"  lab {topo.prefix}: nodes {', '.join(topo.nodes)}; work dir {mesh.workdir}")
        out("Starting the controller, joining nodes, starting ztunnels and agents")
        l7 = L7Demo.prepare(mesh)
        mesh.start()
        out(f"  mesh ready in {time.monotonic() - started:.1f}s")
        for name in ("payments", "legacy-server"):
            topo.start_app(mesh.pod(name).lab, "whoami", APP_PORT)
        if l7 is not None:
            l7.start()
            out(f"  waypoint {l7.pod} ready in its own pod; payments' HTTP app on :{L7_APP_PORT}")

        demo = Demo(mesh, out)
        payments = mesh.pod("payments")
        checkout = mesh.pod("checkout")
        vip = _service_vip(mesh, "payments")
        payments6 = _registry_ipv6(mesh, "payments")
        checkout6 = _registry_ipv6(mesh, "checkout")

        out("Checks")
        with UnderlayCapture(topo) as capture:

            def allowed() -> str:
                seen = demo.call("checkout", payments.ip, APP_PORT, MARKER)
                if seen != checkout.ip:
                    raise AssertionError(f"server saw {seen}, expected checkout's IP {checkout.ip}")
                return f"payments answered and saw the real client IP {seen}"

            demo.check("checkout -> payments (other node, mTLS)", allowed)

            def via_vip() -> str:
                seen = demo.call("checkout", vip, APP_PORT)
                if seen != checkout.ip:
                    raise AssertionError(f"server saw {seen}, expected {checkout.ip}")
                return f"Service VIP {vip}:{APP_PORT} reached payments"

            if vip:
                demo.check("checkout -> payments Service VIP", via_vip)
            demo.check(
                "other -> payments denied by policy",
                lambda: demo.refused("other", payments.ip, APP_PORT),
            )
            demo.check(
                "legacy-client (not enrolled) -> payments refused by STRICT",
                lambda: demo.refused("legacy-client", payments.ip, APP_PORT),
            )

            def allowed6() -> str:
                seen = demo.call("checkout", payments6, APP_PORT, MARKER6)
                if seen != checkout6:
                    raise AssertionError(
                        f"server saw {seen}, expected checkout's IPv6 address {checkout6}"
                    )
                return f"payments answered at [{payments6}] and saw [{seen}]"

            if payments6 and checkout6:
                demo.check("checkout -> payments over IPv6 (mTLS)", allowed6)
                demo.check(
                    "other -> payments over IPv6 denied by policy",
                    lambda: demo.refused("other", payments6, APP_PORT),
                )
            time.sleep(0.3)

        def encrypted() -> str:
            if capture.contains(MARKER):
                raise AssertionError("the plaintext marker crossed the underlay")
            if capture.contains(MARKER6):
                raise AssertionError("the IPv6 plaintext marker crossed the underlay")
            ports = capture.tcp_ports_seen()
            records = capture.tls_records_seen()
            if HBONE_PORT not in ports:
                raise AssertionError(
                    f"no HBONE (:{HBONE_PORT}) traffic on the underlay; ports {sorted(ports)}"
                )
            v6_hbone = sum(
                1
                for seg in capture.segments()
                if ":" in seg.src and HBONE_PORT in (seg.sport, seg.dport)
            )
            if payments6 and checkout6 and not v6_hbone:
                raise AssertionError(f"no IPv6 HBONE (:{HBONE_PORT}) traffic on the underlay")
            v6 = f"; {v6_hbone} IPv6 HBONE segments" if v6_hbone else ""
            return f"no plaintext marker; ports seen {sorted(ports)}; {records} TLS records{v6}"

        demo.check("underlay carries only TLS", encrypted)
        if l7 is not None:
            l7.run_checks(demo, out)

        for node in topo.nodes:
            out(f"\n$ veilctl pods    (node {node})")
            out(mesh.veilctl(node, "pods")[1].rstrip())
        # A connection held open so `veilctl connections` has something to show.
        try:
            with mesh.in_pod("checkout"):
                held = socket.create_connection((payments.ip, APP_PORT), timeout=5.0)
        except OSError as e:
            out(f"\n(could not open a connection to show in veilctl connections: {e})")
            held = None
        try:
            time.sleep(0.3)
            for node in topo.nodes:
                out(f"\n$ veilctl connections    (node {node})")
                out(mesh.veilctl(node, "connections")[1].rstrip())
        finally:
            if held is not None:
                held.close()
        out("")
        for node in topo.nodes:

            def verify(node: str = node) -> str:
                code, text = mesh.veilctl(node, "verify")
                out(f"$ veilctl verify    (node {node})\n{text.rstrip()}")
                if code != 0:
                    raise AssertionError(f"veilctl verify exited {code}")
                return "no findings"

            demo.check(f"veilctl verify on {node}", verify)

        if keep:
            out(f"\n--keep: the mesh stays up (lab {topo.prefix}); press Ctrl-C to tear it down")
            out("Inspect a node with veilctl (as root, in another terminal):")
            for line in keep_commands(mesh):
                out(f"  {line}")
            with _suppress_interrupt():
                while True:
                    time.sleep(3600)

    passed = sum(r.ok for r in demo.results)
    total = len(demo.results)
    elapsed = time.monotonic() - started
    verdict = "PASS" if passed == total else "FAIL"
    out(
        f"\nveil demo: {verdict}: {passed}/{total} checks held in {elapsed:.1f}s; everything cleaned up"
    )
    return 0 if passed == total else 1


def _registry_ipv6(mesh: LabMesh, name: str) -> str:
    """The workload's IPv6 address as the registry lists it ("" for none)."""
    for w in mesh.document.get("workloads") or []:
        if w.get("name") == name:
            for ip in w.get("ips") or []:
                if ":" in str(ip):
                    return str(ipaddress.ip_address(str(ip)))
    return ""


def _service_vip(mesh: LabMesh, name: str) -> str:
    for svc in mesh.document.get("services") or []:
        if svc.get("name") == name and svc.get("vips"):
            return str(svc["vips"][0])
    return ""


class _suppress_interrupt:
    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, *rest: object) -> bool:
        return et is KeyboardInterrupt


def _handle(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        from veil.errors import VeilError

        raise VeilError(
            "the demo builds network namespaces and loads eBPF programs, which needs root",
            hint="run `sudo make demo`",
        )

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)

    def out(line: str) -> None:
        print(line, flush=True)

    return run_demo(Path(args.registry), args.keep, out)


def add_demo_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="run a two-node mesh in network namespaces and check it end to end",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--registry", default=str(DEFAULT_REGISTRY), help="registry YAML describing the mesh"
    )
    p.add_argument("--keep", action="store_true", help="keep the mesh running until Ctrl-C")
    p.set_defaults(func=_handle)
