"""Worker count and restart decisions, as tables."""

from __future__ import annotations

import pytest

from ztunnel.workers.supervision import (
    MAX_DEFAULT_WORKERS,
    RestartPolicy,
    default_workers,
    kernel_version,
    resolve_workers,
)


@pytest.mark.parametrize(
    ("cpus", "want"), [(0, 1), (1, 1), (2, 2), (8, 8), (64, MAX_DEFAULT_WORKERS)]
)
def test_default_is_the_usable_cpus_capped(cpus: int, want: int) -> None:
    assert default_workers(cpus) == want


@pytest.mark.parametrize(
    ("release", "want"),
    [("6.18.0-1-amd64", (6, 18)), ("6.5.0", (6, 5)), ("5.15.0-91-generic", (5, 15)), ("x", None)],
)
def test_kernel_version(release: str, want: tuple[int, int] | None) -> None:
    assert kernel_version(release) == want


@pytest.mark.parametrize(
    ("requested", "cpus", "release", "steering", "workers", "warns"),
    [
        (None, 2, "6.18.0", True, 2, False),
        (None, 32, "6.18.0", True, 8, False),
        (4, 2, "6.18.0", True, 4, False),  # an explicit count beats the CPU count
        (1, 8, "5.10.0", True, 1, False),  # one worker needs nothing of the kernel
        (None, 4, "6.4.12", True, 1, True),  # too old for sk_assign onto reuseport
        (2, 4, "garbage", True, 1, True),  # unreadable: fail safe, say so
        (2, 4, "5.10.0", False, 2, False),  # no eBPF steering (loopback tests)
    ],
)
def test_resolve_workers(
    requested: int | None, cpus: int, release: str, steering: bool, workers: int, warns: bool
) -> None:
    got = resolve_workers(requested, cpus, release, steering=steering)
    assert got.workers == workers
    assert (got.warning is not None) == warns
    if got.warning:
        assert "6.5" in got.warning and "--workers 1" in got.warning


def test_restart_delay_grows_while_crashing_and_is_bounded() -> None:
    p = RestartPolicy(initial=0.5, maximum=30.0, stable_after=30.0)
    delays = [p.delay(n) for n in range(1, 12)]
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0]
    assert max(delays) == 30.0
    assert delays == sorted(delays)
    assert p.delay(10_000) == 30.0


@pytest.mark.parametrize(
    ("streak", "uptime", "want"),
    [(0, 1.0, 1), (3, 2.0, 4), (7, 31.0, 1), (1, 30.0, 1)],
)
def test_a_stable_run_resets_the_crash_streak(streak: int, uptime: float, want: int) -> None:
    assert RestartPolicy(stable_after=30.0).next_streak(streak, uptime) == want


def test_workers_setting_from_flag_and_environment() -> None:
    from ztunnel.config import config_from_args
    from ztunnel.errors import ConfigError

    assert config_from_args({"node_name": "n"}, {}).workers is None
    assert config_from_args({"node_name": "n"}, {"VEIL_ZTUNNEL_WORKERS": "3"}).workers == 3
    assert config_from_args({"node_name": "n", "workers": "2"}, {}).workers == 2
    with pytest.raises(ConfigError, match="--workers / VEIL_ZTUNNEL_WORKERS"):
        config_from_args({"node_name": "n", "workers": "0"}, {})
