"""``veil controller run`` as a new user meets it: a port it cannot bind is
reported before any CA is written, and a run without --registry warns that the
mesh is empty. Real controller processes on loopback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.support.controller import ControllerProcess


def test_unbindable_port_fails_before_writing_a_ca(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    ctl = ControllerProcess(
        tmp_path, registry_doc={"workloads": []}, mtls_port=port, start_timeout=20
    )
    try:
        with pytest.raises(AssertionError, match="did not start"):
            ctl.start()
        assert "cannot listen on 127.0.0.1:" in ctl.log_text()
        written = sorted(p.name for p in ctl.state_dir.rglob("*")) if ctl.state_dir.exists() else []
        assert not any("ca" in name for name in written), written
    finally:
        ctl.stop()
        holder.close()


def test_no_registry_warns_the_mesh_is_empty(tmp_path: Path) -> None:
    ctl = ControllerProcess(tmp_path, registry_doc=None)
    try:
        ctl.start()
        assert "the mesh is empty" in ctl.log_text()
    finally:
        ctl.stop()
