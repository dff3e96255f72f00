"""Our sans-IO HTTP/2 codec against the ``h2`` library, same exchange, same run.

One message = what one HBONE tunnel costs the codec on both ends: the client
opens a CONNECT stream, the server answers 200, the client sends N DATA
frames of SIZE bytes, the server receives them and returns the window, both
half-close. Connections are set up once (the handshake is not the subject);
each side only ever sees the other's bytes, as over a socket.

    .venv/bin/python -m perf.bench_h2_codec [--streams 2000] [--frames 4] [--size 1024]

Prints µs per tunnel and frames/s for each codec, plus the ratio, as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events

from ztunnel.hbone.http2.connection import H2Connection, Role
from ztunnel.hbone.http2.events import DataReceived, RequestReceived

__all__ = ["main", "run_h2", "run_ours"]

HEADERS = [(":method", "CONNECT"), (":authority", "10.0.0.7:8080")]


def _join(chunks: list[bytes | memoryview]) -> bytes:
    return b"".join(chunks)


def run_ours(streams: int, frames: int, size: int) -> int:
    client, server = H2Connection(Role.CLIENT), H2Connection(Role.SERVER)
    client.initiate()
    server.initiate()
    server.receive_data(_join(client.data_to_send()))
    client.receive_data(_join(server.data_to_send()))
    server.receive_data(_join(client.data_to_send()))
    payload = b"p" * size
    sent = 0
    for _ in range(streams):
        sid = client.send_request(HEADERS)
        for event in server.receive_data(_join(client.data_to_send())):
            if isinstance(event, RequestReceived):
                server.send_response(event.stream_id, 200)
        client.receive_data(_join(server.data_to_send()))
        for i in range(frames):
            client.send_data(sid, payload, end_stream=i == frames - 1)
            sent += 1
        for event in server.receive_data(_join(client.data_to_send())):
            if isinstance(event, DataReceived):
                server.acknowledge_received_data(event.stream_id, len(event.data))
        server.end_stream(sid)
        client.receive_data(_join(server.data_to_send()))
    return sent


def run_h2(streams: int, frames: int, size: int) -> int:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, validate_inbound_headers=True)
    )
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    payload = b"p" * size
    sent = 0
    for _ in range(streams):
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, HEADERS)
        for event in server.receive_data(client.data_to_send()):
            if isinstance(event, h2.events.RequestReceived):
                server.send_headers(event.stream_id, [(":status", "200")])
        client.receive_data(server.data_to_send())
        for i in range(frames):
            client.send_data(sid, payload, end_stream=i == frames - 1)
            sent += 1
        for event in server.receive_data(client.data_to_send()):
            if isinstance(event, h2.events.DataReceived):
                server.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        server.end_stream(sid)
        client.receive_data(server.data_to_send())
    return sent


def _measure(fn: Callable[[int, int, int], int], args: argparse.Namespace) -> dict[str, float]:
    fn(max(1, args.streams // 10), args.frames, args.size)  # warm up
    best = float("inf")
    for _ in range(args.repeat):
        start = time.perf_counter()
        sent = fn(args.streams, args.frames, args.size)
        best = min(best, time.perf_counter() - start)
    # Frames on the wire per tunnel: HEADERS, 200, the DATA frames, the server's END_STREAM.
    wire_frames = args.streams * (3 + args.frames)
    return {
        "us_per_tunnel": round(best / args.streams * 1e6, 2),
        "frames_per_second": round(wire_frames / best),
        "data_frames": sent,
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--frames", type=int, default=4, help="DATA frames per tunnel")
    parser.add_argument("--size", type=int, default=1024, help="bytes per DATA frame")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    args = parser.parse_args(argv)
    ours = _measure(run_ours, args)
    theirs = _measure(run_h2, args)
    report: dict[str, object] = {
        "exchange": f"CONNECT + 200 + {args.frames} x {args.size}-byte DATA + half-closes",
        "streams": args.streams,
        "veil": ours,
        "h2": theirs,
        "speedup": round(theirs["us_per_tunnel"] / ours["us_per_tunnel"], 2),
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
