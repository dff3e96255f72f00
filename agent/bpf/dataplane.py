"""The node data plane as one object: load or reuse programs, attach them, enroll pods.

:class:`Dataplane` is what the agent daemon (and the CLI) calls; nothing
above it touches bcc, pins, maps or tc directly.

Restart design (the failure to avoid is Cilium CVE-2023-27595: a restarting
agent that detaches or empties its programs lets traffic bypass the mesh):

* Maps are pinned by bcc (``BPF_TABLE_PINNED`` in ebpf/include/veil_maps.h):
  a compile reuses the pinned maps, so pod entries survive any restart.
* Programs are pinned after loading, and the build id (sha256 of the compile
  unit's text and flags) is stored in the config map. ``open()`` with an
  unchanged build id reuses the pinned programs: no compile, no tc change,
  nothing for traffic to notice. kill -9 of the agent changes nothing either:
  the tc filters keep their programs, the programs keep their maps.
* With a different build id (new sources or options) ``open()`` compiles,
  pins the new programs (atomic rename) and then swaps every Veil filter in
  the namespace with ``tc filter replace`` on the same priority and handle,
  which is atomic per hook. The new build id is written last, so a crash
  half way simply repeats the swap on the next start.

Network namespace: ``open()`` creates the rtnetlink socket in the calling
thread's network namespace and every tc/rule/route operation goes through
it, so open the Dataplane inside the node's namespace (``in_netns`` or a
process started there with nsenter); afterwards any thread may use it.
Methods are blocking (pyroute2's synchronous API runs its own event loop):
from asyncio code call them through ``asyncio.to_thread``. An internal lock
serialises them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError as PyrNetlinkError

from agent.bpf import programs
from agent.bpf.codes import PodFlag
from agent.bpf.maps import DataplaneMaps, LocalPodEntry, PodAddrEntry, PodEntry, check_layout
from agent.bpf.pins import (
    DEFAULT_PIN_DIR,
    MAP_NAMES,
    PinLayout,
    ensure_bpffs,
    open_pin,
    pin_atomically,
    validate_pin_dir,
)
from agent.bpf.programs import PROGRAMS, CompileUnit, DataplaneOptions, ProgramSpec
from agent.bpf.state import NodeDataplaneState, PodDataplaneState
from agent.bpf.view import DataplaneView
from agent.errors import BpfError, NetlinkError
from agent.net import routing, tc, veth
from agent.net.tc import Hook
from node import bpf as syscall

__all__ = ["Dataplane", "uninstall_node"]

log = logging.getLogger(__name__)

_BY_NAME = {spec.name: spec for spec in PROGRAMS}
_BY_FILTER = {spec.filter_name: spec for spec in PROGRAMS}
_POD_INGRESS = _BY_NAME["pod_ingress"]
_POD_EGRESS = _BY_NAME["pod_egress"]
_UPLINK = _BY_NAME["uplink_ingress"]
_ARPHRD_ETHER = 1


class Dataplane(DataplaneView):
    """The data plane of one node namespace: everything a view reads, plus changes."""

    def __init__(
        self,
        *,
        layout: PinLayout,
        options: DataplaneOptions,
        unit: CompileUnit,
        prog_fds: dict[str, int],
        maps: DataplaneMaps,
        ipr: Any,
        reused: bool,
    ) -> None:
        super().__init__(layout=layout, prog_fds=prog_fds, maps=maps, ipr=ipr)
        self.options = options
        self.unit = unit
        self.reused_pins = reused

    @classmethod
    def open(
        cls,
        pin_dir: Path | str = DEFAULT_PIN_DIR,
        options: DataplaneOptions | None = None,
        *,
        allow_mount: bool = True,
    ) -> Dataplane:
        """Reuse the pinned programs, or compile, pin and swap them in (see module doc)."""
        options = options or DataplaneOptions()
        layout = PinLayout(validate_pin_dir(Path(pin_dir)))
        ensure_bpffs(layout.root, allow_mount=allow_mount)
        try:
            layout.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BpfError(
                f"cannot create pin directory {layout.root}: {exc.strerror}",
                hint="the agent needs root to write to bpffs",
            ) from exc
        unit = programs.compile_unit(options, layout.root)
        pinned_maps = _check_pinned_maps(layout)
        prog_fds = _reuse_pinned_programs(layout, unit.build_id, pinned_maps)
        reused = prog_fds is not None
        if prog_fds is None:
            loaded = programs.load_programs(unit, pinned_maps)
            prog_fds = {}
            for spec in PROGRAMS:
                pin_atomically(loaded.fds[spec.name], layout.program(spec.name))
                prog_fds[spec.name] = os.dup(loaded.fds[spec.name])
        try:
            maps = DataplaneMaps.open(layout)
            _check_programs_use(prog_fds, maps.map_ids(), layout)
            ipr = IPRoute(groups=0)
        except BaseException:
            for fd in prog_fds.values():
                os.close(fd)
            raise
        plane = cls(
            layout=layout,
            options=options,
            unit=unit,
            prog_fds=prog_fds,
            maps=maps,
            ipr=ipr,
            reused=reused,
        )
        if not reused:
            try:
                plane._swap_programs()
                maps.put_config(replace(maps.config(), build_id=unit.build_id))
            except BaseException:
                plane.close()
                raise
        if options.same_node_splice:
            _ensure_splice(layout, options)
        log.info(
            "dataplane open: pin_dir=%s build=%s reused_pins=%s",
            layout.root,
            unit.build_id[:12],
            reused,
        )
        return plane

    @property
    def build_id(self) -> str:
        return self.unit.build_id

    def program_fd(self, name: str) -> int:
        """The fd of a loaded program ("pod_ingress", "uplink_ingress", "pod_egress")."""
        return self._prog_fds[name]

    def source(self, ebpf_dir: Path | None = None) -> CompileUnit:
        """The compile unit (text + flags) these programs were built from."""
        return self.unit

    def _annotate(self, state: NodeDataplaneState) -> NodeDataplaneState:
        return replace(state, source_build_id=self.unit.build_id, reused_pins=self.reused_pins)

    # -- node --------------------------------------------------------------------------

    def setup_node(
        self, uplink_ifname: str, *, probe_source: IPv4Address | str | None = None
    ) -> None:
        """Install policy routing and the uplink program; set the kubelet probe source."""
        with self._lock:
            self._check_open()
            routing.ensure_policy_routing(self._ipr)
            uplink = veth.host_interface(self._ipr, uplink_ifname)
            link_type = self._link_type(uplink.ifindex)
            if link_type != _ARPHRD_ETHER:
                raise NetlinkError(
                    f"uplink {uplink_ifname} is not an Ethernet interface (type {link_type})",
                    hint="the uplink program parses Ethernet frames; pick the node's Ethernet "
                    "uplink",
                )
            config = self.maps.config()
            old = config.uplink_ifindex
            if old and old != uplink.ifindex:
                # By name: the old ifindex may since belong to a pod's veth.
                tc.detach_bpf(self._ipr, old, Hook.INGRESS, _UPLINK.filter_name)
            self._attach(uplink.ifindex, _UPLINK)
            probe = config.probe_source if probe_source is None else IPv4Address(probe_source)
            self.maps.put_config(replace(config, uplink_ifindex=uplink.ifindex, probe_source=probe))

    def set_probe_source(self, probe_source: IPv4Address | str | None) -> None:
        """Allow TCP from this node address (kubelet probes) through the egress guard."""
        with self._lock:
            self._check_open()
            ip = None if probe_source is None else IPv4Address(probe_source)
            self.maps.put_config(replace(self.maps.config(), probe_source=ip))

    # -- pods ----------------------------------------------------------------------------

    def enroll(
        self,
        pod_ip: IPv4Address | IPv6Address | str,
        host_ifname: str | None = None,
        *,
        ipv6: Iterable[IPv6Address | str] = (),
    ) -> PodDataplaneState:
        """Steer the pod into the ztunnel and guard it. Idempotent.

        ``pod_ip`` is the pod's IPv4 address, or for a pod with IPv6
        addresses only its first IPv6 address (its pods entry then holds
        0.0.0.0, so any IPv4 from it is dropped as spoofed). ``ipv6`` are the
        pod's IPv6 addresses: its IPv6 is steered and anti-spoofed like its
        IPv4; without any, its IPv6 is dropped (except neighbour discovery).
        Maps are written before the filters are attached, so the first packet
        a program sees already finds the pod.
        """
        ip, v4, v6 = _pod_addresses(pod_ip, ipv6)
        with self._lock:
            self._check_open()
            iface = self._resolve(ip, host_ifname)
            self._drop_stale(ip, iface.ifindex)
            self.maps.create_counters(iface.ifindex)
            flags = PodFlag.ENROLLED | (PodFlag.IPV6 if v6 else PodFlag.NONE)
            entry = PodEntry(iface.ifindex, v4, flags)
            # Addresses before the flag: a packet never sees IPV6 without its entries.
            self._sync_addrs(iface.ifindex, v4, v6, enrolled=True)
            self.maps.put_pod(entry)
            if int(v4):
                self.maps.put_local_ip(LocalPodEntry(v4, iface.ifindex))
            self._attach(iface.ifindex, _POD_INGRESS)
            self._attach(iface.ifindex, _POD_EGRESS)
            return self._pod_state(entry)

    def mark_local_pod(
        self,
        pod_ip: IPv4Address | IPv6Address | str,
        host_ifname: str | None = None,
        *,
        ipv6: Iterable[IPv6Address | str] = (),
    ) -> PodDataplaneState:
        """Track a local pod that is NOT enrolled (or no longer is). Idempotent.

        Its TCP to enrolled local pods is steered to the inbound plaintext
        listener; the rest of its traffic is untouched. An enrolled pod moved
        here loses its egress guard after its entries stop saying enrolled.
        """
        ip, v4, v6 = _pod_addresses(pod_ip, ipv6)
        with self._lock:
            self._check_open()
            iface = self._resolve(ip, host_ifname)
            self._drop_stale(ip, iface.ifindex)
            self.maps.create_counters(iface.ifindex)
            if int(v4):
                self.maps.delete_local_ip(v4)
            entry = PodEntry(iface.ifindex, v4, PodFlag.IPV6 if v6 else PodFlag.NONE)
            self.maps.put_pod(entry)
            self._sync_addrs(iface.ifindex, v4, v6, enrolled=False)
            self._attach(iface.ifindex, _POD_INGRESS)
            self._detach(iface.ifindex, Hook.EGRESS)
            return self._pod_state(entry)

    def unenroll(self, pod_ip: IPv4Address | IPv6Address | str) -> bool:
        """Remove every trace of the pod: filters, map entries, counters. False if unknown.

        ``pod_ip`` is its IPv4 address or any of its IPv6 addresses. For a pod
        that keeps running outside the mesh call :meth:`mark_local_pod`
        instead, so its traffic to enrolled pods is still steered.
        """
        ip = ip_address(pod_ip) if isinstance(pod_ip, str) else pod_ip
        with self._lock:
            self._check_open()
            found = False
            for ifindex in self._holders(ip):
                self._remove_pod_entry(ifindex)
                found = True
            found = self.maps.delete_local_ip(ip) or found
            return found

    # -- teardown ------------------------------------------------------------------------

    def uninstall(self) -> None:
        """Detach every Veil filter, remove policy routing and every pin; then close."""
        with self._lock:
            self._check_open()
            uninstall_node(self.layout.root, ipr=self._ipr)
            programs.forget(self.unit.build_id)
            self.close()

    # -- internals -----------------------------------------------------------------------

    # -- internals ----------------------------------------------------------------------

    def _holders(self, ip: IPv4Address | IPv6Address) -> list[int]:
        """The veths whose pod entry names ``ip`` (IPv4) or whose pod owns it (IPv6)."""
        if isinstance(ip, IPv6Address):
            held = {a.ifindex for a in self.maps.pod_addrs() if a.ip == ip}
            return [e.ifindex for e in self.maps.pods() if e.ifindex in held]
        return [e.ifindex for e in self.maps.pods() if e.ip == ip]

    def _resolve(
        self, ip: IPv4Address | IPv6Address, host_ifname: str | None
    ) -> veth.HostInterface:
        if host_ifname is not None:
            return veth.host_interface(self._ipr, host_ifname)
        return veth.host_interface_for_ip(self._ipr, ip)

    def _link_type(self, ifindex: int) -> int:
        try:
            return int(self._ipr.get_links(ifindex)[0]["ifi_type"])
        except (PyrNetlinkError, IndexError) as exc:
            raise NetlinkError(f"cannot read link {ifindex}: {exc}") from exc

    def _attach(self, ifindex: int, spec: ProgramSpec) -> None:
        tc.attach_bpf(self._ipr, ifindex, spec.hook, self._prog_fds[spec.name], spec.filter_name)

    def _detach(self, ifindex: int, hook: Hook) -> None:
        tc.detach_bpf(self._ipr, ifindex, hook)

    def _drop_stale(self, ip: IPv4Address | IPv6Address, ifindex: int) -> None:
        """Forget what a recreated pod or a reused ifindex left behind.

        ``ip`` is the address the pod is known by (see :meth:`enroll`).
        """
        current = self.maps.pod(ifindex)
        if current is not None and ifindex not in self._holders(ip):
            if int(current.ip):
                self._forget_local_ip(current.ip, ifindex)
            self.maps.delete_counters(ifindex)  # they belonged to the previous pod
        for other in self._holders(ip):
            if other != ifindex:
                self._remove_pod_entry(other)

    def _sync_addrs(
        self, ifindex: int, ip: IPv4Address, v6: frozenset[IPv6Address], *, enrolled: bool
    ) -> None:
        """Make pod_addrs (and local_ips6) hold exactly this pod's addresses.

        ``ip`` 0.0.0.0 is a pod with IPv6 addresses only: no IPv4 entry.
        """
        want: set[IPv4Address | IPv6Address] = {ip, *v6} if int(ip) else set(v6)
        for old in self.maps.pod_addrs(ifindex):
            if old.ip not in want:
                self.maps.delete_pod_addr(ifindex, old.ip)
                self._forget_local_ip(old.ip, ifindex)
        for addr in sorted(v6):
            # Another veth holding the address is a recreated pod: the newest wins.
            for other in self.maps.pod_addrs():
                if other.ip == addr and other.ifindex != ifindex:
                    self.maps.delete_pod_addr(other.ifindex, addr)
            self.maps.put_pod_addr(PodAddrEntry(ifindex, addr))
            if enrolled:
                self.maps.put_local_ip(LocalPodEntry(addr, ifindex))
            else:
                self._forget_local_ip(addr, ifindex)
        if int(ip):
            self.maps.put_pod_addr(PodAddrEntry(ifindex, ip))

    def _forget_local_ip(self, ip: IPv4Address | IPv6Address, ifindex: int) -> None:
        local = self.maps.local_ip(ip)
        if local is not None and local.ifindex == ifindex:
            self.maps.delete_local_ip(ip)

    def _remove_pod_entry(self, ifindex: int) -> None:
        # Guard first, then steering: the pod is never reachable unguarded while
        # it is still steered, and a vanished link simply has nothing to detach.
        if veth.interface_name(self._ipr, ifindex) is not None:
            self._detach(ifindex, Hook.EGRESS)
            self._detach(ifindex, Hook.INGRESS)
            tc.remove_clsact_if_unused(self._ipr, ifindex)
        self.maps.delete_pod(ifindex)
        for addr in self.maps.pod_addrs(ifindex):
            self.maps.delete_pod_addr(ifindex, addr.ip)
            if isinstance(addr.ip, IPv6Address):
                self._forget_local_ip(addr.ip, ifindex)
        self.maps.delete_counters(ifindex)

    def _swap_programs(self) -> None:
        """Point every Veil filter in this namespace at the freshly loaded programs."""
        for link in self._ipr.get_links():
            ifindex = int(link["index"])
            for found in tc.list_bpf_filters(self._ipr, ifindex):
                if not found.ours:
                    continue
                spec = _BY_FILTER.get(found.name)
                if spec is None or spec.hook is not found.hook:
                    log.warning(
                        "removing unknown Veil filter %s from ifindex %d", found.name, ifindex
                    )
                    tc.detach_bpf(self._ipr, ifindex, found.hook)
                    continue
                self._attach(ifindex, spec)


def _ensure_splice(layout: PinLayout, options: DataplaneOptions) -> None:
    """Pin the same-node splice for the ztunnel; its absence is not fatal (Python relay)."""
    from agent.bpf.splice import ensure_splice

    try:
        status = ensure_splice(layout, options.ebpf_dir)
    except BpfError as e:
        log.warning(
            "same-node fast path unavailable, the ztunnel will relay same-node bytes in "
            "Python: %s (%s)",
            e.message.splitlines()[0],
            e.hint,
        )
        return
    log.info("same-node splice pinned: program id %d, reused=%s", status.program_id, status.reused)


def _pod_addresses(
    pod_ip: IPv4Address | IPv6Address | str, ipv6: Iterable[IPv6Address | str]
) -> tuple[IPv4Address | IPv6Address, IPv4Address, frozenset[IPv6Address]]:
    """(address the pod is known by, its IPv4 address or 0.0.0.0, its IPv6 addresses)."""
    try:
        ip = ip_address(pod_ip) if isinstance(pod_ip, str) else pod_ip
    except ValueError:
        raise BpfError(
            f"{pod_ip!r} is not an IP address",
            hint="pass the pod's IPv4 address, or its IPv6 address for an IPv6-only pod",
        ) from None
    v6 = _ipv6_set(ipv6)
    if isinstance(ip, IPv6Address):
        return ip, IPv4Address(0), v6 | {ip}
    if not int(ip):
        raise BpfError("0.0.0.0 is not a pod address", hint="pass the pod's IPv4 or IPv6 address")
    return ip, ip, v6


def _ipv6_set(addrs: Iterable[IPv6Address | str]) -> frozenset[IPv6Address]:
    out = set()
    for a in addrs:
        try:
            out.add(IPv6Address(a))
        except ValueError:
            raise BpfError(
                f"{a!r} is not an IPv6 address",
                hint="pass the pod's IPv6 addresses as ipv6=; its IPv4 address goes first",
            ) from None
    return frozenset(out)


def uninstall_node(pin_dir: Path | str = DEFAULT_PIN_DIR, *, ipr: Any = None) -> None:
    """Remove Veil from the current network namespace and the pin directory.

    Needs no compiler and no intact pins, so it also cleans up after a broken
    install. Detaches every Veil tc filter (deleting clsact qdiscs left empty),
    removes the fwmark rule and local route, then every pin and the directory.
    """
    layout = PinLayout(validate_pin_dir(Path(pin_dir)))
    own = ipr is None
    sock = IPRoute(groups=0) if own else ipr
    try:
        for link in sock.get_links():
            ifindex = int(link["index"])
            removed = False
            for found in tc.list_bpf_filters(sock, ifindex):
                if found.ours:
                    removed = tc.detach_bpf(sock, ifindex, found.hook) or removed
            if removed:
                tc.remove_clsact_if_unused(sock, ifindex)
        routing.remove_policy_routing(sock)
    finally:
        if own:
            sock.close()
    for pin in layout.all_pins():
        with contextlib.suppress(FileNotFoundError):
            pin.unlink()
    with contextlib.suppress(FileNotFoundError, OSError):
        layout.root.rmdir()


def _check_pinned_maps(layout: PinLayout) -> frozenset[int] | None:
    """Verify every map already pinned; return their ids when all four exist."""
    ids: set[int] = set()
    for name in MAP_NAMES:
        fd = open_pin(layout.map(name))
        if fd is None:
            continue
        try:
            info = syscall.map_info(fd)
            check_layout(name, info, layout.map(name))
            ids.add(info.id)
        finally:
            os.close(fd)
    return frozenset(ids) if len(ids) == len(MAP_NAMES) else None


def _reuse_pinned_programs(
    layout: PinLayout, build_id: str, pinned_maps: frozenset[int] | None
) -> dict[str, int] | None:
    """Open the pinned programs when they are exactly this build on these maps."""
    if pinned_maps is None:
        return None
    maps = DataplaneMaps.open(layout)
    try:
        if maps.config().build_id != build_id:
            return None
    finally:
        maps.close()
    fds: dict[str, int] = {}
    try:
        for spec in PROGRAMS:
            fd = open_pin(layout.program(spec.name))
            if fd is None:
                raise _NotReusable
            fds[spec.name] = fd
            if not set(syscall.prog_info(fd).map_ids) <= pinned_maps:
                raise _NotReusable
    except _NotReusable:
        for fd in fds.values():
            os.close(fd)
        return None
    return fds


class _NotReusable(Exception):
    """Internal: the pins are not a complete, consistent set of this build."""


def _check_programs_use(
    prog_fds: dict[str, int], map_ids: frozenset[int], layout: PinLayout
) -> None:
    for name, fd in prog_fds.items():
        used = set(syscall.prog_info(fd).map_ids)
        if not used <= map_ids:
            raise BpfError(
                f"program {name} uses maps {sorted(used - map_ids)} that are not pinned in "
                f"{layout.root}",
                hint="another process replaced the pins while this one loaded; start the agent "
                "again (only one agent may manage a pin directory)",
            )
