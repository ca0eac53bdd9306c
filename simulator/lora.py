"""LoRA adapters: the registry a pod serves and the GPU slots (``--max-loras``) they occupy.

Model of vLLM's behaviour: at most ``max_loras`` distinct adapters may be in the running batch. A request
for an adapter that is not GPU-resident waits in the queue until a slot can be taken (a resident adapter
with no running request is evicted, least recently used first), then pays ``--lora-load-latency`` before
its prefill. Requests for an adapter that is still loading wait for the same load to finish.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from llmepp_sim.config import LoraModule


@dataclass(frozen=True, slots=True)
class LoraAdapter:
    name: str
    lora_id: int  # vLLM's lora_int_id: 1-based, stable for the adapter's lifetime on the pod
    path: str


class LoraManager:
    def __init__(self, modules: Iterable[LoraModule]) -> None:
        self._adapters: dict[str, LoraAdapter] = {}
        self._next_id = 1
        # name -> simulated time at which its weights are on the GPU; order = LRU (oldest first).
        self._resident: OrderedDict[str, float] = OrderedDict()
        for module in modules:
            self.register(module.name, module.path)

    # --- registry (load_lora_adapter / unload_lora_adapter)
    def register(self, name: str, path: str) -> LoraAdapter:
        existing = self._adapters.get(name)
        if existing is not None:
            return existing
        adapter = LoraAdapter(name, self._next_id, path or name)
        self._next_id += 1
        self._adapters[name] = adapter
        return adapter

    def unregister(self, name: str) -> bool:
        self._resident.pop(name, None)
        return self._adapters.pop(name, None) is not None

    def get(self, name: str) -> LoraAdapter | None:
        return self._adapters.get(name)

    def adapters(self) -> list[LoraAdapter]:
        return list(self._adapters.values())

    # --- GPU slots
    @staticmethod
    def can_run(name: str, running: set[str], max_loras: int) -> bool:
        return name in running or len(running) < max_loras

    def acquire(self, name: str, running: set[str], max_loras: int, now: float, load_latency: float) -> float:
        """Make ``name`` resident; returns how long (simulated s) the request waits for its weights."""
        ready_at = self._resident.get(name)
        if ready_at is not None:
            self._resident.move_to_end(name)
            return max(0.0, ready_at - now)
        while len(self._resident) >= max_loras:
            victim = next((n for n in self._resident if n not in running), None)
            if victim is None:
                break  # cannot happen when can_run() was checked; never block the engine on it
            del self._resident[victim]
        self._resident[name] = now + load_latency
        return load_latency

    def resident(self) -> list[str]:
        return list(self._resident)

    def reset(self) -> None:
        self._resident.clear()
