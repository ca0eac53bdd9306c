"""A kubeconfig `exec` credential plugin is a child process of the EPP: it must not outlive the EPP's
interest in it. A start-up that is cancelled (SIGTERM while loading credentials), a plugin that never
answers (bounded wait) and a client closed while a renewal runs all kill the plugin (its whole process
group: a shell script's own children too) and reap it. No API server is needed: the plugin runs before
any request is sent. Renewals (a credential the server refuses, a client certificate that expires) are seen
through a stand-in server on loopback (fakeapi.py) that records the credential each request presented."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import ssl
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web
from helpers import serving, write_cert_pair

from llmepp.framework.plugin import ConfigError
from llmepp.k8s import client as kclient
from llmepp.k8s.client import KubeClient, KubeError, _ExecPlugin
from llmepp.server.tls import self_signed_pem

API = "https://127.0.0.1:9"  # never reached before the plugin has answered
PODS = "/api/v1/namespaces/default/pods"


def kubeconfig(
    path: Path, command: str, args: list[str], server: str = API, trust: str = "insecure-skip-tls-verify: true"
) -> Path:
    argv = ", ".join(f'"{a}"' for a in args)
    exec = f'{{apiVersion: client.authentication.k8s.io/v1beta1, command: "{command}", args: [{argv}]}}'
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters: [{{name: t, cluster: {{server: "{server}", {trust}}}}}]
users: [{{name: robot, user: {{exec: {exec}}}}}]
contexts: [{{name: t, context: {{cluster: t, user: robot}}}}]
current-context: t
"""
    )
    return path


def hanging_shell_plugin(tmp_path: Path, pids: Path) -> Path:
    """A shell script that records its PID and its child's, then waits for the child forever."""
    script = tmp_path / "plugin.sh"
    script.write_text(f'#!/bin/sh\nsleep 600 &\necho "$$ $!" > "{pids}.tmp"\nmv "{pids}.tmp" "{pids}"\nwait\n')
    script.chmod(0o755)
    return script


def _pids_written(pids: Path) -> list[int] | None:
    return [int(p) for p in pids.read_text().split()] if pids.exists() else None


async def read_pids(pids: Path) -> list[int]:
    deadline = time.monotonic() + 10
    while (written := _pids_written(pids)) is None:
        assert time.monotonic() < deadline, "the exec plugin never started"
        await asyncio.sleep(0.02)
    return written


def alive(pid: int) -> bool:
    """Running, or a zombie nobody reaped (our own child) — either is a leak."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def assert_gone(pids: list[int], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            for p in pids:  # do not leave them behind for the next test
                if alive(p):
                    os.kill(p, 9)
            pytest.fail(f"exec plugin processes still alive: {[p for p in pids if alive(p)]}")
        await asyncio.sleep(0.02)


async def test_cancelled_connect_kills_the_exec_plugin(tmp_path: Path) -> None:
    """SIGTERM during start-up cancels the start task while the plugin runs: the plugin and its own
    children are killed and reaped, not left running after the EPP gave up on them."""
    pids = tmp_path / "pids"
    kc = kubeconfig(tmp_path / "kc", str(hanging_shell_plugin(tmp_path, pids)), [])
    task = asyncio.create_task(KubeClient.connect(str(kc)))
    plugin_pids = await read_pids(pids)
    assert all(alive(p) for p in plugin_pids)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_gone(plugin_pids)


async def test_cancelled_connect_kills_a_python_plugin(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        f"import os, pathlib, time\npathlib.Path({str(pids)!r}).write_text(str(os.getpid()))\ntime.sleep(600)\n"
    )
    kc = kubeconfig(tmp_path / "kc", sys.executable, [str(plugin)])
    task = asyncio.create_task(KubeClient.connect(str(kc)))
    plugin_pids = await read_pids(pids)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_gone(plugin_pids)


async def test_a_plugin_that_never_answers_fails_start_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Long enough for the script to record its PIDs on a loaded machine before it is killed.
    monkeypatch.setattr(kclient, "EXEC_TIMEOUT", 1.5)
    pids = tmp_path / "pids"
    script = hanging_shell_plugin(tmp_path, pids)
    kc = kubeconfig(tmp_path / "kc", str(script), [])
    with pytest.raises(ConfigError) as e:
        await asyncio.wait_for(KubeClient.connect(str(kc)), 10)
    assert "robot" in str(e.value) and str(script) in str(e.value) and "1.5 s" in str(e.value), e.value
    await assert_gone(await read_pids(pids))


async def test_a_failing_plugin_still_says_why(tmp_path: Path) -> None:
    script = tmp_path / "plugin.sh"
    script.write_text("#!/bin/sh\necho 'no credentials here' >&2\nexit 3\n")
    script.chmod(0o755)
    with pytest.raises(ConfigError, match=r"returned 3\. no credentials here"):
        await KubeClient.connect(str(kubeconfig(tmp_path / "kc", str(script), [])))


async def test_closing_the_client_kills_a_renewal_in_progress(tmp_path: Path) -> None:
    """The first run hands out a credential that is already due for renewal (it expires within the
    5 min skew); the second, run by the next request, hangs — until the client is closed."""
    pids = tmp_path / "pids"
    runs = tmp_path / "runs"
    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        f"""import datetime, json, os, pathlib, time
runs = pathlib.Path({str(runs)!r})
if runs.exists():
    pathlib.Path({str(pids)!r}).write_text(str(os.getpid()))
    time.sleep(600)
runs.write_text("x")
expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=1)
status = {{"token": "t", "expirationTimestamp": expiry.strftime("%Y-%m-%dT%H:%M:%SZ")}}
print(json.dumps({{"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential", "status": status}}))
"""
    )
    client = await KubeClient.connect(str(kubeconfig(tmp_path / "kc", sys.executable, [str(plugin)])))
    request = asyncio.create_task(client.get("/api/v1/namespaces"))
    try:
        plugin_pids = await read_pids(pids)
        await asyncio.wait_for(client.aclose(), 10)
        await assert_gone(plugin_pids)
    finally:
        request.cancel()
        await asyncio.gather(request, return_exceptions=True)


async def test_a_plugin_answering_a_client_certificate_is_used_for_tls(tmp_path: Path) -> None:
    """The other kind of ExecCredential: a client certificate and key (PEM in the answer) become the files the
    client's TLS presents, as the library's own run did."""
    certs = tmp_path / "certs"
    cert = write_cert_pair(certs)
    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        f"""import json, pathlib
certs = pathlib.Path({str(certs)!r})
status = {{"clientCertificateData": (certs / "tls.crt").read_text(), "clientKeyData": (certs / "tls.key").read_text()}}
print(json.dumps({{"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential", "status": status}}))
"""
    )
    client = await KubeClient.connect(str(kubeconfig(tmp_path / "kc", sys.executable, [str(plugin)])))
    try:
        configuration = client._api.configuration
        assert configuration.cert_file is not None and configuration.key_file is not None
        assert _read(configuration.cert_file) == cert
        assert _read(configuration.key_file) == _read(certs / "tls.key")
        assert not configuration.api_key  # no bearer token besides
    finally:
        await client.aclose()


def _read(path: str | Path) -> bytes:
    return Path(path).read_bytes()


async def test_a_request_cancelled_during_a_renewal_does_not_cancel_it_for_the_others(tmp_path: Path) -> None:
    """Requests share one renewal run; the one that started it going away (cancelled) killed the plugin, and the
    requests waiting with it kept the expired credential for EXEC_MIN_INTERVAL."""
    runs = tmp_path / "runs"
    plugin: Path | _ExecPlugin | None
    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        f"""import datetime, json, pathlib, time
runs = pathlib.Path({str(runs)!r})
n = len(runs.read_text()) if runs.exists() else 0
runs.write_text("x" * (n + 1))
if n:
    time.sleep(0.5)
expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=1 if n == 0 else 60)
status = {{"token": f"t{{n}}", "expirationTimestamp": expiry.strftime("%Y-%m-%dT%H:%M:%SZ")}}
print(json.dumps({{"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential", "status": status}}))
"""
    )
    client = await KubeClient.connect(str(kubeconfig(tmp_path / "kc", sys.executable, [str(plugin)])))
    try:
        configuration = client._api.configuration
        plugin = client._exec_plugin
        assert plugin is not None
        assert configuration.api_key["BearerToken"] == "Bearer t0"  # due for renewal (within the 5 min skew)
        first = asyncio.create_task(plugin.refresh())  # what each request does first
        second = asyncio.create_task(plugin.refresh())
        await asyncio.sleep(0.2)  # the renewal's plugin is running
        first.cancel()
        await asyncio.wait_for(second, 10)
        assert configuration.api_key["BearerToken"] == "Bearer t1"
        assert _read(runs) == b"xx"
    finally:
        await client.aclose()


def token_plugin(path: Path, token: str = "t", extra: str = "") -> Path:
    """A shell script answering a token (no expiry); `extra` runs first."""
    credential = (
        '{"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential", '
        f'"status": {{"token": "{token}"}}}}'
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{extra}\necho '{credential}'\n")
    path.chmod(0o755)
    return path


async def test_a_relative_command_path_is_resolved_against_the_kubeconfig_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As client-go does (kubectl works with this kubeconfig from anywhere): a command with a path separator that
    is not absolute is relative to the directory of the kubeconfig file, not to the EPP's working directory."""
    token_plugin(tmp_path / "conf" / "bin" / "plugin.sh")
    kc = kubeconfig(tmp_path / "conf" / "kc", "bin/plugin.sh", [])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    client = await KubeClient.connect(str(kc))
    try:
        assert client._api.configuration.api_key["BearerToken"] == "Bearer t"
    finally:
        await client.aclose()


async def test_a_bare_command_name_is_looked_up_in_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No path separator: $PATH, not the kubeconfig's directory (a file of that name there is not run)."""
    token_plugin(tmp_path / "conf" / "my-plugin", "wrong")
    token_plugin(tmp_path / "path" / "my-plugin", "right")
    monkeypatch.setenv("PATH", f"{tmp_path / 'path'}{os.pathsep}{os.environ['PATH']}")
    client = await KubeClient.connect(str(kubeconfig(tmp_path / "conf" / "kc", "my-plugin", [])))
    try:
        assert client._api.configuration.api_key["BearerToken"] == "Bearer right"
    finally:
        await client.aclose()


def exec_info_plugin(tmp_path: Path) -> tuple[Path, Path]:
    """A plugin that keeps the KUBERNETES_EXEC_INFO it was given (and answers a token)."""
    seen = tmp_path / "exec-info.json"
    return token_plugin(tmp_path / "plugin.sh", extra=f'printf %s "$KUBERNETES_EXEC_INFO" > "{seen}"'), seen


async def test_provide_cluster_info_gives_the_plugin_the_cluster(tmp_path: Path) -> None:
    """`provideClusterInfo: true`: KUBERNETES_EXEC_INFO's spec.cluster says which cluster the credential is for
    (server, CA as base64 data — read from a `certificate-authority` file too — and the cluster's exec extension),
    as client-go gives it; a plugin serving several clusters depends on it."""
    plugin, seen = exec_info_plugin(tmp_path)
    ca = b"-----BEGIN CERTIFICATE-----\nnot really\n-----END CERTIFICATE-----\n"
    (tmp_path / "ca.crt").write_bytes(ca)
    kc = tmp_path / "kc"
    kc.write_text(
        f"""apiVersion: v1
kind: Config
clusters:
- name: t
  cluster:
    server: "{API}"
    certificate-authority: ca.crt
    tls-server-name: api.example
    extensions:
    - {{name: other, extension: {{a: 1}}}}
    - {{name: client.authentication.k8s.io/exec, extension: {{audience: epp}}}}
users:
- name: robot
  user:
    exec: {{apiVersion: client.authentication.k8s.io/v1beta1, command: "{plugin}", provideClusterInfo: true}}
contexts: [{{name: t, context: {{cluster: t, user: robot}}}}]
current-context: t
"""
    )
    with pytest.raises(ConfigError):  # "not really" is no certificate: the plugin has run by then
        await KubeClient.connect(str(kc))
    info = json.loads(seen.read_text())
    assert info["apiVersion"] == "client.authentication.k8s.io/v1beta1" and info["kind"] == "ExecCredential"
    assert info["spec"]["interactive"] is False
    assert info["spec"]["cluster"] == {
        "server": API,
        "tls-server-name": "api.example",
        "certificate-authority-data": base64.b64encode(ca).decode(),
        "config": {"audience": "epp"},
    }


async def test_without_provide_cluster_info_the_plugin_is_not_told_the_cluster(tmp_path: Path) -> None:
    plugin, seen = exec_info_plugin(tmp_path)
    client = await KubeClient.connect(str(kubeconfig(tmp_path / "kc", str(plugin), [])))
    await client.aclose()
    assert json.loads(seen.read_text())["spec"] == {"interactive": False}


async def test_interactive_mode_never_is_never_interactive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`interactiveMode: Never` (client-go): spec.interactive is false even on a terminal."""

    class Terminal:
        def isatty(self) -> bool:
            return True

    plugin, seen = exec_info_plugin(tmp_path)
    kc = tmp_path / "kc"
    kc.write_text(
        kubeconfig(tmp_path / "kc", str(plugin), []).read_text().replace("args: []", "args: [], interactiveMode: Never")
    )
    monkeypatch.setattr(sys, "stdout", Terminal())
    client = await KubeClient.connect(str(kc))
    await client.aclose()
    assert json.loads(seen.read_text())["spec"]["interactive"] is False


async def test_a_missing_plugin_says_how_to_install_it(tmp_path: Path) -> None:
    """client-go shows the kubeconfig's `installHint` when the command is not found (GKE's kubeconfigs carry one)."""
    kc = tmp_path / "kc"
    kc.write_text(
        kubeconfig(tmp_path / "kc", "no-such-exec-plugin-here", [])
        .read_text()
        .replace("args: []", 'args: [], installHint: "install it with: apt install the-plugin"')
    )
    with pytest.raises(ConfigError) as e:
        await KubeClient.connect(str(kc))
    assert "no-such-exec-plugin-here" in str(e.value) and "robot" in str(e.value), e.value
    assert "install it with: apt install the-plugin" in str(e.value), e.value


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (None, "status is not an object"),
        ({"token": "t", "expirationTimestamp": "tomorrow"}, "expirationTimestamp 'tomorrow' is not an RFC 3339 time"),
        ({"token": "t", "expirationTimestamp": 5}, "expirationTimestamp 5 is not an RFC 3339 time"),
    ],
)
async def test_a_malformed_answer_is_a_start_up_error_naming_it(tmp_path: Path, status: object, error: str) -> None:
    """A traceback before (TypeError / ValueError out of connect), not the start-up error naming the problem."""
    plugin = tmp_path / "plugin.py"
    answer = {"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential", "status": status}
    plugin.write_text(f"import json\nprint(json.dumps({answer!r}))\n")
    with pytest.raises(ConfigError, match=f"kubeconfig user 'robot'.*{re.escape(error)}"):
        await KubeClient.connect(str(kubeconfig(tmp_path / "kc", sys.executable, [str(plugin)])))


def answering_plugin(tmp_path: Path, *answers: dict[str, object]) -> tuple[Path, Path]:
    """A plugin whose n-th run answers `answers[n]` (the last one ever after), and the file counting its runs (one
    `x` each). An answer's `expiresIn` (seconds from the run) becomes its expirationTimestamp."""
    runs = tmp_path / "runs"
    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        f"""import datetime, json, pathlib
runs = pathlib.Path({str(runs)!r})
n = len(runs.read_text()) if runs.exists() else 0
runs.write_text("x" * (n + 1))
status = {list(answers)!r}[min(n, {len(answers) - 1})]
if "expiresIn" in status:
    expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=status.pop("expiresIn"))
    status["expirationTimestamp"] = expiry.strftime("%Y-%m-%dT%H:%M:%SZ")
print(json.dumps({{"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential", "status": status}}))
"""
    )
    return plugin, runs


def unauthorized() -> web.Response:
    return web.json_response({"kind": "Status", "code": 401, "reason": "Unauthorized"}, status=401)


async def get_status(client: KubeClient) -> int:
    try:
        await client.get(PODS)
    except KubeError as e:
        return e.status
    return 200


async def test_a_token_refused_with_401_is_renewed_for_the_next_request(tmp_path: Path) -> None:
    """A token revoked before it expires (or one that never expires: no expirationTimestamp) is answered 401: as
    client-go, the plugin runs again for the next request instead of the refused token being sent forever."""
    seen: list[str] = []

    async def api(request: web.Request) -> web.Response:
        seen.append(request.headers["Authorization"])
        return web.json_response({"kind": "PodList", "items": []}) if seen[-1] == "Bearer B" else unauthorized()

    plugin, runs = answering_plugin(tmp_path, {"token": "A"}, {"token": "B"})
    async with serving(api) as url:
        client = await KubeClient.connect(str(kubeconfig(tmp_path / "kc", sys.executable, [str(plugin)], url)))
        try:
            assert [await get_status(client) for _ in range(3)] == [401, 200, 200]
            assert seen == ["Bearer A", "Bearer B", "Bearer B"]
            assert runs.read_text() == "xx"
        finally:
            await client.aclose()


async def test_a_late_401_to_a_credential_already_replaced_does_not_renew_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests went out with token A; the first 401 renews it to B. The second 401, for A, arrives after
    that: it says nothing about B, which stays (as client-go compares the credential a 401 was for)."""
    monkeypatch.setattr(kclient, "EXEC_MIN_INTERVAL", 0.0)  # only the credential check can hold a second run back
    seen: list[str] = []
    release = asyncio.Event()

    async def api(request: web.Request) -> web.Response:
        token = request.headers["Authorization"]
        seen.append(token)
        if token != "Bearer A":
            return web.json_response({"kind": "PodList", "items": []})
        if seen.count("Bearer A") == 2:
            await release.wait()  # the slow one
        return unauthorized()

    plugin, runs = answering_plugin(tmp_path, {"token": "A"}, {"token": "B"}, {"token": "C"})
    async with serving(api) as url:
        client = await KubeClient.connect(str(kubeconfig(tmp_path / "kc", sys.executable, [str(plugin)], url)))
        try:
            # Either request may reach the server second (and be held), so take whichever answers first.
            both = {asyncio.create_task(get_status(client)) for _ in range(2)}
            done, held = await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
            assert [task.result() for task in done] == [401]
            (slow,) = held
            assert await get_status(client) == 200  # renewed to B
            release.set()
            assert await slow == 401  # A's late answer
            assert await get_status(client) == 200
            assert seen[-1] == "Bearer B" and runs.read_text() == "xx"
        finally:
            await client.aclose()


async def test_a_server_refusing_every_token_runs_the_plugin_at_most_once_per_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Each 401 asks for a new credential, but the plugin is not forked for every request: until EXEC_MIN_INTERVAL
    has passed since the last run, requests go out with the token they have."""
    monkeypatch.setattr(kclient, "EXEC_MIN_INTERVAL", 1.0)
    seen: list[str] = []

    async def api(request: web.Request) -> web.Response:
        seen.append(request.headers["Authorization"])
        return unauthorized()

    plugin, runs = answering_plugin(tmp_path, {"token": "t0"}, {"token": "t1"}, {"token": "t2"})
    async with serving(api) as url:
        client = await KubeClient.connect(str(kubeconfig(tmp_path / "kc", sys.executable, [str(plugin)], url)))
        try:
            with caplog.at_level(logging.INFO, logger="llmepp.k8s.client"):
                for _ in range(5):
                    assert await get_status(client) == 401
                await asyncio.sleep(1.1)
                assert await get_status(client) == 401
            assert seen == ["Bearer t0", "Bearer t1", *["Bearer t1"] * 3, "Bearer t2"]
            assert runs.read_text() == "xxx"
            renewals = [r for r in caplog.records if "renewed" in r.getMessage()]
            assert len(renewals) == 2, [r.getMessage() for r in caplog.records]
        finally:
            await client.aclose()


def _pem_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate whose common name is `name`, and its key, as files in `directory`."""
    cert, key = self_signed_pem((name,))
    (directory / f"{name}.crt").write_bytes(cert)
    (directory / f"{name}.key").write_bytes(key)
    return directory / f"{name}.crt", directory / f"{name}.key"


def _cert_answer(pair: tuple[Path, Path], **extra: object) -> dict[str, object]:
    return {"clientCertificateData": pair[0].read_text(), "clientKeyData": pair[1].read_text(), **extra}


@pytest.mark.parametrize("why", ["expired", "refused"])
async def test_a_renewed_client_certificate_is_presented_on_new_connections(tmp_path: Path, why: str) -> None:
    """A plugin answering a client certificate: once it expires (or the server refuses it with 401) the plugin
    runs again and the next request's TLS handshake presents the new certificate, not the first one forever.
    Real TLS on loopback: the server requires a client certificate and records whose each request presented."""
    server_cert, server_key = _pem_pair(tmp_path, "127.0.0.1")
    one, two = _pem_pair(tmp_path, "one"), _pem_pair(tmp_path, "two")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(server_cert, server_key)
    tls.load_verify_locations(cadata=one[0].read_text() + two[0].read_text())
    tls.verify_mode = ssl.CERT_REQUIRED
    seen: list[str] = []

    async def api(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        seen.append(dict(field for rdn in peer["subject"] for field in rdn)["commonName"] if peer else "")
        if why == "refused" and seen[-1] == "one":
            return unauthorized()
        return web.json_response({"kind": "PodList", "items": []})

    # Expiring: valid 2-3 s (the client renews 5 min before an expiry); refused: it would never expire.
    first = _cert_answer(one, expiresIn=5 * 60 + 3) if why == "expired" else _cert_answer(one)
    plugin, runs = answering_plugin(tmp_path, first, _cert_answer(two, expiresIn=3600))
    trust = f'certificate-authority: "{server_cert}"'
    async with serving(api, tls) as url:
        client = await KubeClient.connect(str(kubeconfig(tmp_path / "kc", sys.executable, [str(plugin)], url, trust)))
        try:
            assert await get_status(client) == (200 if why == "expired" else 401)
            if why == "expired":
                await asyncio.sleep(3.2)
            assert [await get_status(client) for _ in range(2)] == [200, 200]
            assert seen == ["one", "two", "two"]
            assert runs.read_text() == "xx"
        finally:
            await client.aclose()
