"""`data-parallel-profile-handler` end to end: a real Envoy, the `epp` program, and one data-parallel
pod whose two ranks listen on consecutive ports (one endpoint each, `rank` 0 and 1). Whichever rank
is picked, Envoy delivers the request to the pod's primary port (rank 0's server) carrying
`x-data-parallel-host-port: <the picked rank's ip:port>`, as the reference's rank-0 sidecar expects;
the rank-1 server itself is never dialled."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
import yaml
from aiohttp import web

from llmepp.plugins.filters.header_testing import SELECTION_HEADER
from llmepp.plugins.profile_handlers.data_parallel import DATA_PARALLEL_HEADER
from llmepp.testing.ports import free_port_pair
from llmepp.testing.stack import Stack, StackOptions
from llmepp_sim.cluster import PodInfo

from .modelserver import ModelServer

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

HOST = "127.0.0.212"
# The reference's data-parallel config with the primary port set, plus the testing filter to force a rank.
CONFIG = """
plugins:
- type: header-based-testing-filter
- type: decode-filter
- type: max-score-picker
- type: data-parallel-profile-handler
  parameters: {{primaryPort: {port}}}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: header-based-testing-filter
  - pluginRef: decode-filter
  - pluginRef: max-score-picker
"""


class RankServer(ModelServer):
    """A rank's server that also reports the data-parallel header it received."""

    def _diag(self, request: web.Request, body: bytes, model: str = "") -> dict[str, str]:
        return {**super()._diag(request, body, model), "x-received-dp": request.headers.get(DATA_PARALLEL_HEADER, "-")}


class DataParallelStack(Stack):
    """The stack with one two-rank pod of RankServers in place of the simulator's pods."""

    def __init__(self, options: StackOptions, primary_port: int) -> None:
        super().__init__(options)
        self.ranks = [RankServer(HOST, primary_port + rank) for rank in (0, 1)]

    async def start_pods(self) -> None:
        for server in self.ranks:
            await server.start()

    async def stop_pods(self) -> None:
        for server in self.ranks:
            await server.stop()

    def write_endpoints(self, pods: list[PodInfo]) -> None:
        entries = [{"name": f"dp-pod-rank-{rank}", "address": HOST, "port": server.port, "rank": rank}
                   for rank, server in enumerate(self.ranks)]  # fmt: skip
        tmp = self.endpoints_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump({"endpoints": entries}))
        os.replace(tmp, self.endpoints_file)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[DataParallelStack]:
    port = free_port_pair(HOST)
    options = StackOptions(pods=1, first_host=212, epp_config=CONFIG.format(port=port))
    async with DataParallelStack(options, port) as st:
        yield st


async def test_each_rank_is_reached_through_the_primary_port(
    stack: DataParallelStack, http: aiohttp.ClientSession
) -> None:
    rank0, rank1 = stack.ranks
    body = {"model": "m", "prompt": "hello data parallel", "max_tokens": 2}
    for picked in (rank1, rank0, rank1):
        async with http.post(f"{stack.url}/v1/completions", json=body,
                             headers={SELECTION_HEADER: picked.hostport}) as resp:  # fmt: skip
            await resp.read()
            assert resp.status == 200
            assert resp.headers["x-served-by"] == rank0.hostport  # Envoy dialled the primary port
            assert resp.headers["x-received-dest"] == rank0.hostport
            assert resp.headers["x-received-dp"] == picked.hostport  # the rank to forward to
    # `received` also holds the EPP's body-less /metrics scrapes, which reach both ranks.
    assert len([b for b in rank0.received if b]) == 3 and not any(rank1.received)
