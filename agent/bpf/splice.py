"""The same-node splice: build ebpf/sockmap.bpf.c, attach it to its sockhash, pin it all.

The ztunnel splices an authorized same-node connection in the kernel by
putting its two sockets into pinned sockhashes (see ebpf/sockmap.bpf.c and
ztunnel/proxy/splice.py). It must not load bcc itself (bcc and LLVM cost
about 130 MB of RSS per process), so the agent compiles the verdict program,
attaches it to ``splice_socks`` and pins the three maps and the program
under its pin directory; the ztunnel opens the pins with raw bpf(2) calls.

Layout (names in :data:`node.bpf.SPLICE_MAPS`)::

    splice_socks  splice_targets  splice_peers  prog_splice_verdict

The attachment belongs to the map: as long as anything (a pin, the
ztunnel's fd) holds ``splice_socks``, the verdict stays attached to it. So an
agent restart reuses a complete, consistent set of pins without compiling,
and a rebuilt set replaces the pins one by one (the program last, which is
what the ztunnel checks) while a ztunnel that opened the old set keeps using
it until it reopens.

This is separate from the tc compile unit (agent.bpf.programs) because it
is optional: without sockmap support the agent still steers, and the ztunnel
relays same-node bytes in Python.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.bpf.pins import PinLayout, open_pin, pin_atomically
from agent.bpf.programs import DEFAULT_EBPF_DIR
from agent.errors import BpfError
from node import bpf

__all__ = [
    "SPLICE_FILE",
    "SPLICE_FUNCTION",
    "SpliceStatus",
    "build_id",
    "ensure_splice",
    "splice_cflags",
]

SPLICE_FILE: Final = "sockmap.bpf.c"
SPLICE_FUNCTION: Final = "veil_splice_verdict"
# (map type, key size, value size, max entries) each pin must have.
_LAYOUT: Final = {
    "splice_socks": (bpf.BPF_MAP_TYPE_SOCKHASH, 8, 4, bpf.SPLICE_MAX),
    "splice_targets": (bpf.BPF_MAP_TYPE_SOCKHASH, 8, 4, bpf.SPLICE_MAX),
    "splice_peers": (bpf.BPF_MAP_TYPE_HASH, 8, 16, bpf.SPLICE_MAX),
}
_BUILD_KEY: Final = bytes(8)  # cookie 0: never a socket's
_BPF_PROG_TYPE_SK_SKB: Final = 14
_SK_SKB_STREAM_VERDICT: Final = 5


@dataclass(frozen=True)
class SpliceStatus:
    """What :func:`ensure_splice` found or made."""

    pin_dir: Path
    reused: bool
    program_id: int


def splice_cflags(ebpf_dir: Path) -> tuple[str, ...]:
    return (
        f"-I{ebpf_dir / 'include'}",
        f"-DVEIL_SPLICE_MAX={bpf.SPLICE_MAX}",
    )


def ensure_splice(layout: PinLayout, ebpf_dir: Path = DEFAULT_EBPF_DIR) -> SpliceStatus:
    """Reuse the pinned splice when complete and consistent; otherwise build and pin it.

    Raises BpfError (with a hint) when the kernel or bcc cannot provide it;
    the caller decides that this is not fatal.
    """
    text = _read(ebpf_dir)
    build = build_id(text, splice_cflags(ebpf_dir))
    prog_id = _pinned_consistent(layout, build)
    if prog_id is not None:
        return SpliceStatus(layout.root, True, prog_id)
    return SpliceStatus(layout.root, False, _build_and_pin(layout, ebpf_dir, text, build))


def build_id(text: str, cflags: tuple[str, ...]) -> bytes:
    """16 bytes naming the source and flags a pinned splice was built from.

    Stored in splice_peers under key 0 (socket cookies start at 1, so no
    socket can collide): a changed program is rebuilt instead of reused.
    """
    digest = hashlib.sha256(text.encode())
    for flag in cflags:
        digest.update(b"\0" + flag.encode())
    return digest.digest()[:16]


def _read(ebpf_dir: Path) -> str:
    path = ebpf_dir / SPLICE_FILE
    try:
        return path.read_text() + "".join(
            p.read_text() for p in sorted((ebpf_dir / "include").glob("veil_splice*.h"))
        )
    except OSError as exc:
        raise BpfError(
            f"cannot read BPF source {path}: {exc.strerror}",
            hint="the agent needs the ebpf/ directory of its release",
        ) from exc


def _pinned_consistent(layout: PinLayout, build: bytes) -> int | None:
    """The program id when every splice pin exists, has its layout, belongs
    together and was built from ``build``."""
    ids: set[int] = set()
    for name, want in _LAYOUT.items():
        fd = open_pin(layout.map(name))
        if fd is None:
            return None
        try:
            info = bpf.map_info(fd)
            stored = bpf.map_lookup(fd, _BUILD_KEY, 16) if name == "splice_peers" else None
        finally:
            os.close(fd)
        if (info.type, info.key_size, info.value_size, info.max_entries) != want:
            return None
        if name == "splice_peers" and (stored is None or stored != build):
            return None
        ids.add(info.id)
    fd = open_pin(layout.program(bpf.SPLICE_PROGRAM))
    if fd is None:
        return None
    try:
        prog = bpf.prog_info(fd)
    finally:
        os.close(fd)
    if prog.type != _BPF_PROG_TYPE_SK_SKB or not set(prog.map_ids) <= ids:
        return None
    return prog.id


def _build_and_pin(layout: PinLayout, ebpf_dir: Path, text: str, build: bytes) -> int:
    try:
        from bcc import BPF, lib
    except ImportError as exc:
        raise BpfError(
            "bcc is not importable",
            hint="apt-get install python3-bpfcc, and create the venv with "
            "/usr/bin/python3 -m venv --system-site-packages",
        ) from exc
    from agent.bpf.programs import _captured_stderr, _compile_hint

    with _captured_stderr() as log:
        try:
            source = (ebpf_dir / SPLICE_FILE).read_text()
            module = BPF(text=source.encode(), cflags=list(splice_cflags(ebpf_dir)))
        except Exception as exc:  # bcc raises bare Exception
            raise BpfError(
                f"compiling {SPLICE_FILE} failed: {exc}\n{log.head()}",
                hint=_compile_hint(log.text()),
            ) from exc
    try:
        with _captured_stderr() as log:
            try:
                fn = module.load_func(SPLICE_FUNCTION.encode(), BPF.SK_SKB)
            except Exception as exc:
                raise BpfError(
                    f"the kernel refused the sk_skb program {SPLICE_FUNCTION}: {exc}\n{log.tail()}",
                    hint="the same-node fast path needs CONFIG_BPF_STREAM_PARSER (sockmap); "
                    "without it the ztunnel relays same-node bytes in Python",
                ) from exc
        fds = {name: int(lib.bpf_table_fd(module.module, name.encode())) for name in _LAYOUT}
        rc = lib.bpf_prog_attach(fn.fd, fds["splice_socks"], _SK_SKB_STREAM_VERDICT, 0)
        if rc < 0:
            raise BpfError(
                f"cannot attach {SPLICE_FUNCTION} to splice_socks: {os.strerror(-rc)}",
                hint="the same-node fast path needs sockmap support (CONFIG_BPF_STREAM_PARSER)",
            )
        bpf.map_update(fds["splice_peers"], _BUILD_KEY, build)
        # Maps first, program last: a complete program pin means a complete set.
        for name, fd in fds.items():
            pin_atomically(fd, layout.map(name))
        pin_atomically(int(fn.fd), layout.program(bpf.SPLICE_PROGRAM))
        return bpf.prog_info(int(fn.fd)).id
    finally:
        # The pins (and the attachment, held by splice_socks) outlive the module.
        module.cleanup()
