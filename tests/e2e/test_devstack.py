"""`make run` (python -m llmepp.devstack), as the README tells a new user to run it: the stack comes up, the curl
line it prints is answered by a simulated pod through Envoy and the EPP, and Ctrl-C (or the terminal closing,
even during start-up) stops every process it started."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import yaml

from llmepp.testing.ports import free_port
from llmepp.testing.stack import with_file_discovery

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
PODS = 2


def _addresses(admin: int, epp: int, health: int, metrics: int, pod: int) -> dict[str, tuple[str, int]]:
    """What devstack listens on besides Envoy's listener (--port): Envoy admin, the EPP's three ports, the pods."""
    return {
        "Envoy admin": ("127.0.0.1", admin),
        "EPP": ("127.0.0.1", epp),
        "EPP health": ("127.0.0.1", health),
        "EPP metrics": ("127.0.0.1", metrics),
        **{f"pod {i}": (f"127.0.0.{i + 2}", pod) for i in range(PODS)},
    }


FIXED = _addresses(9901, 9002, 9003, 9090, 8000)  # the defaults
START_TIMEOUT = 180.0  # Envoy, the EPP and the pods start on a loaded 2-core machine
STOP_TIMEOUT = 60.0


def _listening(addresses: dict[str, tuple[str, int]] = FIXED) -> list[str]:
    out = []
    for what, address in addresses.items():
        with socket.socket() as s:
            if s.connect_ex(address) == 0:
                out.append(f"{what} {address[0]}:{address[1]}")
    return out


@asynccontextmanager
async def devstack(*args: str, ports: dict[str, tuple[str, int]] = FIXED) -> AsyncIterator[asyncio.subprocess.Process]:
    """`make run`'s command (with `args`, listening on `ports`); whatever happens in the test, it is stopped as a
    user stops it (Ctrl-C) after."""
    busy = _listening(ports)
    assert not busy, f"devstack's ports are taken (a `make run` still running?): {busy}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmepp.devstack", "--pods", str(PODS), "--port", str(free_port()), *args,
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _read_until(proc: asyncio.subprocess.Process, text: str) -> str:
    assert proc.stdout is not None
    printed = ""
    async with asyncio.timeout(START_TIMEOUT):
        while text not in printed:
            line = await proc.stdout.readline()
            assert line, f"devstack exited before printing {text!r}:\n{printed}"
            printed += line.decode()
    return printed


async def _stopped(
    proc: asyncio.subprocess.Process, sig: signal.Signals, ports: dict[str, tuple[str, int]] = FIXED
) -> str:
    """Send `sig`; devstack must exit 0 saying "stopped", with nothing of the stack still listening."""
    assert proc.stdout is not None
    proc.send_signal(sig)
    async with asyncio.timeout(STOP_TIMEOUT):
        rest = (await proc.stdout.read()).decode()
        assert await proc.wait() == 0, rest
    assert rest.rstrip().endswith("stopped"), rest
    assert not _listening(ports), "a process devstack started outlived it"
    return rest


def _curl_request(printed: str) -> urllib.request.Request:
    """The printed curl line as a request: URL, header and JSON body taken from the text."""
    url = re.search(r"curl -s (\S+/v1/completions)", printed)
    body = re.search(r"-d '(\{.*?\})'", printed, re.S)
    assert url and body, printed
    data = json.loads(body.group(1))  # the line must hold valid JSON a user can paste
    return urllib.request.Request(
        url.group(1), data=json.dumps(data).encode(), headers={"content-type": "application/json"}
    )


async def _answers_the_curl_line(printed: str) -> None:
    def send() -> tuple[int, str | None, dict[str, object]]:
        with urllib.request.urlopen(_curl_request(printed), timeout=60) as r:
            return r.status, r.headers.get("x-inference-pod"), json.loads(r.read())

    status, pod, answer = await asyncio.to_thread(send)
    assert status == 200, answer
    assert answer["object"] == "text_completion" and answer["choices"], answer
    assert pod in {f"sim-{i}" for i in range(PODS)}, pod  # the simulated pod that answered


async def test_make_run_serves_the_printed_curl_line_and_stops_on_ctrl_c() -> None:
    async with devstack() as proc:
        printed = await _read_until(proc, "Ctrl-C stops everything.")
        await _answers_the_curl_line(printed)
        await _stopped(proc, signal.SIGINT)


async def test_every_port_can_be_moved() -> None:
    """Another Envoy on 9901 or a Prometheus on 9090 need not stop `make run`: each port has a flag, and what
    devstack prints (the EPP's address, its metrics line) follows them."""
    admin, epp, health, metrics, pod = (free_port() for _ in range(5))
    moved = _addresses(admin, epp, health, metrics, pod)
    flags = ["--admin-port", str(admin), "--epp-port", str(epp), "--health-port", str(health)]
    flags += ["--metrics-port", str(metrics), "--pod-port", str(pod)]
    async with devstack(*flags, ports=moved) as proc:
        printed = await _read_until(proc, "Ctrl-C stops everything.")
        assert f"EPP 127.0.0.1:{epp} " in printed and f"127.0.0.2:{pod}" in printed, printed
        assert sorted(_listening(moved)) == sorted(f"{w} {h}:{p}" for w, (h, p) in moved.items())
        await _answers_the_curl_line(printed)
        url = re.search(r"curl -s (localhost:\d+/metrics)", printed)
        assert url and url.group(1) == f"localhost:{metrics}/metrics", printed
        page = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://{url.group(1)}", timeout=10).read())
        assert b"llm_d_epp_" in page
        await _stopped(proc, signal.SIGINT, moved)


async def test_precise_routes_on_the_pods_kv_events() -> None:
    """`make run ARGS=--precise`: the pods publish KV events, the EPP's precise index takes them in, and a prompt
    sent again goes where its blocks are."""
    async with devstack("--precise") as proc:
        printed = await _read_until(proc, "Ctrl-C stops everything.")
        assert "precise prefix routing" in printed, printed
        prompt = "A long system prompt shared by every request of this test. " * 40
        body = {"model": "sim-model", "prompt": prompt, "max_tokens": 4}
        request = _curl_request(printed)

        def send() -> str | None:
            send_request = urllib.request.Request(
                request.full_url, data=json.dumps(body).encode(), headers=request.headers
            )
            with urllib.request.urlopen(send_request, timeout=60) as r:
                assert r.status == 200
                return r.headers.get("x-inference-pod")

        first = await asyncio.to_thread(send)
        metrics = f"http://127.0.0.1:{FIXED['EPP metrics'][1]}/metrics"
        stored = re.compile(
            rb'^llm_d_epp_kv_events_block_stored_total\{producer="precise-prefix-cache-producer"\} (\S+)$', re.M
        )

        def blocks_stored() -> float:
            page = urllib.request.urlopen(metrics, timeout=10).read()
            match = stored.search(page)
            assert match, page[-2000:]
            return float(match.group(1))

        deadline = time.monotonic() + 30
        while await asyncio.to_thread(blocks_stored) == 0:  # the events arrive after the answer
            assert time.monotonic() < deadline, "no KV event reached the EPP"
            await asyncio.sleep(0.1)
        assert [await asyncio.to_thread(send) for _ in range(3)] == [first] * 3
        await _stopped(proc, signal.SIGINT)


async def test_the_terminal_closing_during_start_up_stops_what_was_started() -> None:
    """SIGHUP once the pods serve, before the stack is ready: devstack stops them (they run in sessions of their
    own, so the terminal's hang-up does not reach them) instead of dying and leaving them on their ports."""
    async with devstack() as proc:
        await _read_until(proc, "starting")
        deadline = time.monotonic() + START_TIMEOUT
        while not any(what.startswith("pod") for what in _listening()):
            assert proc.returncode is None and time.monotonic() < deadline
            await asyncio.sleep(0.02)
        rest = await _stopped(proc, signal.SIGHUP)
        assert "ready:" not in rest  # it was stopped during start-up, as meant


async def test_a_stop_with_no_one_left_to_read_the_output_still_stops_the_stack() -> None:
    """The terminal closed (printing then fails with EIO) or `make run | tee log` with the tee gone (EPIPE): the
    stop must not depend on printing "stopping". It did: the signal handler's print raised before it cancelled
    the stack, and every later signal was ignored, leaving Envoy, the EPP and the pods on their ports."""
    assert not _listening(), "devstack's ports are taken (a `make run` still running?)"
    read_fd, write_fd = os.pipe()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmepp.devstack", "--pods", str(PODS), "--port", str(free_port()),
        cwd=REPO, stdout=write_fd, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    os.close(write_fd)
    try:
        reader = os.fdopen(read_fd, "rb", buffering=0)
        printed = b""
        async with asyncio.timeout(START_TIMEOUT):
            while b"Ctrl-C stops everything." not in printed:
                chunk = await asyncio.to_thread(reader.read, 65536)
                assert chunk, f"devstack exited before it was ready:\n{printed.decode()}"
                printed += chunk
        reader.close()  # nobody reads its output any more
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(STOP_TIMEOUT):
            await proc.wait()
        assert not _listening(), "a process devstack started outlived it"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_sigkilled_devstack_takes_its_processes_with_it() -> None:
    """`kill -9` (or the OOM killer) runs no clean-up in devstack: the kernel signals its children instead
    (PR_SET_PDEATHSIG), and they stop. Before, Envoy, the EPP and the pods went on holding their ports."""
    async with devstack() as proc:
        await _read_until(proc, "Ctrl-C stops everything.")
        assert sorted(_listening()) == sorted(f"{w} {h}:{p}" for w, (h, p) in FIXED.items())
        proc.kill()
        async with asyncio.timeout(STOP_TIMEOUT):  # the pods write to devstack's stderr: a live one holds it
            await proc.wait()
        deadline = time.monotonic() + STOP_TIMEOUT
        while left := _listening():
            assert time.monotonic() < deadline, f"still listening after devstack was killed: {left}"
            await asyncio.sleep(0.1)


async def _exit(*args: str) -> tuple[int, str]:
    """Run devstack to its end (it must end by itself): exit code and everything it printed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmepp.devstack", "--pods", str(PODS), "--port", str(free_port()), *args,
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), START_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_a_taken_port_is_named_before_anything_starts() -> None:
    with socket.socket() as holder:
        holder.bind(FIXED["EPP"])
        holder.listen()
        code, printed = await _exit()
    assert code == 1, printed
    assert "EPP 127.0.0.1:9002 (--epp-port)" in printed and "another `make run`" in printed, printed
    assert "Traceback" not in printed and "starting" not in printed, printed
    with socket.socket() as holder:
        holder.bind(("127.0.0.2", 5557))
        holder.listen()
        code, printed = await _exit("--precise")
    assert code == 1 and "pod 0 KV events 127.0.0.2:5557 (--precise)" in printed, printed


async def test_a_config_the_epp_refuses_is_reported_without_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "epp-config.yaml"
    config.write_text("plugins:\n- type: no-such-scorer\n")
    code, printed = await _exit("--config", str(config))
    assert code == 1, printed
    assert "devstack: the stack did not start" in printed and "no-such-scorer" in printed, printed
    assert "Traceback" not in printed.split("devstack: the stack did not start")[0], printed  # devstack's own
    assert not _listening(), "a process devstack started outlived it"


async def test_usage_errors_exit_2_before_anything_starts(tmp_path: Path) -> None:
    code, printed = await _exit("--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "--config" in printed and "Traceback" not in printed, printed
    code, printed = await _exit("--pods", "254")  # the last --pods wins over the one _exit gives
    assert code == 2 and "--pods must be 1 to 253" in printed, printed
    code, printed = await _exit("--port", "70000")
    assert code == 2 and "--port must be 1 to 65535" in printed, printed
    code, printed = await _exit("--metrics-port", "0")
    assert code == 2 and "--metrics-port must be 1 to 65535" in printed, printed
    code, printed = await _exit("--epp-port", "9003")  # the EPP's health port's default
    assert code == 2 and "--epp-port and --health-port are both 9003" in printed, printed
    code, printed = await _exit("--precise", "--config", str(tmp_path / "x.yaml"))
    assert code == 2 and "not allowed with argument" in printed, printed
    code, printed = await _exit("--precise", "--pod-port", "5557")
    assert code == 2 and "--pod-port 5557 is a KV-event port of --precise" in printed, printed
    # A config the EPP could not read: was a traceback from the stack's own YAML handling, pods started.
    broken = tmp_path / "broken.yaml"
    for text, problem in [("plugins: [ {type: queue-scorer\n", "is not valid YAML"),
                          ("- type: queue-scorer\n", "must be a mapping")]:  # fmt: skip
        broken.write_text(text)
        code, printed = await _exit("--config", str(broken))
        assert code == 2 and f"--config: config {problem}" in printed and "Traceback" not in printed, printed


async def test_a_null_plugins_or_data_layer_field_is_read_as_the_epp_reads_it(tmp_path: Path) -> None:
    """`plugins:` / `dataLayer:` given empty keep their defaults, as `epp` reads them; the stack adding its
    file discovery to them raised."""
    config = "plugins:\ndataLayer:\n"
    document = yaml.safe_load(with_file_discovery(config, tmp_path / "endpoints.yaml"))
    assert [p["type"] for p in document["plugins"]] == ["file-discovery"]
    assert document["dataLayer"] == {"discovery": {"pluginRef": "stack-discovery"}}
