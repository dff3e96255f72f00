"""Fixtures for the ztunnel's netns tests: a whole mesh on the lab
(see :mod:`tests.support.ztunnel_lab`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import yaml

from lab.mesh import LabMesh
from tests.support.ztunnel_lab import REGISTRY, STEERING, Lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    work = tmp_path_factory.mktemp("ztunnel-lab")
    registry = work / "registry.yaml"
    registry.write_text(yaml.safe_dump(REGISTRY, sort_keys=False))
    (work / "mesh").mkdir()
    mesh = LabMesh(
        registry,
        workdir=work / "mesh",
        steering=STEERING,
        # 10 s certificates: every test here also runs across rotations
        # (at half-life, so every 5 s on both nodes).
        extra_ztunnel_args=("--drain-grace-period", "2s", "--cert-ttl", "10s"),
    )
    the_lab = Lab(mesh)
    try:
        mesh.start()
        the_lab.serve("payments", "echo")
        the_lab.serve("payments", "whoami", 8081)
        the_lab.serve("inventory", "whoami")
        the_lab.serve("other", "whoami")
        yield the_lab
    finally:
        for server in the_lab.apps:
            server.stop()
        mesh.close()
