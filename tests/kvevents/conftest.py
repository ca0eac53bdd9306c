"""A real Redis per test module (`server`) and a flushed client of it per test (`client`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from llmepp.kvevents.redis_index import connect
from llmepp.testing.redis import RedisServer


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


@pytest.fixture
async def client(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    c = connect(server.url)
    await c.flushall()
    yield c
    await c.aclose()
