"""RegistryHolder and the file watcher: good edits publish, bad edits keep the last state."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from controller.api.model import RegistryState
from controller.registry import RegistryError, RegistryFileWatcher, RegistryHolder

DOC = """
namespaces: [{{name: shop, labels: {{veil.io/dataplane-mode: ambient}}}}]
workloads:
  - {{name: a, namespace: shop, node: n1, ips: [{ip}]}}
"""


def write(path: Path, text: str) -> None:
    path.write_text(text)
    # Make sure the stamp differs even on filesystems with coarse mtimes.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def test_holder_publish_notifies_and_clears_error() -> None:
    holder = RegistryHolder()
    seen: list[RegistryState] = []
    unsubscribe = holder.subscribe(seen.append)

    def broken(_: RegistryState) -> None:
        raise RuntimeError("consumer bug")

    holder.subscribe(broken)
    holder.report_error(RegistryError("bad"))
    assert holder.last_error is not None and holder.status().last_error == "bad"
    state = RegistryState(trust_domain="cluster.local")
    holder.publish(state, source="test")
    assert seen == [state] and holder.current() is state
    assert holder.last_error is None and holder.generation == 1
    unsubscribe()
    holder.publish(RegistryState(), source="test")
    assert len(seen) == 1  # unsubscribed; the broken listener did not stop the publish
    assert holder.generation == 2


def test_holder_refuses_foreign_trust_domain() -> None:
    holder = RegistryHolder(trust_domain="cluster.local")
    before = holder.current()
    with pytest.raises(RegistryError, match="differs from the controller's trust domain"):
        holder.publish(RegistryState(trust_domain="example.org"), source="f.yaml")
    assert holder.current() is before and holder.generation == 0


async def test_edit_publishes_and_broken_edit_keeps_state(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    write(path, DOC.format(ip="10.0.0.1"))
    holder = RegistryHolder(trust_domain="cluster.local")
    watcher = RegistryFileWatcher(path, holder)
    watcher.load_initial()
    assert holder.current().workloads[0].ips == ("10.0.0.1",)
    assert not await watcher.check()  # nothing changed

    write(path, DOC.format(ip="10.0.0.2"))
    assert await watcher.check()
    assert holder.current().workloads[0].ips == ("10.0.0.2",)

    good = holder.current()
    write(path, DOC.format(ip="10.0.0"))
    assert not await watcher.check()
    assert holder.current() is good
    err = holder.last_error
    assert err is not None
    assert str(err).startswith(
        f'{path}: workloads[0] (shop/a): field "ips[0]": "10.0.0" is not an IP'
    )
    first_error_at = holder.status().last_error_at

    # Touching the broken file without changing it is not a new failure.
    write(path, DOC.format(ip="10.0.0"))
    assert not await watcher.check()
    assert holder.status().last_error_at == first_error_at

    write(path, DOC.format(ip="10.0.0.3"))
    assert await watcher.check()
    assert holder.last_error is None
    assert holder.current().workloads[0].ips == ("10.0.0.3",)


async def test_rewriting_same_content_does_not_republish(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    write(path, DOC.format(ip="10.0.0.1"))
    holder = RegistryHolder()
    watcher = RegistryFileWatcher(path, holder)
    watcher.load_initial()
    write(path, DOC.format(ip="10.0.0.1"))
    assert not await watcher.check()
    assert holder.generation == 1


async def test_editor_rename_replace_and_disappearance(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    write(path, DOC.format(ip="10.0.0.1"))
    holder = RegistryHolder()
    watcher = RegistryFileWatcher(path, holder)
    watcher.load_initial()

    # Save by writing a new file and renaming it over the old one.
    tmp = tmp_path / ".registry.yaml.swp"
    tmp.write_text(DOC.format(ip="10.0.0.9"))
    os.replace(tmp, path)
    assert await watcher.check()
    assert holder.current().workloads[0].ips == ("10.0.0.9",)

    # A short absence (old file renamed away) is not an error; a lasting one is.
    backup = tmp_path / "registry.yaml~"
    os.rename(path, backup)
    assert not await watcher.check()
    assert holder.last_error is None
    assert not await watcher.check()
    assert holder.last_error is not None and "has disappeared" in str(holder.last_error)
    assert holder.current().workloads[0].ips == ("10.0.0.9",)

    os.rename(backup, path)
    await watcher.check()
    assert holder.current().workloads[0].ips == ("10.0.0.9",)
    write(path, DOC.format(ip="10.0.0.10"))
    assert await watcher.check()
    assert holder.last_error is None


async def test_foreign_trust_domain_edit_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    write(path, DOC.format(ip="10.0.0.1"))
    holder = RegistryHolder(trust_domain="cluster.local")
    watcher = RegistryFileWatcher(path, holder)
    watcher.load_initial()
    write(path, "trustDomain: example.org\n" + DOC.format(ip="10.0.0.1"))
    assert not await watcher.check()
    assert holder.last_error is not None and "trustDomain" in str(holder.last_error)


def test_invalid_file_at_startup_raises(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    write(path, "workloads: [{name: a}]\n")
    holder = RegistryHolder()
    with pytest.raises(RegistryError, match='field "namespace": is required'):
        RegistryFileWatcher(path, holder).load_initial()
    assert holder.generation == 0


async def test_run_picks_up_an_edit(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    write(path, DOC.format(ip="10.0.0.1"))
    holder = RegistryHolder()
    watcher = RegistryFileWatcher(path, holder, interval=0.05)
    watcher.load_initial()
    changed = asyncio.Event()
    holder.subscribe(lambda _: changed.set())
    task = asyncio.create_task(watcher.run())
    try:
        start = time.monotonic()
        write(path, DOC.format(ip="10.0.0.2"))
        await asyncio.wait_for(changed.wait(), timeout=5)
        assert time.monotonic() - start < 2
        assert holder.current().workloads[0].ips == ("10.0.0.2",)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


NS_DOC = "namespaces: [{name: shop, labels: {veil.io/dataplane-mode: ambient}}, {name: web}]\n"


def wl_doc(name: str, ip: str, ns: str = "shop") -> str:
    return f"workloads: [{{name: {name}, namespace: {ns}, node: n1, ips: [{ip}]}}]\n"


async def test_registry_directory_merges_files_and_reparses_only_changes(tmp_path: Path) -> None:
    d = tmp_path / "registry.d"
    d.mkdir()
    write(d / "00-namespaces.yaml", NS_DOC)
    write(d / "shop.yaml", wl_doc("a", "10.0.0.1"))
    write(d / "web.yml", wl_doc("b", "10.0.0.2", ns="web"))
    write(d / ".shop.yaml.swp", "not: [valid")  # editor swap file: ignored
    write(d / "README.md", "ignored")
    holder = RegistryHolder()
    watcher = RegistryFileWatcher(d, holder)
    state = watcher.load_initial()
    assert [w.key for w in state.workloads] == ["shop/a", "web/b"]
    assert [w.enrolled for w in state.workloads] == [True, False]
    before = {f.name: c.fragment for f, c in watcher._cache.items()}

    write(d / "web.yml", wl_doc("b", "10.0.0.3", ns="web"))
    assert await watcher.check()
    assert holder.current().workloads[1].ips == ("10.0.0.3",)
    after = {f.name: c.fragment for f, c in watcher._cache.items()}
    assert after["shop.yaml"] is before["shop.yaml"]  # untouched file: not parsed again
    assert after["web.yml"] is not before["web.yml"]

    # A file that vanishes for one poll (editor save) changes nothing; a lasting removal does.
    (d / "web.yml").rename(tmp_path / "web.yml.bak")
    assert not await watcher.check()
    assert len(holder.current().workloads) == 2
    assert await watcher.check()
    assert [w.key for w in holder.current().workloads] == ["shop/a"]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (
            {"a.yaml": NS_DOC + wl_doc("a", "10.0.0.1"), "b.yaml": wl_doc("a", "10.0.0.2")},
            "b.yaml: workloads[0] (shop/a): duplicate key shop/a; {d}/a.yaml: workloads[0] (shop/a)",
        ),
        (
            {"a.yaml": NS_DOC + wl_doc("a", "10.0.0.1"), "b.yaml": wl_doc("b", "10.0.0.1")},
            'b.yaml: workloads[0] (shop/b): field "ips[0]": 10.0.0.1 is already used by {d}/a.yaml',
        ),
        (
            {"a.yaml": "trustDomain: a.org\n" + NS_DOC, "b.yaml": "trustDomain: b.org\n"},
            "different trust domains",
        ),
        (
            {"a.yaml": NS_DOC, "b.yaml": "workloads: [{name: x}]\n"},
            '{d}/b.yaml: workloads[0] (x): field "namespace": is required',
        ),
    ],
)
def test_registry_directory_errors_name_the_file(
    tmp_path: Path, files: dict[str, str], message: str
) -> None:
    for name, text in files.items():
        write(tmp_path / name, text)
    with pytest.raises(RegistryError) as info:
        RegistryFileWatcher(tmp_path, RegistryHolder()).load_initial()
    assert message.format(d=tmp_path) in str(info.value)


async def test_restored_file_clears_the_error(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    write(path, DOC.format(ip="10.0.0.1"))
    holder = RegistryHolder()
    watcher = RegistryFileWatcher(path, holder)
    watcher.load_initial()
    path.rename(tmp_path / "away")
    await watcher.check()
    await watcher.check()
    assert holder.last_error is not None
    (tmp_path / "away").rename(path)
    assert not await watcher.check()
    assert holder.last_error is None
    assert holder.generation == 1


async def test_inotify_wakes_the_watcher_long_before_the_poll(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    write(path, DOC.format(ip="10.0.0.1"))
    holder = RegistryHolder()
    watcher = RegistryFileWatcher(path, holder, interval=30)  # the timer alone would be too late
    watcher.load_initial()
    changed = asyncio.Event()
    holder.subscribe(lambda _: changed.set())
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.sleep(0.1)  # let run() set up its watch
        tmp = tmp_path / ".registry.yaml.new"
        tmp.write_text(DOC.format(ip="10.0.0.2"))
        os.replace(tmp, path)
        await asyncio.wait_for(changed.wait(), timeout=5)
        assert holder.current().workloads[0].ips == ("10.0.0.2",)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_event_driven_checks_never_act_on_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    write(path, DOC.format(ip="10.0.0.1"))
    holder = RegistryHolder()
    watcher = RegistryFileWatcher(path, holder)
    watcher.load_initial()
    path.rename(tmp_path / "away")
    for _ in range(5):
        assert not await watcher.check(woken=True)
    assert holder.last_error is None
