"""Test helper process (not a test): load Veil's data plane, report, then wait to be killed.

Run inside a node namespace with ``nsenter --net=...`` (not ``ip netns exec``,
which remounts /sys and hides the host's bpffs)::

    python dataplane_holder.py <pin_dir> <uplink> <pod_ip>...

Prints one JSON line with the program ids and the filters it attached, then
sleeps (at most 120 s) until the test sends SIGKILL.
"""

from __future__ import annotations

import json
import sys
import time

from agent.bpf import Dataplane


def main(argv: list[str]) -> int:
    pin_dir, uplink, *pods = argv
    plane = Dataplane.open(pin_dir)
    plane.setup_node(uplink)
    states = [plane.enroll(ip) for ip in pods]
    report = {
        "programs": {p.name: p.prog_id for p in plane.node().programs},
        "pods": {
            s.host_ifname: [s.ingress.prog_id, s.egress.prog_id]
            for s in states
            if s.ingress and s.egress
        },
    }
    print(json.dumps(report), flush=True)
    time.sleep(120)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
