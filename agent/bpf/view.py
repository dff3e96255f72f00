"""A read-only view of the node data plane: pins, maps, tc filters, policy routing.

:class:`DataplaneView` never compiles, loads, attaches or writes anything,
so `veilctl` (or a status endpoint) can inspect a node while the agent runs,
and works on nodes without a compiler. :class:`~agent.bpf.dataplane.Dataplane`
extends it with the operations that change the kernel.

Like the Dataplane, the view reads tc and routing state through an
rtnetlink socket created in the calling thread's network namespace at
open(): open it inside the node's namespace.
"""

from __future__ import annotations

import itertools
import os
import threading
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from types import TracebackType
from typing import Any

from pyroute2 import IPRoute

from agent.bpf.maps import DataplaneMaps, MapsDump, PodCounters, PodEntry
from agent.bpf.pins import DEFAULT_PIN_DIR, PinLayout, open_pin, validate_pin_dir
from agent.bpf.programs import (
    DEFAULT_EBPF_DIR,
    PROGRAMS,
    CompileUnit,
    DataplaneOptions,
    compile_unit,
)
from agent.bpf.state import AttachedProgram, LoadedProgram, NodeDataplaneState, PodDataplaneState
from agent.errors import BpfError
from agent.net import routing, tc, veth
from agent.net.tc import Hook
from node import bpf as syscall

__all__ = ["DataplaneView", "loaded_source"]


class DataplaneView:
    """Open pins and an rtnetlink socket; every method only reads."""

    def __init__(
        self, *, layout: PinLayout, prog_fds: dict[str, int], maps: DataplaneMaps, ipr: Any
    ) -> None:
        self.layout = layout
        self.maps = maps
        self._prog_fds = prog_fds
        self._ipr = ipr
        self._lock = threading.RLock()
        self._closed = False

    @classmethod
    def inspect(cls, pin_dir: Path | str = DEFAULT_PIN_DIR) -> DataplaneView:
        """Open what is pinned under ``pin_dir`` (MapError with a hint if nothing is)."""
        layout = PinLayout(validate_pin_dir(Path(pin_dir)))
        maps = DataplaneMaps.open(layout)
        fds: dict[str, int] = {}
        try:
            for spec in PROGRAMS:
                fd = open_pin(layout.program(spec.name))
                if fd is not None:
                    fds[spec.name] = fd
            ipr = IPRoute(groups=0)
        except BaseException:
            maps.close()
            for fd in fds.values():
                os.close(fd)
            raise
        return cls(layout=layout, prog_fds=fds, maps=maps, ipr=ipr)

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Release fds and the netlink socket. Programs, filters and pins stay in place."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in self._prog_fds.values():
                os.close(fd)
            self._prog_fds.clear()
            self.maps.close()
            self._ipr.close()

    def __enter__(self) -> DataplaneView:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def pin_dir(self) -> Path:
        return self.layout.root

    # -- reading -----------------------------------------------------------------------

    def pods(self) -> list[PodDataplaneState]:
        with self._lock:
            self._check_open()
            v6 = self._ipv6_by_ifindex()
            return [self._pod_state(entry, v6) for entry in self.maps.pods()]

    def pod(self, pod_ip: IPv4Address | IPv6Address | str) -> PodDataplaneState | None:
        """The pod known by ``pod_ip`` (its IPv4 address, or any IPv6 address it owns)."""
        ip = ip_address(pod_ip) if isinstance(pod_ip, str) else pod_ip
        with self._lock:
            self._check_open()
            if isinstance(ip, IPv6Address):
                for addr in self.maps.pod_addrs():
                    if addr.ip == ip and (entry := self.maps.pod(addr.ifindex)) is not None:
                        return self._pod_state(entry)
                return None
            for entry in self.maps.pods():
                if entry.ip == ip:
                    return self._pod_state(entry)
            return None

    def maps_dump(self) -> MapsDump:
        with self._lock:
            self._check_open()
            return self.maps.dump()

    def node(self) -> NodeDataplaneState:
        with self._lock:
            self._check_open()
            config = self.maps.config()
            loaded = []
            for spec in PROGRAMS:
                fd = self._prog_fds.get(spec.name)
                if fd is None:
                    continue
                info = syscall.prog_info(fd)
                loaded.append(
                    LoadedProgram(spec.name, self.layout.program(spec.name), info.id, info.tag)
                )
            uplink_prog = None
            uplink_name = None
            if config.uplink_ifindex:
                uplink_name = veth.interface_name(self._ipr, config.uplink_ifindex)
                uplink_prog = self._attached(config.uplink_ifindex).get(Hook.INGRESS)
            state = NodeDataplaneState(
                pin_dir=self.layout.root,
                loaded_build_id=config.build_id,
                source_build_id=None,
                reused_pins=None,
                programs=tuple(loaded),
                uplink_ifindex=config.uplink_ifindex,
                uplink_ifname=uplink_name,
                uplink_program=uplink_prog,
                policy_routing=routing.policy_routing(self._ipr),
                probe_source=config.probe_source,
            )
            return self._annotate(state)

    def source(self, ebpf_dir: Path = DEFAULT_EBPF_DIR) -> CompileUnit | None:
        """The compile unit the running programs were built from, if these sources match it."""
        return loaded_source(self.maps.config().build_id, self.layout.root, ebpf_dir)

    # -- shared plumbing ---------------------------------------------------------------

    def _annotate(self, state: NodeDataplaneState) -> NodeDataplaneState:
        """Hook for subclasses to add what only a loader knows."""
        return state

    def _check_open(self) -> None:
        if self._closed:
            raise BpfError("the data-plane handle is closed", hint="open it again")

    def _attached(self, ifindex: int) -> dict[Hook, AttachedProgram]:
        return {
            f.hook: AttachedProgram(f.name, f.hook, f.prog_id)
            for f in tc.list_bpf_filters(self._ipr, ifindex)
            if f.ours
        }

    def _ipv6_by_ifindex(self) -> dict[int, tuple[IPv6Address, ...]]:
        """One pass over pod_addrs: each veth's IPv6 source addresses."""
        out: dict[int, list[IPv6Address]] = {}
        for a in self.maps.pod_addrs():
            if isinstance(a.ip, IPv6Address):
                out.setdefault(a.ifindex, []).append(a.ip)
        return {k: tuple(v) for k, v in out.items()}

    def _pod_state(
        self, entry: PodEntry, ipv6: dict[int, tuple[IPv6Address, ...]] | None = None
    ) -> PodDataplaneState:
        if ipv6 is None:
            ipv6 = self._ipv6_by_ifindex()
        attached = self._attached(entry.ifindex)
        v6 = ipv6.get(entry.ifindex, ())
        # 0.0.0.0 in the pods entry: a pod with IPv6 addresses only.
        known: IPv4Address | IPv6Address = entry.ip if int(entry.ip) or not v6 else min(v6)
        return PodDataplaneState(
            pod_ip=known,
            ifindex=entry.ifindex,
            host_ifname=veth.interface_name(self._ipr, entry.ifindex),
            enrolled=entry.enrolled,
            ingress=attached.get(Hook.INGRESS),
            egress=attached.get(Hook.EGRESS),
            counters=self.maps.counters(entry.ifindex) or PodCounters(),
            ipv6=v6,
        )


def loaded_source(
    build_id: str, pin_dir: Path, ebpf_dir: Path = DEFAULT_EBPF_DIR
) -> CompileUnit | None:
    """Find the compile unit (sources + flags) whose build id is ``build_id``.

    Every option combination is tried; None means the sources on disk are
    not the ones the running programs were built from.
    """
    if not build_id:
        return None
    base = DataplaneOptions(ebpf_dir=ebpf_dir)
    for drop_udp, allow_echo in itertools.product((False, True), repeat=2):
        options = replace(base, drop_udp=drop_udp, allow_icmp_echo=allow_echo)
        unit = compile_unit(options, pin_dir)
        if unit.build_id == build_id:
            return unit
    return None
