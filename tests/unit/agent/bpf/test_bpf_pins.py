"""Pin directory validation and bpffs mount discovery."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.bpf.pins import PinLayout, bpffs_mount_for, validate_pin_dir
from agent.errors import BpfError

MOUNTINFO = """\
22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw
23 22 0:21 / /sys rw,nosuid shared:7 - sysfs sysfs rw
35 23 0:30 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:14 - bpf bpf rw,mode=700
40 23 0:33 / /sys/fs/cgroup rw shared:9 - cgroup2 cgroup2 rw
"""


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/sys/fs/bpf/veil", ("/sys/fs/bpf", "bpf")),
        ("/sys/fs/bpf", ("/sys/fs/bpf", "bpf")),
        ("/sys/fs/bpf/veil/node-a", ("/sys/fs/bpf", "bpf")),
        ("/sys/fs/bpfx", ("/sys", "sysfs")),
        ("/tmp/x", ("/", "ext4")),
    ],
)
def test_mount_lookup_picks_the_deepest_covering_mount(
    path: str, expected: tuple[str, str]
) -> None:
    found = bpffs_mount_for(Path(path), MOUNTINFO)
    assert found == (Path(expected[0]), expected[1])


def test_later_mount_shadows_earlier() -> None:
    text = MOUNTINFO + "50 23 0:40 / /sys/fs/bpf rw - tmpfs tmpfs rw\n"
    assert bpffs_mount_for(Path("/sys/fs/bpf/veil"), text) == (Path("/sys/fs/bpf"), "tmpfs")


def test_garbage_mountinfo_finds_nothing() -> None:
    assert bpffs_mount_for(Path("/sys/fs/bpf"), "nonsense\n\n- -\n") is None


@pytest.mark.parametrize(
    "path", ["/sys/fs/bpf/veil", "/sys/fs/bpf/veil-test/vt1a2b-node-a", "/sys/fs/bpf/veil/n_1"]
)
def test_valid_pin_dirs(path: str) -> None:
    assert validate_pin_dir(Path(path)) == Path(path)


@pytest.mark.parametrize(
    "path",
    ["relative/dir", "/sys/fs/bpf/ve.il", '/sys/fs/bpf/"x', "/sys/fs/bpf/a:b", "/sys/fs/bpf/a b"],
)
def test_invalid_pin_dirs_are_refused_with_a_hint(path: str) -> None:
    with pytest.raises(BpfError) as info:
        validate_pin_dir(Path(path))
    assert info.value.hint


def test_layout_names() -> None:
    layout = PinLayout(Path("/sys/fs/bpf/veil"))
    assert layout.map("pods") == Path("/sys/fs/bpf/veil/pods")
    assert layout.program("pod_egress") == Path("/sys/fs/bpf/veil/prog_pod_egress")
    assert "." not in layout.program("uplink_ingress").name
