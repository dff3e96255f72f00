"""Fixtures for the ztunnel's netns tests: a whole mesh on the lab
(see :mod:`tests.support.ztunnel_lab`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.ztunnel_lab import APP_PORT, STEERING, Lab, running_lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(
        tmp_path_factory.mktemp("ztunnel-lab"),
        [
            ("payments", "echo", APP_PORT),
            ("payments", "whoami", 8081),
            ("inventory", "whoami", APP_PORT),
            ("other", "whoami", APP_PORT),
        ],
        steering=STEERING,
        # 10 s certificates: every test here also runs across rotations
        # (at half-life, so every 5 s on both nodes).
        extra_ztunnel_args=("--drain-grace-period", "2s", "--cert-ttl", "10s"),
    ) as the_lab:
        yield the_lab
