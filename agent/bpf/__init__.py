"""Veil's BPF programs from the agent's side: build, load, pin, typed map access.

Public entry point: :class:`Dataplane` (see agent.bpf.dataplane). Importing
this package does not import bcc; only compiling does.
"""

from agent.bpf.codes import DROP_SLOTS, DropReason, PodFlag
from agent.bpf.dataplane import (
    AttachedProgram,
    Dataplane,
    LoadedProgram,
    NodeDataplaneState,
    PodDataplaneState,
    uninstall_node,
)
from agent.bpf.maps import DataplaneMaps, LocalPodEntry, MapsDump, NodeConfig, PodCounters, PodEntry
from agent.bpf.pins import DEFAULT_PIN_DIR, PinLayout
from agent.bpf.programs import PROGRAMS, CompileUnit, DataplaneOptions, build_cflags, compile_unit

__all__ = [
    "DEFAULT_PIN_DIR",
    "DROP_SLOTS",
    "PROGRAMS",
    "AttachedProgram",
    "CompileUnit",
    "Dataplane",
    "DataplaneMaps",
    "DataplaneOptions",
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
    "uninstall_node",
]
