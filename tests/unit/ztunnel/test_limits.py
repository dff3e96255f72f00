"""The ztunnel's open-file limit: raised to the hard limit at start, a warning when low."""

from __future__ import annotations

import resource
import subprocess
import sys
from collections.abc import Callable

import pytest

from ztunnel.limits import LOW_NOFILE, plan_nofile

INF = resource.RLIM_INFINITY


@pytest.mark.parametrize(
    ("soft", "hard", "target", "warns"),
    [
        (1024, 1_048_576, 1_048_576, False),  # the common container default
        (1024, 4096, 4096, True),  # raised, still low
        (1024, 1024, 1024, True),  # nothing to raise
        (65536, 65536, 65536, False),
        (1024, INF, INF, False),
        (INF, INF, INF, False),
        (LOW_NOFILE, LOW_NOFILE, LOW_NOFILE, False),
    ],
)
def test_plan(soft: int, hard: int, target: int, warns: bool) -> None:
    plan = plan_nofile(soft, hard)
    assert plan.target == target
    assert (plan.warning is not None) == warns
    if plan.warning:
        assert str(target) in plan.warning and "LimitNOFILE" in plan.warning


def _run_with_limit(soft: int, hard: int) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter started under (soft, hard), the way a ztunnel inherits it."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    preexec: Callable[[], None] = limit
    code = (
        "import logging, resource; logging.basicConfig(level=logging.INFO);"
        "from ztunnel.limits import raise_nofile_limit; raise_nofile_limit();"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        preexec_fn=preexec,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_soft_limit_is_raised_and_a_low_result_warns_once_with_the_fix() -> None:
    done = _run_with_limit(256, 1024)
    assert int(done.stdout.strip()) == 1024
    assert "raised from 256 to 1024" in done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1
    assert "1024" in warnings[0] and str(LOW_NOFILE) in warnings[0]
    assert "LimitNOFILE" in warnings[0]


def test_a_high_limit_is_left_alone_without_a_warning() -> None:
    done = _run_with_limit(LOW_NOFILE, LOW_NOFILE)
    assert int(done.stdout.strip()) == LOW_NOFILE
    assert "WARNING" not in done.stderr and "raised" not in done.stderr
