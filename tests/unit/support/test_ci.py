"""A skip of the netns tier fails the run under CI; tools say how to install them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.ci import fail_netns_skip, in_ci, require_tool

pytest_plugins = ["pytester"]

ROOT_CONFTEST = Path(__file__).resolve().parents[2] / "conftest.py"
REPO = ROOT_CONFTEST.parents[1]


def skipped(reason: str = "netns tests need root", **extra: object) -> pytest.TestReport:
    report = pytest.TestReport(
        "tests/netns/x/test_y.py::test_z",
        ("tests/netns/x/test_y.py", 1, "test_z"),
        {"netns": 1},
        "skipped",
        ("tests/netns/x/test_y.py", 1, f"Skipped: {reason}"),
        "setup",
    )
    for k, v in extra.items():
        setattr(report, k, v)
    return report


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("1", True), ("yes", True), ("", False), ("0", False), ("false", False)],
)
def test_ci_is_any_value_but_an_explicit_no(value: str, expected: bool) -> None:
    assert in_ci({"CI": value}) is expected
    assert in_ci({}) is False


def test_a_netns_skip_becomes_a_failure_in_ci_only() -> None:
    report = skipped()
    assert fail_netns_skip(report, True, {"CI": "true"})
    assert report.failed
    assert "netns tests need root" in str(report.longrepr)
    assert "must run in CI" in str(report.longrepr)

    local = skipped()
    assert not fail_netns_skip(local, True, {})
    assert local.skipped


def test_other_tiers_and_xfails_are_left_alone() -> None:
    other = skipped()
    assert not fail_netns_skip(other, False, {"CI": "true"})
    assert other.skipped
    xfail = skipped(wasxfail="known kernel bug")
    assert not fail_netns_skip(xfail, True, {"CI": "true"})
    assert xfail.skipped


def test_a_missing_tool_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="install it from the moon"):
        require_tool("kubectl", "install it from the moon")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        require_tool("kubectl", "install it from the moon")


def test_the_suite_conftest_fails_netns_skips_under_ci(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real hooks of tests/conftest.py, in a throwaway suite with a netns folder."""
    pytester.makeconftest(ROOT_CONFTEST.read_text())
    pytester.makeini("[pytest]\nmarkers =\n    netns: netns tier\n")
    netns = pytester.mkdir("netns")
    (netns / "test_tier.py").write_text(
        "import pytest\n\n"
        "pytestmark = pytest.mark.netns\n\n"
        "def test_skips():\n    pytest.skip('no bpffs')\n\n"
        "def test_runs():\n    pass\n\n"
        "@pytest.mark.xfail(reason='known')\ndef test_xfails():\n    assert False\n"
    )
    (netns / "test_module_skip.py").write_text(
        "import pytest\n\npytest.skip('no kernel headers', allow_module_level=True)\n"
    )
    pytester.makepyfile(test_unit="import pytest\n\ndef test_unit():\n    pytest.skip('fine')\n")
    monkeypatch.setenv("PYTHONPATH", str(REPO))

    monkeypatch.setenv("CI", "true")
    # A module skipped as a whole is a collection error (which alone stops the run).
    ci = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--continue-on-collection-errors")
    ci.assert_outcomes(passed=1, failed=1, skipped=1, xfailed=1, errors=1)
    ci.stdout.fnmatch_lines(["*netns test skipped under CI*no bpffs*"])
    ci.stdout.fnmatch_lines(["*netns test skipped under CI*no kernel headers*"])

    monkeypatch.delenv("CI")
    local = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    local.assert_outcomes(passed=1, skipped=3, xfailed=1)
