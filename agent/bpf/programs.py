"""Building and loading the BPF programs in ebpf/: flags, the compile unit, bcc.

Flags: :func:`build_cflags` is the ONE place ``-D`` options are made, from
controller/api/dataplane.py (ports, marks) and :class:`DataplaneOptions`.

Compile unit: the attach-point files (one per hook, see :data:`PROGRAMS`) are
compiled together as one bcc module. bcc spends most of its ~1 s per module
starting clang and parsing kernel headers, so one unit instead of three
saves two seconds on every fresh load. Each file stays self-contained; the
unit is their concatenation with ``#line`` markers so compiler messages name
the right file, and file-local helpers need distinct names. The unit's text
plus its flags is exactly what bcc compiles (``veilctl bpf source``), and its
sha256 is the build id stored in the config map.

Caching: Dataplane.open() reuses the pinned programs whenever the pinned
build id equals the unit's, so an agent restart (or a second Dataplane in
the same process) does not compile at all. Within a process the loaded
module is also kept per build id and reused while the pinned maps it was
built against are still the ones pinned.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any, Final

from agent.errors import BpfError
from agent.net.tc import Hook
from node import bpf as syscall
from node import dataplane as dp

__all__ = [
    "DEFAULT_EBPF_DIR",
    "DNS_PORT",
    "DROP_EVENTS_BYTES",
    "DROP_EVENT_BURST",
    "DROP_EVENT_RATE",
    "MAX_PODS",
    "MAX_POD_ADDRS",
    "PROBE",
    "PROGRAMS",
    "CompileUnit",
    "DataplaneOptions",
    "Hook",
    "LoadedPrograms",
    "ProgramSpec",
    "SourceFile",
    "build_cflags",
    "compile_unit",
    "forget",
    "load_programs",
    "load_single",
]

DEFAULT_EBPF_DIR: Final = Path(__file__).resolve().parents[2] / "ebpf"
DNS_PORT: Final = 53
# Capacity of the per-pod maps; part of the pinned layout (changing it means
# uninstalling first), and far above the pods one node runs.
MAX_PODS: Final = 4096
# Capacity of the per-address maps (pod_addrs, local_ips6): an IPv4 and a
# few IPv6 addresses per pod.
MAX_POD_ADDRS: Final = 4 * MAX_PODS
# The drop stream (ebpf/include/veil_events.h): ring buffer size (a power of
# two, a multiple of the page size; part of the pinned layout: 4096 records of
# 64 bytes) and the per-CPU rate limit of records (not of drops: the counters
# count every drop).
DROP_EVENTS_BYTES: Final = 256 * 1024
DROP_EVENT_RATE: Final = 100
DROP_EVENT_BURST: Final = 100


@dataclass(frozen=True)
class ProgramSpec:
    """One attach point: its source file, entry function, tc hook and pin name."""

    name: str
    file: str
    function: str
    hook: Hook
    attached_to: str

    @property
    def filter_name(self) -> str:
        """The tc filter name (TCA_BPF_NAME); also how Veil recognises its own filters."""
        return self.function


PROGRAMS: Final = (
    ProgramSpec(
        "pod_ingress",
        "pod_ingress.bpf.c",
        "veil_pod_ingress",
        Hook.INGRESS,
        "host-side veth of every local pod",
    ),
    ProgramSpec(
        "uplink_ingress",
        "uplink_ingress.bpf.c",
        "veil_uplink_ingress",
        Hook.INGRESS,
        "the node's uplink",
    ),
    ProgramSpec(
        "pod_egress",
        "pod_egress.bpf.c",
        "veil_pod_egress",
        Hook.EGRESS,
        "host-side veth of enrolled pods (egress guard)",
    ),
)
PROBE: Final = ProgramSpec(
    "probe_sk_assign",
    "probe_sk_assign.bpf.c",
    "veil_probe_sk_assign",
    Hook.INGRESS,
    "nothing (preflight only)",
)


@dataclass(frozen=True)
class DataplaneOptions:
    """Compile-time choices. Changing one changes the build id, so a reload swaps programs."""

    drop_udp: bool = False
    # Let ICMP/ICMPv6 echo through to and from enrolled pods (dropped by default).
    allow_icmp_echo: bool = False
    ebpf_dir: Path = DEFAULT_EBPF_DIR
    # Pin the same-node splice (agent.bpf.splice) for the ztunnel; not part of
    # the tc build id: it is a separate, optional set of pins.
    same_node_splice: bool = True
    # The node's IPv6 kubelet probe source, let through the egress guard. A
    # build flag, not a config-map field: the pinned config map's layout holds
    # one IPv4 address, and a new value layout would mean uninstalling first.
    probe_source6: IPv6Address | None = None


def build_cflags(options: DataplaneOptions, pin_dir: Path) -> tuple[str, ...]:
    """Every -D/-I flag the programs are compiled with, in a stable order."""
    flags = [
        f"-I{options.ebpf_dir / 'include'}",
        f"-DVEIL_OUTBOUND_PORT={dp.OUTBOUND_PORT}",
        f"-DVEIL_INBOUND_PLAINTEXT_PORT={dp.INBOUND_PLAINTEXT_PORT}",
        f"-DVEIL_HBONE_PORT={dp.HBONE_PORT}",
        f"-DVEIL_DNS_PORT={DNS_PORT}",
        f"-DVEIL_MARK_MASK={dp.MARK_MASK:#x}",
        f"-DVEIL_MARK_REDIRECT={dp.MARK_REDIRECT:#x}",
        f"-DVEIL_MARK_ZTUNNEL={dp.MARK_ZTUNNEL:#x}",
        f'-DVEIL_PIN_DIR="{pin_dir}"',
        f"-DVEIL_MAX_PODS={MAX_PODS}",
        f"-DVEIL_MAX_POD_ADDRS={MAX_POD_ADDRS}",
        f"-DVEIL_DROP_EVENTS_BYTES={DROP_EVENTS_BYTES}",
        f"-DVEIL_DROP_EVENT_RATE={DROP_EVENT_RATE}",
        f"-DVEIL_DROP_EVENT_BURST={DROP_EVENT_BURST}",
    ]
    if options.drop_udp:
        flags.append("-DVEIL_DROP_UDP=1")
    if options.allow_icmp_echo:
        flags.append("-DVEIL_ALLOW_ICMP_ECHO=1")
    if options.probe_source6 is not None:
        flags += _probe_source6_flags(IPv6Address(options.probe_source6))
    return tuple(flags)


def _probe_source6_flags(addr: IPv6Address) -> list[str]:
    # Four host-order 32-bit words, most significant first; the program
    # compares each with bpf_htonl(word) against the packet's saddr words.
    raw = addr.packed
    words = [int.from_bytes(raw[i : i + 4], "big") for i in range(0, 16, 4)]
    return ["-DVEIL_PROBE_SOURCE6=1"] + [
        f"-DVEIL_PROBE_SOURCE6_W{i}={w:#010x}U" for i, w in enumerate(words)
    ]


@dataclass(frozen=True)
class SourceFile:
    path: Path
    text: str


@dataclass(frozen=True)
class CompileUnit:
    """Exactly what bcc compiles: ``text`` with ``cflags``. ``build_id`` is their sha256."""

    files: tuple[SourceFile, ...]
    headers: tuple[SourceFile, ...]
    cflags: tuple[str, ...]
    text: str
    build_id: str

    def render(self) -> str:
        """The unit as a reader wants it: flags first, then the text, then the headers."""
        lines = ["/* Veil BPF compile unit, build id " + self.build_id, " * cflags:"]
        lines += [f" *   {flag}" for flag in self.cflags]
        lines.append(" */")
        parts = ["\n".join(lines), self.text]
        for header in self.headers:
            parts.append(f"/* ---- included header {header.path} ---- */\n{header.text}")
        return "\n".join(parts)


def compile_unit(options: DataplaneOptions, pin_dir: Path) -> CompileUnit:
    """Read the program files and headers and fix the flags; no compiling yet."""
    cflags = build_cflags(options, pin_dir)
    files = tuple(_read(options.ebpf_dir / spec.file) for spec in PROGRAMS)
    include = options.ebpf_dir / "include"
    headers = tuple(_read(p) for p in sorted(include.glob("*.h")))
    text = "".join(f'#line 1 "{f.path}"\n{f.text}' for f in files)
    digest = hashlib.sha256()
    for part in (text, *cflags, *(h.text for h in headers)):
        digest.update(part.encode())
        digest.update(b"\0")
    return CompileUnit(files, headers, cflags, text, digest.hexdigest())


def _read(path: Path) -> SourceFile:
    try:
        return SourceFile(path, path.read_text())
    except OSError as exc:
        raise BpfError(
            f"cannot read BPF source {path}: {exc.strerror}",
            hint="the agent needs the ebpf/ directory of its release; "
            "set DataplaneOptions.ebpf_dir if it lives elsewhere",
        ) from exc


@dataclass
class LoadedPrograms:
    """Programs loaded by one bcc module; ``fds`` stay valid until close()."""

    build_id: str
    fds: dict[str, int]
    map_ids: frozenset[int]
    _module: Any = field(repr=False)

    def close(self) -> None:
        if self._module is not None:
            self._module.cleanup()
            self._module = None


_cache: dict[str, LoadedPrograms] = {}
_cache_lock = threading.Lock()


def load_programs(
    unit: CompileUnit, pinned_map_ids: frozenset[int] | None = None
) -> LoadedPrograms:
    """Compile and load the unit (creating or reusing its pinned maps).

    ``pinned_map_ids`` are the ids of the maps pinned right now; a cached
    module is reused only if it was built against exactly those maps.
    """
    with _cache_lock:
        cached = _cache.get(unit.build_id)
        if cached is not None and pinned_map_ids is not None and cached.map_ids == pinned_map_ids:
            return cached
        if cached is not None:
            cached.close()
            del _cache[unit.build_id]
        module = _compile(unit.text, unit.cflags, "Veil data-plane programs")
        try:
            fds: dict[str, int] = {}
            map_ids: set[int] = set()
            for spec in PROGRAMS:
                fds[spec.name] = _load_func(module, spec.function)
                map_ids.update(syscall.prog_info(fds[spec.name]).map_ids)
        except BaseException:
            module.cleanup()
            raise
        loaded = LoadedPrograms(unit.build_id, fds, frozenset(map_ids), module)
        _cache[unit.build_id] = loaded
        return loaded


def forget(build_id: str | None = None) -> None:
    """Drop cached modules (all, or one build), e.g. after their pins were removed."""
    with _cache_lock:
        for key in [k for k in _cache if build_id is None or k == build_id]:
            _cache.pop(key).close()


def load_single(
    spec: ProgramSpec, ebpf_dir: Path = DEFAULT_EBPF_DIR, cflags: tuple[str, ...] = ()
) -> None:
    """Compile and load one standalone program, then unload it (preflight probes)."""
    source = _read(ebpf_dir / spec.file)
    module = _compile(source.text, cflags, spec.file)
    try:
        _load_func(module, spec.function)
    finally:
        module.cleanup()


def _compile(text: str, cflags: tuple[str, ...], what: str) -> Any:
    try:
        from bcc import BPF
    except ImportError as exc:
        raise BpfError(
            "bcc is not importable",
            hint="apt-get install python3-bpfcc, and create the venv with "
            "/usr/bin/python3 -m venv --system-site-packages",
        ) from exc
    with _captured_stderr() as log:
        try:
            return BPF(text=text.encode(), cflags=list(cflags))
        except Exception as exc:  # bcc raises bare Exception
            raise BpfError(
                f"compiling {what} failed: {exc}\n{log.head()}",
                hint=_compile_hint(log.text()),
            ) from exc


def _load_func(module: Any, function: str) -> int:
    from bcc import BPF

    with _captured_stderr() as log:
        try:
            fn = module.load_func(function.encode(), BPF.SCHED_CLS)
        except Exception as exc:  # bcc raises bare Exception with the verifier log on stderr
            raise BpfError(
                f"the kernel refused BPF program {function}: {exc}\n{log.tail()}",
                hint="needs Linux 5.7+ with bpf_sk_assign; run `veil agent preflight` "
                "for the exact missing piece",
            ) from exc
    return int(fn.fd)


def _compile_hint(log: str) -> str:
    lowered = log.lower()
    if "kernel headers" in lowered or ("linux/" in lowered and "file not found" in lowered):
        from agent.preflight import headers_fix  # late: preflight imports this module

        release = os.uname().release
        try:
            installed = sorted(os.listdir("/usr/src"))
        except OSError:
            installed = []
        return f"bcc needs kernel headers at /lib/modules/{release}/build: " + headers_fix(
            release, os.uname().machine, installed
        )
    return "a BPF source or flag is wrong; the compiler output above names the line"


class _Log:
    def __init__(self, path: Path) -> None:
        self.path = path

    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except OSError:
            return ""

    def head(self, lines: int = 30) -> str:
        """The first lines: clang's first error is the one that matters."""
        return "\n".join(self.text().splitlines()[:lines])

    def tail(self, lines: int = 40) -> str:
        """The last lines: the verifier states why it refused at the end of its log."""
        return "\n".join(self.text().splitlines()[-lines:])


@contextlib.contextmanager
def _captured_stderr() -> Iterator[_Log]:
    """Capture fds 1 and 2 while bcc runs: clang and the verifier print only there.

    (libbcc prints some diagnostics, such as missing kernel headers, on stdout.)
    The captured text is replayed to the real stderr afterwards, so warnings
    stay visible, and attached to the error when something fails.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryDirectory(prefix="veil-bcc-") as tmp:
        path = Path(tmp) / "output"
        saved = (os.dup(1), os.dup(2))
        failed = True
        try:
            with open(path, "wb") as sink:
                os.dup2(sink.fileno(), 1)
                os.dup2(sink.fileno(), 2)
                try:
                    yield _Log(path)
                    failed = False
                finally:
                    os.dup2(saved[0], 1)
                    os.dup2(saved[1], 2)
        finally:
            os.close(saved[0])
            os.close(saved[1])
        captured = path.read_bytes() if path.exists() else b""
        if captured and not failed:
            os.write(2, captured)
