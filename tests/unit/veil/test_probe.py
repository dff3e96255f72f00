"""``python -m veil.probe``: the exec-probe client of the ztunnel's health socket."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from veil.probe import ProbeUnavailable, ask, main


def _serve_once(path: Path, answer: bytes) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def run() -> None:
        with srv:
            conn, _ = srv.accept()
            with conn:
                conn.recv(64)
                conn.sendall(answer)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        ({"check": "ready", "ok": True, "reasons": []}, 0),
        ({"check": "ready", "ok": False, "reasons": ["listeners: not bound"]}, 1),
    ],
)
def test_exit_code_follows_the_answer(tmp_path: Path, answer: dict[str, object], code: int) -> None:
    sock = tmp_path / "h.sock"
    t = _serve_once(sock, json.dumps(answer).encode() + b"\n")
    assert main([str(sock), "ready"]) == code
    t.join(5)


def test_nonsense_and_missing_sockets_are_unavailable(tmp_path: Path) -> None:
    sock = tmp_path / "h.sock"
    t = _serve_once(sock, b"HTTP/1.1 200 OK\r\n\r\n")
    with pytest.raises(ProbeUnavailable, match="not a health answer"):
        ask(sock)
    t.join(5)
    with pytest.raises(ProbeUnavailable, match="no health socket"):
        ask(tmp_path / "missing.sock")
    assert main([str(tmp_path / "missing.sock")]) == 1
    assert main([]) == 2
    assert main(["x", "bogus"]) == 2


def test_the_probe_module_loads_no_other_veil_room() -> None:
    code = (
        "import sys, veil.probe; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('controller','node','agent','ztunnel','waypoint','lab','cli','grpc','aiohttp')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
