"""What a skip means when the ``CI`` environment variable is set.

On a developer's machine a missing tool or privilege skips a test with a
message saying how to get it. In CI the same skip would hide a tier that must
run, so it fails instead: a test that needs a tool calls :func:`require_tool`,
and the suite-wide conftest turns any skip of a ``netns``-marked test into a
failure through :func:`fail_netns_skip`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping

import pytest

__all__ = ["fail_netns_skip", "in_ci", "require_tool"]

_FALSE = {"", "0", "false", "no", "off"}


def in_ci(environ: Mapping[str, str] | None = None) -> bool:
    """True when ``CI`` is set to anything but an explicit no (CI systems set ``true``)."""
    env = os.environ if environ is None else environ
    return env.get("CI", "").strip().lower() not in _FALSE


def require_tool(name: str, how_to_install: str) -> str:
    """The path of ``name`` on PATH; otherwise fail in CI, skip elsewhere, saying how to install it."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not on PATH: {how_to_install}"
    if in_ci():
        pytest.fail(f"{message} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(message)


def fail_netns_skip(
    report: pytest.TestReport | pytest.CollectReport,
    is_netns: bool,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Turns a skipped netns test (or netns module) report into a failure when CI is set.

    Returns True when the report was changed. An expected failure (xfail)
    is reported as skipped too, but is not a skip of the tier and is left alone.
    """
    if not (is_netns and report.skipped) or hasattr(report, "wasxfail"):
        return False
    if not in_ci(environ):
        return False
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    report.outcome = "failed"
    report.longrepr = (
        f"netns test skipped under CI ({reason}); the netns tier must run in CI: "
        "run it as root on a machine prepared by scripts/setup.sh"
    )
    return True
