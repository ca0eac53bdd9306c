"""A configured Redis is checked before the EPP serves: credentials or a database Redis refuses never come
right by waiting, so they refuse the start-up with the field named (as the reference's Redis index fails
its construction when its PING fails); a Redis that does not answer yet is only logged, since it may still
be starting and every use retries."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import file_config, loopback_settings

from llmepp import app as app_module
from llmepp.framework.plugin import ConfigError
from llmepp.settings import Settings
from llmepp.testing.ports import free_port
from llmepp.testing.redis import RedisServer

PASSWORD = "s3cret"


@pytest.fixture(scope="module")
def locked() -> Iterator[RedisServer]:
    with RedisServer(password=PASSWORD) as srv:
        yield srv


def _url(srv: RedisServer, password: str = "", db: int = 0) -> str:
    auth = f":{password}@" if password else ""
    return f"redis://{auth}127.0.0.1:{srv.port}/{db}"


def _precise(address: str) -> str:
    return f"""type: precise-prefix-cache-producer
  parameters:
    indexerConfig: {{kvBlockIndexConfig: {{redisConfig: {{address: "{address}"}}}}}}
    kvEventsConfig: {{discoverPods: false}}"""


def _inflight(address: str) -> str:
    return f"""type: redis-inflight-load-producer
  parameters: {{redisConfig: {{address: "{address}"}}}}"""


def _settings(tmp_path: Path, plugin: str) -> Settings:
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints:\n- {name: a, address: 127.0.0.1, port: 8000}\n")
    config = file_config(endpoints, plugin) + "schedulingProfiles:\n- name: default\n  plugins: []\n"
    return loopback_settings(config)


async def _started(settings: Settings) -> None:
    app = app_module.App(settings)
    await app.start()
    await app.shutdown()


@pytest.mark.parametrize("plugin", [_precise, _inflight], ids=["precise-prefix", "inflight-load"])
@pytest.mark.parametrize(
    ("password", "db", "why"),
    [
        ("wrong", 0, "refused the credentials"),
        ("", 0, "refused the credentials"),
        (PASSWORD, 99, "refused the connection"),
    ],
)
async def test_refused_credentials_or_database_refuse_the_start_naming_the_field(
    tmp_path: Path, locked: RedisServer, plugin: object, password: str, db: int, why: str
) -> None:
    assert callable(plugin)
    with pytest.raises(ConfigError, match=f"redisConfig.address: Redis {why}"):
        await asyncio.wait_for(_started(_settings(tmp_path, plugin(_url(locked, password, db)))), 10)


@pytest.mark.parametrize("plugin", [_precise, _inflight], ids=["precise-prefix", "inflight-load"])
async def test_the_right_password_starts(tmp_path: Path, locked: RedisServer, plugin: object) -> None:
    assert callable(plugin)
    await asyncio.wait_for(_started(_settings(tmp_path, plugin(_url(locked, PASSWORD)))), 10)


async def test_a_redis_not_answering_yet_is_logged_not_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    address = f"redis://127.0.0.1:{free_port()}"  # nothing listens
    await asyncio.wait_for(_started(_settings(tmp_path, _precise(address))), 10)
    assert "Redis not reachable at start-up" in caplog.text
