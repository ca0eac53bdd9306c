"""InferenceObjectives: objective name → priority, from a file (non-Kubernetes mode).

    ObjectiveStore          name → priority; lock-free reads, copy-on-write updates
    load_objectives(path)   YAML of `llm-d.ai/v1alpha2 InferenceObjective` objects
    ObjectivesFileWatcher   reloads the file when its stat changes (poll)

The request's objective header names an objective; its `spec.priority` is the request's
priority (0 when there is no header, no such objective, or no priority). A Kubernetes
watcher can drive the same store through `upsert` / `delete` / `replace`.

File format: one object per YAML document (`---`), or one document with an `items:` list
(`kind: List` / `InferenceObjectiveList`, as `kubectl get -o yaml` prints):

    apiVersion: llm-d.ai/v1alpha2
    kind: InferenceObjective
    metadata: {name: premium}
    spec: {priority: 10, poolRef: {name: my-pool}}
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from llmepp.filewatch import FilePoller, SettledChanges, stat_signature
from llmepp.framework.plugin import ConfigError

log = logging.getLogger(__name__)

API_VERSIONS = ("llm-d.ai/v1alpha2", "inference.networking.x-k8s.io/v1alpha2")
KIND = "InferenceObjective"
LIST_KINDS = ("List", "InferenceObjectiveList")
INT32_RANGE = (-(2**31), 2**31 - 1)  # spec.priority is an int32


class ObjectiveStore:
    """Objective name → priority. Readers never lock: updates swap in a new dict."""

    def __init__(self, priorities: Mapping[str, int] | None = None) -> None:
        self._priorities: dict[str, int] = dict(priorities or {})
        self._lock = threading.Lock()  # serialises writers (file watcher, a K8s informer thread)

    def priority(self, name: str) -> int:
        return self._priorities.get(name, 0)

    def get(self, name: str) -> int | None:
        return self._priorities.get(name)

    def replace(self, priorities: Mapping[str, int]) -> None:
        with self._lock:
            self._priorities = dict(priorities)

    def upsert(self, name: str, priority: int) -> None:
        with self._lock:
            self._priorities = {**self._priorities, name: priority}

    def delete(self, name: str) -> None:
        with self._lock:
            if name in self._priorities:
                self._priorities = {k: v for k, v in self._priorities.items() if k != name}

    def snapshot(self) -> dict[str, int]:
        return dict(self._priorities)

    def __len__(self) -> int:
        return len(self._priorities)


@dataclass(frozen=True, slots=True)
class InferenceObjective:
    name: str
    priority: int = 0
    pool: str = ""  # spec.poolRef.name; "" = not given


def parse_objectives(text: str, source: str = "objectives") -> list[InferenceObjective]:
    """Every InferenceObjective in `text`; ValueError names the document / item and field."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise ValueError(f"{source}: not valid YAML: {e}") from None
    except RecursionError:
        raise ValueError(f"{source}: not valid YAML: nested too deeply") from None
    found: list[InferenceObjective] = []
    for i, doc in enumerate(docs):
        where = f"{source}: document {i}"
        if isinstance(doc, dict) and "items" in doc:
            kind = doc.get("kind", "List")
            if kind not in LIST_KINDS:
                raise ValueError(f"{where}: kind: expected one of {', '.join(LIST_KINDS)} with items, got {kind!r}")
            items = doc["items"]
            if not isinstance(items, list):
                raise ValueError(f"{where}: items: expected a list, got {type(items).__name__}")
            found += [_objective(item, f"{where}: items[{j}]") for j, item in enumerate(items)]
        else:
            found.append(_objective(doc, where))
    seen: set[str] = set()
    for obj in found:
        if obj.name in seen:
            raise ValueError(f"{source}: metadata.name: duplicate objective {obj.name!r}")
        seen.add(obj.name)
    return found


def _objective(doc: Any, where: str) -> InferenceObjective:
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected an InferenceObjective mapping, got {type(doc).__name__}")
    api = doc.get("apiVersion")
    if api not in API_VERSIONS:
        raise ValueError(f"{where}: apiVersion: expected {API_VERSIONS[0]}, got {api!r}")
    if doc.get("kind") != KIND:
        raise ValueError(f"{where}: kind: expected {KIND}, got {doc.get('kind')!r}")
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: metadata: required mapping with a name")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: metadata.name: required non-empty string, got {name!r}")
    spec = doc.get("spec", {})
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise ValueError(f"{where} ({name}): spec: expected a mapping, got {type(spec).__name__}")
    priority = spec.get("priority", 0)
    if priority is None:
        priority = 0
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"{where} ({name}): spec.priority: expected an integer, got {priority!r}")
    if not INT32_RANGE[0] <= priority <= INT32_RANGE[1]:
        raise ValueError(f"{where} ({name}): spec.priority: {priority} is outside int32")
    pool = ""
    ref = spec.get("poolRef")
    if ref is not None:
        if not isinstance(ref, dict) or not isinstance(ref.get("name", ""), str):
            raise ValueError(f"{where} ({name}): spec.poolRef: expected a mapping with a string name, got {ref!r}")
        pool = ref.get("name", "")
    return InferenceObjective(name=name, priority=priority, pool=pool)


def priorities_for_pool(objectives: list[InferenceObjective], pool_name: str, source: str) -> dict[str, int]:
    """name → priority of the objectives that apply to `pool_name` (others are logged and skipped)."""
    result: dict[str, int] = {}
    for obj in objectives:
        if obj.pool and pool_name and obj.pool != pool_name:
            log.warning(
                "%s: objective %r references pool %r, not this pool %r: ignored", source, obj.name, obj.pool, pool_name
            )
            continue
        result[obj.name] = obj.priority
    return result


def load_objectives(path: str, pool_name: str = "", *, allow_empty: bool = True) -> dict[str, int]:
    """Read and validate an objectives file; ConfigError (naming the file) on any problem. Without
    `allow_empty` a file with no content is one too (a reload: truncated, its new content not written yet)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--objectives-file: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not allow_empty and not text.strip():
        raise ConfigError(f"{path}: the file is empty")
    try:
        return priorities_for_pool(parse_objectives(text, path), pool_name, path)
    except ValueError as e:
        raise ConfigError(str(e)) from None


class ObjectivesFileWatcher(FilePoller):
    """Polls the file's stat; once a change has held still for a poll, reloads it into the store.

    A file that fails to load at start-up is a ConfigError (`load()`); later, a bad edit is
    logged and the last good objectives stay in force, so a typo cannot drop priorities; nor can a
    file caught mid-write (read only once it stops changing; an empty file is a bad edit).
    """

    name = "objectives-watcher"

    def __init__(self, path: str, store: ObjectiveStore, *, pool_name: str = "", interval: float = 1.0) -> None:
        super().__init__(interval)
        self.path = path
        self.store = store
        self.pool_name = pool_name
        self._changes = SettledChanges(path, None)

    def load(self) -> None:
        """Initial load: raises ConfigError."""
        stamp = stat_signature(self.path)
        self.store.replace(load_objectives(self.path, self.pool_name))
        self._changes = SettledChanges(self.path, stamp)
        log.info("loaded %d inference objectives from %s", len(self.store), self.path)

    def check(self) -> bool:
        """Reload if the file changed and has settled since the last look; True when the store was replaced."""
        changes = self._changes
        if not changes.settled():
            return False
        if changes.missing:
            log.error("objectives file %s disappeared; keeping the last %d objectives", self.path, len(self.store))
            return False
        try:
            priorities = load_objectives(self.path, self.pool_name, allow_empty=False)
        except ConfigError as e:
            log.error("objectives file reload failed, keeping the previous objectives: %s", e)
            return False
        if changes.moved():
            changes.retry()  # changed while we read it: read again once it settles
            return False
        self.store.replace(priorities)
        log.info("reloaded %d inference objectives from %s", len(priorities), self.path)
        return True
