"""Veil's BPF programs from the agent's side: build, load, pin, typed map access.

Public entry points: :class:`Dataplane` (load, attach, enroll; see
agent.bpf.dataplane) and :class:`DataplaneView` (read-only inspection of the
pins, for the CLI). Importing this package does not import bcc; only
compiling does.
"""

from agent.bpf.codes import DROP_SLOTS, DropReason, PodFlag
from agent.bpf.dataplane import Dataplane, uninstall_node
from agent.bpf.maps import DataplaneMaps, LocalPodEntry, MapsDump, NodeConfig, PodCounters, PodEntry
from agent.bpf.pins import DEFAULT_PIN_DIR, PinLayout
from agent.bpf.programs import PROGRAMS, CompileUnit, DataplaneOptions, build_cflags, compile_unit
from agent.bpf.state import AttachedProgram, LoadedProgram, NodeDataplaneState, PodDataplaneState
from agent.bpf.view import DataplaneView, loaded_source

__all__ = [
    "DEFAULT_PIN_DIR",
    "DROP_SLOTS",
    "PROGRAMS",
    "AttachedProgram",
    "CompileUnit",
    "Dataplane",
    "DataplaneMaps",
    "DataplaneOptions",
    "DataplaneView",
    "DropReason",
    "LoadedProgram",
    "LocalPodEntry",
    "MapsDump",
    "NodeConfig",
    "NodeDataplaneState",
    "PinLayout",
    "PodCounters",
    "PodDataplaneState",
    "PodEntry",
    "PodFlag",
    "build_cflags",
    "compile_unit",
    "loaded_source",
    "uninstall_node",
]
