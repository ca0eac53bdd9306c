"""InferenceObjective files: formats, validation errors, reload on change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmepp.flowcontrol.objectives import ObjectivesFileWatcher, ObjectiveStore, load_objectives, parse_objectives
from llmepp.framework.plugin import ConfigError


def obj(name: str, priority: object = None, pool: str | None = "epp") -> str:
    spec = []
    if priority is not None:
        spec.append(f"priority: {priority}")
    if pool is not None:
        spec.append(f"poolRef: {{name: {pool}}}")
    return (
        f"apiVersion: llm-d.ai/v1alpha2\nkind: InferenceObjective\nmetadata:\n  name: {name}\n"
        f"spec: {{{', '.join(spec)}}}\n"
    )


def test_multi_document_file() -> None:
    found = parse_objectives("---\n".join([obj("premium", 10), obj("batch", -5), obj("plain")]))
    assert [(o.name, o.priority) for o in found] == [("premium", 10), ("batch", -5), ("plain", 0)]


def test_items_list_as_kubectl_prints_it() -> None:
    text = "apiVersion: v1\nkind: List\nitems:\n" + "".join(
        "- " + obj(n, p).replace("\n", "\n  ").rstrip() + "\n" for n, p in [("a", 1), ("b", 2)]
    )
    assert [(o.name, o.priority) for o in parse_objectives(text)] == [("a", 1), ("b", 2)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (obj("a", 1) + "---\n" + obj("b", "high"), "document 1 (b): spec.priority: expected an integer, got 'high'"),
        (obj("a", 1) + "---\n" + obj("a", 2), "metadata.name: duplicate objective 'a'"),
        ("apiVersion: llm-d.ai/v1alpha2\nkind: InferenceObjective\nmetadata: {}\n", "document 0: metadata.name"),
        (obj("a").replace("llm-d.ai/v1alpha2", "v1"), "document 0: apiVersion: expected llm-d.ai/v1alpha2"),
        (obj("a").replace("kind: InferenceObjective", "kind: InferencePool"), "document 0: kind: expected"),
        ("kind: List\nitems:\n- " + obj("x", "1.5").replace("\n", "\n  "),
         "document 0: items[0] (x): spec.priority: expected an integer"),
        (obj("a", 2**31), "spec.priority: 2147483648 is outside int32"),
        (obj("a", pool=None) + "---\n- 1\n", "document 1: expected an InferenceObjective mapping"),
        ("a: [", "not valid YAML"),
        ("a: " + "[" * 5000 + "]" * 5000, "not valid YAML: nested too deeply"),
    ],
)  # fmt: skip
def test_errors_name_document_and_field(text: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_objectives(text, "objectives.yaml")
    assert message in str(err.value)


def test_objectives_for_other_pools_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "o.yaml"
    path.write_text(obj("mine", 1, "pool-a") + "---\n" + obj("theirs", 2, "pool-b") + "---\n" + obj("any", 3, None))
    assert load_objectives(str(path), "pool-a") == {"mine": 1, "any": 3}


def test_store_updates_are_copy_on_write() -> None:
    store = ObjectiveStore({"a": 1})
    before = store._priorities
    store.upsert("b", -1)
    store.delete("a")
    assert before == {"a": 1} and store.snapshot() == {"b": -1}
    assert (store.priority("b"), store.priority("a"), store.priority("")) == (-1, 0, 0)


def _touch(path: Path, text: str) -> None:
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a distinct mtime, no sleeping


def test_watcher_reloads_on_change_and_keeps_the_last_good_file(tmp_path: Path) -> None:
    path = tmp_path / "o.yaml"
    path.write_text(obj("a", 1))
    store = ObjectiveStore()
    w = ObjectivesFileWatcher(str(path), store, pool_name="epp")
    w.load()
    assert store.snapshot() == {"a": 1}
    assert not w.check()  # unchanged
    _touch(path, obj("a", 5) + "---\n" + obj("b", -1))
    assert [w.check(), w.check()] == [False, True]  # seen, then read once it held still for a poll
    assert store.snapshot() == {"a": 5, "b": -1}
    _touch(path, obj("a", "oops"))
    assert [w.check(), w.check()] == [False, False]
    assert store.snapshot() == {"a": 5, "b": -1}  # bad edit: previous objectives stay
    path.unlink()
    assert [w.check(), w.check()] == [False, False] and store.priority("a") == 5
    path.write_text(obj("c", 7))
    assert [w.check(), w.check()] == [False, True] and store.snapshot() == {"c": 7}


def test_watcher_reads_a_file_only_once_it_stops_changing_and_never_an_empty_one(tmp_path: Path) -> None:
    path = tmp_path / "o.yaml"
    path.write_text(obj("a", 1) + "---\n" + obj("b", 2))
    store = ObjectiveStore()
    w = ObjectivesFileWatcher(str(path), store)
    w.load()
    _touch(path, "")  # truncated by an editor writing in place ...
    assert not w.check() and store.snapshot() == {"a": 1, "b": 2}
    _touch(path, obj("a", 1))  # ... half of the new content before the next poll ...
    assert not w.check()
    _touch(path, obj("a", 1) + "---\n" + obj("b", 3))  # ... and the rest
    assert [w.check(), w.check()] == [False, True] and store.snapshot() == {"a": 1, "b": 3}
    _touch(path, "  \n")  # emptied: a reload that would drop every priority is refused
    assert [w.check(), w.check()] == [False, False] and store.snapshot() == {"a": 1, "b": 3}


async def test_watcher_task_polls_the_file(tmp_path: Path) -> None:
    import asyncio

    path = tmp_path / "o.yaml"
    path.write_text(obj("a", 1))
    store = ObjectiveStore()
    w = ObjectivesFileWatcher(str(path), store, interval=0.005)
    w.load()
    w.start()
    _touch(path, obj("a", 9))
    for _ in range(400):
        if store.priority("a") == 9:
            break
        await asyncio.sleep(0.005)
    assert store.priority("a") == 9
    await w.aclose()


def test_load_errors_are_config_errors_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "o.yaml"
    path.write_text(obj("a", "x"))
    with pytest.raises(ConfigError, match=r"o\.yaml: document 0 \(a\): spec\.priority"):
        load_objectives(str(path))


async def test_queued_requests_keep_the_priority_they_arrived_with() -> None:
    # Reference: the priority is resolved once, in HandleRequest, before Admit. Editing or deleting the
    # objective while its requests wait changes only the requests that arrive afterwards.
    from .kit import Server, concurrency_pool, controller, req, spin, until

    pool, det = concurrency_pool(1, max_concurrency=1)
    ctl = controller(pool, det, objectives={"premium": 10, "batch": -5}, poll_interval=10.0)
    store = ctl.objectives
    srv = Server(ctl, pool)
    pool()[0].inflight.requests = 1  # saturated: everything queues
    srv.submit(req("p-before", objective="premium"))
    srv.submit(req("b-before", objective="batch"))
    await spin()
    store.upsert("batch", 20)
    store.delete("premium")
    srv.submit(req("p-after", objective="premium"))
    srv.submit(req("b-after", objective="batch"))
    await spin()
    assert ctl.queued == 4 and set(ctl.bands) >= {10, -5, 0, 20}
    for n in range(1, 5):
        srv.complete_one()
        await until(lambda n=n: len(srv.order) == n)  # type: ignore[misc]
    assert srv.order == ["b-after", "p-before", "p-after", "b-before"]
    await srv.close()
