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
import threading
from dataclasses import dataclass, replace
from ipaddress import IPv4Address
from pathlib import Path
from types import TracebackType
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError as PyrNetlinkError

from agent.bpf import programs, syscall
from agent.bpf.codes import PodFlag
from agent.bpf.maps import (
    DataplaneMaps,
    LocalPodEntry,
    MapsDump,
    PodCounters,
    PodEntry,
    check_layout,
)
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
from agent.errors import BpfError, NetlinkError
from agent.net import routing, tc, veth
from agent.net.tc import Hook

__all__ = [
    "AttachedProgram",
    "Dataplane",
    "LoadedProgram",
    "NodeDataplaneState",
    "PodDataplaneState",
    "uninstall_node",
]

log = logging.getLogger(__name__)

_BY_NAME = {spec.name: spec for spec in PROGRAMS}
_BY_FILTER = {spec.filter_name: spec for spec in PROGRAMS}
_POD_INGRESS = _BY_NAME["pod_ingress"]
_POD_EGRESS = _BY_NAME["pod_egress"]
_UPLINK = _BY_NAME["uplink_ingress"]
_ARPHRD_ETHER = 1


@dataclass(frozen=True)
class AttachedProgram:
    """A Veil tc filter found on an interface."""

    name: str
    hook: Hook
    prog_id: int | None


@dataclass(frozen=True)
class PodDataplaneState:
    """What the kernel knows about one local pod."""

    pod_ip: IPv4Address
    ifindex: int
    host_ifname: str | None  # None: the veth is gone, the entry is stale
    enrolled: bool
    ingress: AttachedProgram | None
    egress: AttachedProgram | None
    counters: PodCounters

    @property
    def protected(self) -> bool:
        """Enrolled with both programs attached: steered in, guarded out."""
        return self.enrolled and self.ingress is not None and self.egress is not None

    def to_dict(self) -> dict[str, Any]:
        def prog(p: AttachedProgram | None) -> dict[str, Any] | None:
            return None if p is None else {"name": p.name, "prog_id": p.prog_id}

        return {
            "pod_ip": str(self.pod_ip),
            "ifindex": self.ifindex,
            "host_ifname": self.host_ifname,
            "enrolled": self.enrolled,
            "protected": self.protected,
            "ingress": prog(self.ingress),
            "egress": prog(self.egress),
            "counters": self.counters.to_dict(),
        }


@dataclass(frozen=True)
class LoadedProgram:
    """A pinned program and its kernel identity."""

    name: str
    pin: Path
    prog_id: int
    tag: str


@dataclass(frozen=True)
class NodeDataplaneState:
    """Node-wide state: programs, uplink, policy routing, config."""

    pin_dir: Path
    build_id: str
    loaded_build_id: str
    reused_pins: bool
    drop_udp: bool
    programs: tuple[LoadedProgram, ...]
    uplink_ifindex: int
    uplink_ifname: str | None
    uplink_program: AttachedProgram | None
    policy_routing: routing.PolicyRouting
    probe_source: IPv4Address | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "pin_dir": str(self.pin_dir),
            "build_id": self.build_id,
            "loaded_build_id": self.loaded_build_id,
            "reused_pins": self.reused_pins,
            "drop_udp": self.drop_udp,
            "programs": [
                {"name": p.name, "pin": str(p.pin), "prog_id": p.prog_id, "tag": p.tag}
                for p in self.programs
            ],
            "uplink": {
                "ifindex": self.uplink_ifindex,
                "ifname": self.uplink_ifname,
                "attached": self.uplink_program is not None,
                "prog_id": self.uplink_program.prog_id if self.uplink_program else None,
            },
            "policy_routing": {
                "rule": self.policy_routing.rule,
                "route": self.policy_routing.route,
            },
            "probe_source": str(self.probe_source) if self.probe_source else None,
        }


class Dataplane:
    """Loaded programs, pinned maps and the rtnetlink socket of one node namespace."""

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
        self.layout = layout
        self.options = options
        self.unit = unit
        self.reused_pins = reused
        self._prog_fds = prog_fds
        self.maps = maps
        self._ipr = ipr
        self._lock = threading.RLock()
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------

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
        log.info(
            "dataplane open: pin_dir=%s build=%s reused_pins=%s",
            layout.root,
            unit.build_id[:12],
            reused,
        )
        return plane

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

    def __enter__(self) -> Dataplane:
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

    @property
    def build_id(self) -> str:
        return self.unit.build_id

    def program_fd(self, name: str) -> int:
        """The fd of a loaded program ("pod_ingress", "uplink_ingress", "pod_egress")."""
        return self._prog_fds[name]

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
                self._detach(old, Hook.INGRESS)
            self._attach(uplink.ifindex, _UPLINK)
            probe = config.probe_source if probe_source is None else IPv4Address(probe_source)
            self.maps.put_config(replace(config, uplink_ifindex=uplink.ifindex, probe_source=probe))

    def set_probe_source(self, probe_source: IPv4Address | str | None) -> None:
        """Allow TCP from this node address (kubelet probes) through the egress guard."""
        with self._lock:
            self._check_open()
            ip = None if probe_source is None else IPv4Address(probe_source)
            self.maps.put_config(replace(self.maps.config(), probe_source=ip))

    def node(self) -> NodeDataplaneState:
        with self._lock:
            self._check_open()
            config = self.maps.config()
            loaded = []
            for spec in PROGRAMS:
                info = syscall.prog_info(self._prog_fds[spec.name])
                loaded.append(
                    LoadedProgram(spec.name, self.layout.program(spec.name), info.id, info.tag)
                )
            uplink_prog = None
            uplink_name = None
            if config.uplink_ifindex:
                uplink_name = veth.interface_name(self._ipr, config.uplink_ifindex)
                uplink_prog = self._attached(config.uplink_ifindex).get(Hook.INGRESS)
            return NodeDataplaneState(
                pin_dir=self.layout.root,
                build_id=self.unit.build_id,
                loaded_build_id=config.build_id,
                reused_pins=self.reused_pins,
                drop_udp=self.options.drop_udp,
                programs=tuple(loaded),
                uplink_ifindex=config.uplink_ifindex,
                uplink_ifname=uplink_name,
                uplink_program=uplink_prog,
                policy_routing=routing.policy_routing(self._ipr),
                probe_source=config.probe_source,
            )

    # -- pods ----------------------------------------------------------------------------

    def enroll(
        self, pod_ip: IPv4Address | str, host_ifname: str | None = None
    ) -> PodDataplaneState:
        """Steer the pod into the ztunnel and guard it. Idempotent.

        Maps are written before the filters are attached, so the first packet a
        program sees already finds the pod.
        """
        ip = IPv4Address(pod_ip)
        with self._lock:
            self._check_open()
            iface = self._resolve(ip, host_ifname)
            self._drop_stale(ip, iface.ifindex)
            self.maps.create_counters(iface.ifindex)
            entry = PodEntry(iface.ifindex, ip, PodFlag.ENROLLED)
            self.maps.put_pod(entry)
            self.maps.put_local_ip(LocalPodEntry(ip, iface.ifindex))
            self._attach(iface.ifindex, _POD_INGRESS)
            self._attach(iface.ifindex, _POD_EGRESS)
            return self._pod_state(entry)

    def mark_local_pod(
        self, pod_ip: IPv4Address | str, host_ifname: str | None = None
    ) -> PodDataplaneState:
        """Track a local pod that is NOT enrolled (or no longer is). Idempotent.

        Its TCP to enrolled local pods is steered to the inbound plaintext
        listener; the rest of its traffic is untouched. An enrolled pod moved
        here loses its egress guard after its entries stop saying enrolled.
        """
        ip = IPv4Address(pod_ip)
        with self._lock:
            self._check_open()
            iface = self._resolve(ip, host_ifname)
            self._drop_stale(ip, iface.ifindex)
            self.maps.create_counters(iface.ifindex)
            self.maps.delete_local_ip(ip)
            entry = PodEntry(iface.ifindex, ip, PodFlag.NONE)
            self.maps.put_pod(entry)
            self._attach(iface.ifindex, _POD_INGRESS)
            self._detach(iface.ifindex, Hook.EGRESS)
            return self._pod_state(entry)

    def unenroll(self, pod_ip: IPv4Address | str) -> bool:
        """Remove every trace of the pod: filters, map entries, counters. False if unknown.

        For a pod that keeps running outside the mesh call :meth:`mark_local_pod`
        instead, so its traffic to enrolled pods is still steered.
        """
        ip = IPv4Address(pod_ip)
        with self._lock:
            self._check_open()
            found = False
            for entry in self.maps.pods():
                if entry.ip == ip:
                    self._remove_pod_entry(entry.ifindex)
                    found = True
            found = self.maps.delete_local_ip(ip) or found
            return found

    def pods(self) -> list[PodDataplaneState]:
        with self._lock:
            self._check_open()
            return [self._pod_state(entry) for entry in self.maps.pods()]

    def pod(self, pod_ip: IPv4Address | str) -> PodDataplaneState | None:
        ip = IPv4Address(pod_ip)
        with self._lock:
            self._check_open()
            for entry in self.maps.pods():
                if entry.ip == ip:
                    return self._pod_state(entry)
            return None

    def maps_dump(self) -> MapsDump:
        with self._lock:
            self._check_open()
            return self.maps.dump()

    def source(self) -> CompileUnit:
        """The compile unit (text + flags) whose build id the programs were loaded from."""
        return self.unit

    # -- teardown ------------------------------------------------------------------------

    def uninstall(self) -> None:
        """Detach every Veil filter, remove policy routing and every pin; then close."""
        with self._lock:
            self._check_open()
            uninstall_node(self.layout.root, ipr=self._ipr)
            programs.forget(self.unit.build_id)
            self.close()

    # -- internals -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise BpfError("the Dataplane is closed", hint="call Dataplane.open() again")

    def _resolve(self, ip: IPv4Address, host_ifname: str | None) -> veth.HostInterface:
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

    def _attached(self, ifindex: int) -> dict[Hook, AttachedProgram]:
        return {
            f.hook: AttachedProgram(f.name, f.hook, f.prog_id)
            for f in tc.list_bpf_filters(self._ipr, ifindex)
            if f.ours
        }

    def _pod_state(self, entry: PodEntry) -> PodDataplaneState:
        attached = self._attached(entry.ifindex)
        return PodDataplaneState(
            pod_ip=entry.ip,
            ifindex=entry.ifindex,
            host_ifname=veth.interface_name(self._ipr, entry.ifindex),
            enrolled=entry.enrolled,
            ingress=attached.get(Hook.INGRESS),
            egress=attached.get(Hook.EGRESS),
            counters=self.maps.counters(entry.ifindex) or PodCounters(),
        )

    def _drop_stale(self, ip: IPv4Address, ifindex: int) -> None:
        """Forget what a recreated pod or a reused ifindex left behind."""
        current = self.maps.pod(ifindex)
        if current is not None and current.ip != ip:
            local = self.maps.local_ip(current.ip)
            if local is not None and local.ifindex == ifindex:
                self.maps.delete_local_ip(current.ip)
            self.maps.delete_counters(ifindex)  # they belonged to the previous pod
        for entry in self.maps.pods():
            if entry.ip == ip and entry.ifindex != ifindex:
                self._remove_pod_entry(entry.ifindex)

    def _remove_pod_entry(self, ifindex: int) -> None:
        # Guard first, then steering: the pod is never reachable unguarded while
        # it is still steered, and a vanished link simply has nothing to detach.
        if veth.interface_name(self._ipr, ifindex) is not None:
            self._detach(ifindex, Hook.EGRESS)
            self._detach(ifindex, Hook.INGRESS)
            tc.remove_clsact_if_unused(self._ipr, ifindex)
        self.maps.delete_pod(ifindex)
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
