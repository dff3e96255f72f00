"""The splice(2) relay's pure part: what capacity a pipe ends up with."""

from __future__ import annotations

import pytest

from ztunnel.proxy.pipes import PIPE_SIZE, pipe_capacity


@pytest.mark.parametrize(
    ("requested", "granted", "default", "expected"),
    [
        (PIPE_SIZE, PIPE_SIZE, 65536, PIPE_SIZE),  # F_SETPIPE_SZ granted it
        (PIPE_SIZE, None, 65536, 65536),  # refused (EPERM above pipe-max-size)
        (PIPE_SIZE, 0, 65536, 65536),  # nonsense from the kernel: the default
        (100_000, 131072, 65536, 100_000),  # rounded up by the kernel: use what was asked
        (0, None, 65536, 65536),
        (PIPE_SIZE, None, 0, 1),  # never zero: the relay always makes progress
    ],
)
def test_pipe_capacity(requested: int, granted: int | None, default: int, expected: int) -> None:
    assert pipe_capacity(requested, granted, default) == expected
