"""A thin asyncio client for the Kubernetes API: raw JSON in, raw JSON out.

kubernetes_asyncio does the hard part we do not want to own — kubeconfig parsing (contexts,
client certificates, exec / OIDC providers), in-cluster service-account tokens that rotate,
TLS — and gives us an authenticated aiohttp session. We skip its generated models: every
object we read is decoded by msgspec straight into the few fields we use (models.py), which
is several times cheaper than building `V1Pod` objects for every pod event in a namespace,
and one code path serves core kinds, CRDs and Leases alike.

Config resolution (`--kubeconfig`): the flag's file if given; else the in-cluster service
account when running in a pod (`KUBERNETES_SERVICE_HOST`); else `$KUBECONFIG`; else
`~/.kube/config`.

Credentials that rotate are read again, as client-go does: a kubeconfig's `tokenFile` (a hook before each
request); an `exec` plugin's credential, token or client certificate, once it expires or the API server
refuses it (401); and the API server's certificate authority when it is a file — the service account's
ca.crt, a kubeconfig's `certificate-authority`: checked every CA_FILE_PERIOD and at once after a failed
verification. The SSL context follows the CA file and the client certificate (ApiTLS): new connections use
what they say now, open ones (a watch) are left alone. An `exec` plugin is run by us (_ExecPlugin), not by
the library: it has EXEC_TIMEOUT to answer, and it is killed and reaped, with whatever it started, when it
takes longer, when start-up is cancelled while it runs, or when the client is closed during a renewal.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import aiohttp

from llmepp.framework.plugin import ConfigError

if TYPE_CHECKING:
    from kubernetes_asyncio.client import ApiClient

log = logging.getLogger(__name__)

# Unary calls (list pages, lease updates) never legitimately take this long.
REQUEST_TIMEOUT = 30.0
_JSON = "application/json"


class KubeError(Exception):
    """A non-2xx answer from the API server (or a `type: ERROR` watch event)."""

    def __init__(self, status: int, reason: str = "", message: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}" if message else f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def gone(self) -> bool:
        """410: the resourceVersion is older than the watch cache keeps; relist."""
        return self.status == 410

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @classmethod
    def from_status(cls, status: int, body: bytes) -> KubeError:
        """Build from an HTTP status and a (usually `kind: Status`) JSON body."""
        reason, message = "", body[:300].decode(errors="replace")
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            reason = str(doc.get("reason", ""))
            message = str(doc.get("message", message))
            code = doc.get("code")
            if type(code) is int and 100 <= code <= 599:  # a proxy's JSON may carry anything here
                status = code
        return cls(status, reason, message)


def _check_kubeconfig_files(paths: str) -> None:
    """Each existing file of `paths` is YAML holding a mapping (or nothing): the client library's merger fails on
    anything else with a TypeError or a YAML traceback."""
    import yaml

    for path in filter(os.path.exists, filter(None, paths.split(os.pathsep))):
        try:
            with open(path, encoding="utf-8") as f:
                doc = yaml.safe_load(f)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"kubeconfig {path}: not valid YAML: {e}") from None
        except OSError as e:
            raise ConfigError(f"kubeconfig {path}: {e}") from None
        if not isinstance(doc, dict):
            what = "empty" if doc is None else f"a {type(doc).__name__}"
            raise ConfigError(f"kubeconfig {path}: is {what}, not a kubeconfig (a mapping: clusters, contexts, users)")


def kubeconfig_path(flag: str | None) -> str:
    """--kubeconfig, else $KUBECONFIG (may list several files; the missing ones are skipped, as client-go
    does), else ~/.kube/config. ConfigError naming the source when there is no file to read."""
    if flag is not None:
        if not os.path.exists(flag):
            raise ConfigError(f"--kubeconfig: {flag}: no such file")
        return flag
    listed = os.environ.get("KUBECONFIG")
    if listed:
        if not any(os.path.exists(p) for p in listed.split(os.pathsep) if p):
            raise ConfigError(f"$KUBECONFIG: {listed}: no such file")
        return listed
    default = os.path.expanduser("~/.kube/config")
    if not os.path.exists(default):
        raise ConfigError(
            f"no Kubernetes credentials: not in a cluster ($KUBERNETES_SERVICE_HOST unset), $KUBECONFIG unset and "
            f"{default} not found (use --kubeconfig, or a config with file discovery)"
        )
    return default


# client-go re-reads a kubeconfig user's `tokenFile` every minute and runs its `exec` plugin again once the
# credential expires or is refused; kubernetes_asyncio does either once, at load.
TOKEN_FILE_PERIOD = 60.0
EXEC_MIN_INTERVAL = 10.0  # at most one plugin run per this many seconds (failing, short-lived or always refused)


def _strip_token(configuration: Any) -> None:
    """A token file ends with a newline more often than not (client-go trims it); in a header it is an error."""
    token = configuration.api_key.get("BearerToken")
    if token:
        configuration.api_key["BearerToken"] = token.strip()


# A plugin that has not answered in this long never will (kubectl's have no limit, but a person is there to
# press ^C); the run is killed and start-up fails, or a renewal keeps the old credential.
EXEC_TIMEOUT = 60.0
EXEC_KILL_WAIT = 5.0  # for a killed plugin to be reaped


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the plugin and whatever it started (its own process group: it leads a session of its own)."""
    with contextlib.suppress(ProcessLookupError):  # all gone already
        os.killpg(proc.pid, signal.SIGKILL)


class _PluginClosed(Exception):
    """The client was closed before or while the exec plugin ran."""


_EXEC_EXTENSION = "client.authentication.k8s.io/exec"


def _exec_cluster(loader: Any) -> dict[str, Any]:
    """KUBERNETES_EXEC_INFO's `spec.cluster` for `provideClusterInfo: true`, as client-go fills it: the server, the
    CA as base64 data (a `certificate-authority` file read), and the cluster's exec extension as `config`."""
    from kubernetes_asyncio.config.kube_config import FileOrData

    cluster = loader._cluster
    info: dict[str, Any] = {"server": cluster.safe_get("server") or ""}
    for key in ("tls-server-name", "insecure-skip-tls-verify", "proxy-url", "disable-compression"):
        if cluster.safe_get(key):
            info[key] = cluster.value[key]
    ca = FileOrData(cluster, "certificate-authority", file_base_path=loader._get_base_path(cluster.path)).as_data()
    if ca:
        info["certificate-authority-data"] = ca
    for extension in cluster.safe_get("extensions") or []:
        if isinstance(extension, dict) and extension.get("name") == _EXEC_EXTENSION and "extension" in extension:
            info["config"] = extension["extension"]
    return info


class _ExecPlugin:
    """Runs a kubeconfig user's `exec` credential plugin in place of kubernetes_asyncio's ExecProvider, whose
    run neither bounds the wait nor kills the child when cancelled: a start-up cancelled by SIGTERM left the
    plugin running, unreaped. Here the plugin gets a session (process group) of its own, and a run that is
    cancelled, takes longer than EXEC_TIMEOUT or is still going when the client closes kills the group and
    reaps the plugin. What is done with its answer is what the library does (load_from_exec_plugin).

    It runs again, as client-go's exec authenticator does, before the next request once the credential has
    expired (`expirationTimestamp`, less the library's 5 min skew) or the API server answered 401 to it (revoked,
    or one that never expires gone stale): at most once per EXEC_MIN_INTERVAL, one run shared by the requests
    waiting for it. A failed run keeps the old credential until the next try."""

    def __init__(self, loader: Any, configuration: Any) -> None:
        self._loader = loader
        self._configuration = configuration
        self.name = f"exec plugin of kubeconfig user {str(loader._current_context['context']['user'])!r}"
        self._running: set[asyncio.subprocess.Process] = set()
        self.closed = False
        self.expiry: datetime.datetime | None = None  # of the current credential; None: it does not expire
        self.refused = False  # the API server answered 401 to the current credential
        self.generation = 0  # counts credentials, so a 401 to one already replaced is not held against the next
        self._next_run = 0.0
        self._renewal: asyncio.Task[None] | None = None

    async def load(self) -> bool:
        """Stands in for `loader.load_from_exec_plugin` (at load, and for a renewal): runs the plugin."""
        from kubernetes_asyncio.config.config_exception import ConfigException
        from kubernetes_asyncio.config.dateutil import parse_rfc3339
        from kubernetes_asyncio.config.kube_config import FileOrData

        loader = self._loader
        status = await self._run()
        expiry = status.get("expirationTimestamp")
        try:
            expires = parse_rfc3339(expiry) if expiry is not None else None
        except (ValueError, TypeError, AttributeError):
            raise ConfigException(f"{self.name}: expirationTimestamp {expiry!r:.100} is not an RFC 3339 time") from None
        if "token" in status:
            loader.token = f"Bearer {status['token']}"
        elif "clientCertificateData" in status:
            if "clientKeyData" not in status:
                log.error("exec: missing clientKeyData field in plugin output")
                return False
            base_path = loader._get_base_path(loader._cluster.path)
            for attr, key in (("cert_file", "clientCertificateData"), ("key_file", "clientKeyData")):
                setattr(loader, attr, FileOrData(
                    status, None, data_key_name=key, file_base_path=base_path,
                    base64_file_content=False, temp_file_path=loader._temp_file_path,
                ).as_file())  # fmt: skip
        else:
            log.error("exec: missing token or clientCertificateData field in plugin output")
            return True
        self.expiry, self.refused = expires, False
        self.generation += 1
        return True

    def unauthorized(self, generation: int) -> None:
        """The API server answered 401 to a request made with credential `generation`."""
        if generation == self.generation:
            self.refused = True

    async def refresh(self) -> None:
        """Before each request: renew the credential if it is due."""
        from kubernetes_asyncio.config.kube_config import _is_expired

        if not self.refused and (self.expiry is None or not _is_expired(self.expiry)):
            return
        if self._renewal is None or self._renewal.done():
            if time.monotonic() < self._next_run:
                return  # ran a moment ago: the old credential until the next try
            self._next_run = time.monotonic() + EXEC_MIN_INTERVAL
            self._renewal = asyncio.create_task(self._renew(), name="kubeconfig-exec-renewal")
        # Concurrent requests wait for the one run, shielded: one of them cancelled must not cancel (and
        # kill) the run the others wait for.
        await asyncio.shield(self._renewal)

    async def _renew(self) -> None:
        why = "refused by the API server" if self.refused else "expired"
        generation = self.generation
        try:
            await self.load()
        except _PluginClosed:
            return
        except Exception as e:  # the old credential stays; requests fail with 401 and are retried
            log.warning("kubeconfig exec plugin failed, keeping the %s credential: %s", why, e)
            return
        if self.generation == generation:
            return  # an answer without a credential (logged): the old one stays
        self._loader._set_config(self._configuration)  # the token or certificate files, as at load
        _strip_token(self._configuration)
        log.info("kubeconfig exec credential renewed (the last one %s)", why)

    async def _run(self) -> dict[str, Any]:
        from kubernetes_asyncio.config.config_exception import ConfigException
        from kubernetes_asyncio.config.exec_provider import ExecProvider

        if self.closed:
            raise _PluginClosed
        provider = ExecProvider(self._loader._user["exec"])  # checks the config; the command line and environment
        command = provider.args[0]
        if os.sep in command and not os.path.isabs(command):  # as client-go: relative to the user's kubeconfig file
            provider.args[0] = os.path.join(self._loader._get_base_path(self._loader._user.path), command)
        exec_config = self._loader._user["exec"]
        spec: dict[str, Any] = {  # as the library: stdout a terminal; client-go's `interactiveMode: Never` too
            "interactive": exec_config.safe_get("interactiveMode") != "Never" and sys.stdout.isatty()
        }
        if exec_config.safe_get("provideClusterInfo"):  # client-go's; the library ignores it
            spec["cluster"] = _exec_cluster(self._loader)
        info = {"apiVersion": provider.api_version, "kind": "ExecCredential", "spec": spec}
        env = {**provider.env, "KUBERNETES_EXEC_INFO": json.dumps(info)}
        what = f"{self.name} ({provider.args[0]})"
        proc: asyncio.subprocess.Process | None = None
        try:
            async with asyncio.timeout(EXEC_TIMEOUT):
                proc = await asyncio.create_subprocess_exec(
                    *provider.args, env=env, stdin=None, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE, start_new_session=True,
                )  # fmt: skip
                self._running.add(proc)
                stdout, stderr = await proc.communicate()
        except TimeoutError:
            raise ConfigException(f"{what} did not answer within {EXEC_TIMEOUT:g} s: killed") from None
        except FileNotFoundError as e:  # the command is not there: client-go shows the kubeconfig's installHint
            hint = exec_config.safe_get("installHint")
            raise ConfigException(f"{what}: {e.strerror}" + (f". {hint}" if hint else "")) from None
        finally:
            if proc is not None:
                self._running.discard(proc)
                if proc.returncode is None:  # cancelled or timed out
                    await self._reap(proc)
        assert proc is not None
        if self.closed:
            raise _PluginClosed
        if proc.returncode != 0:
            msg = f"{what}: process returned {proc.returncode}"
            if stderr.strip():
                msg += f". {stderr.decode(errors='replace').strip()}"
            raise ConfigException(msg)
        try:
            data = json.loads(stdout)
        except ValueError as e:
            raise ConfigException(f"{what}: failed to decode process output: {e}") from None
        if not isinstance(data, dict):
            raise ConfigException(f"{what}: malformed response: not an object")
        for key in ("apiVersion", "kind", "status"):
            if key not in data:
                raise ConfigException(f"{what}: malformed response. missing key '{key}'")
        if data["apiVersion"] != provider.api_version:
            raise ConfigException(
                f"{what}: plugin api version {data['apiVersion']} does not match {provider.api_version}"
            )
        status = data["status"]
        if not isinstance(status, dict):
            raise ConfigException(f"{what}: malformed response: status is not an object")
        return cast(dict[str, Any], status)

    @staticmethod
    async def _reap(proc: asyncio.subprocess.Process) -> None:
        _kill_group(proc)
        try:
            async with asyncio.timeout(EXEC_KILL_WAIT):
                await proc.wait()
        except TimeoutError:
            log.warning("kubeconfig exec plugin (pid %d) killed but not reaped after %g s", proc.pid, EXEC_KILL_WAIT)

    async def aclose(self) -> None:
        """Kill a run still going (a renewal); none is started after."""
        self.closed = True
        running, self._running = self._running, set()
        await asyncio.gather(*(self._reap(p) for p in running))


def _exec_plugin(loader: Any, configuration: Any) -> _ExecPlugin | None:
    """Have the loader run its user's exec plugin (if any) with us. Raises ImportError / AttributeError if the
    library's private parts moved."""
    user = loader._user
    if not user or loader.provider or "exec" not in user:  # gcp / oidc auth providers: kubernetes_asyncio's own
        return None
    plugin = _ExecPlugin(loader, configuration)
    loader.load_from_exec_plugin = plugin.load
    return plugin


def _kubeconfig_refresher(loader: Any) -> Callable[..., None] | None:
    """The `refresh_api_key_hook` the kubeconfig's user needs, if any (private parts of kubernetes_asyncio's loader)."""
    user = loader._user
    # gcp / oidc auth providers: kubernetes_asyncio's own business; an exec plugin's credential: _ExecPlugin's
    if not user or loader.provider or "exec" in user:
        return None
    if "tokenFile" in user and not user.safe_get("token"):
        next_read = time.monotonic() + TOKEN_FILE_PERIOD

        def reread_token_file(configuration: Any, *_: Any) -> None:
            nonlocal next_read
            if time.monotonic() < next_read:
                return
            next_read = time.monotonic() + TOKEN_FILE_PERIOD
            try:
                loader._load_user_token()
            except OSError as e:
                log.warning("kubeconfig tokenFile unreadable, keeping the last token: %s", e)
                return
            configuration.api_key["BearerToken"] = loader.token
            _strip_token(configuration)

        return reread_token_file
    return None


# client-go re-reads a CA file on a timer too (kubernetes/kubernetes#119483, fixed in 2025); kubernetes_asyncio
# builds its SSL context once.
CA_FILE_PERIOD = 60.0


class ApiTLS:
    """The SSL context for the API server, made as kubernetes_asyncio makes its own (CA, client certificate,
    verification switches) but made again when what it is made from changes: the CA file's content (when the
    server is verified against one: checked every CA_FILE_PERIOD, and before the next request after a failed
    verification) or the client certificate files the configuration names (an exec plugin's renewal names new
    ones). What cannot be used (a CA file caught half-written, a certificate that does not load) keeps the last
    good context, with a warning, until it changes again."""

    def __init__(self, configuration: Any) -> None:
        self._configuration = configuration
        self._ca_path: str | None = configuration.ssl_ca_cert if configuration.verify_ssl else None
        self._made_from = self._sources(self._read_ca())
        self.context = self._make()
        self._next_check = time.monotonic() + CA_FILE_PERIOD

    def current(self) -> ssl.SSLContext:
        ca = self._made_from[0]
        if self._ca_path is not None and time.monotonic() >= self._next_check:
            self._next_check = time.monotonic() + CA_FILE_PERIOD
            try:
                ca = self._read_ca()
            except OSError as e:
                log.warning("kubernetes API CA file %s unreadable, keeping the previous CA: %s", self._ca_path, e)
        sources = self._sources(ca)
        if sources != self._made_from:
            ca_changed = ca != self._made_from[0]
            what = f"kubernetes API CA file {self._ca_path}" if ca_changed else f"client certificate {sources[1]}"
            self._made_from = sources  # tried once: a broken one is not tried (and warned about) every request
            try:
                self.context = self._make()
            except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
                log.warning("%s unusable, keeping the previous TLS context: %s", what, e)
                return self.context
            if ca_changed:
                log.info("%s changed: new connections verify against it", what)
        return self.context

    def check_soon(self) -> None:
        """A certificate did not verify: the CA may have rotated, look at the file before the next request."""
        self._next_check = 0.0

    def _read_ca(self) -> bytes | None:
        if self._ca_path is None:
            return None
        with open(self._ca_path, "rb") as f:
            return f.read()

    def _sources(self, ca: bytes | None) -> tuple[bytes | None, str | None, str | None]:
        return ca, self._configuration.cert_file, self._configuration.key_file

    def _make(self) -> ssl.SSLContext:
        c = self._configuration
        # The CA bytes compared, not the file again (it may have changed since). PEM is ASCII; a bundle's
        # comments may not be, and cadata takes ASCII only: what is dropped is comment text.
        ca = self._made_from[0]
        context = ssl.create_default_context(cadata=None if ca is None else ca.decode("ascii", "ignore"))
        if c.cert_file:
            context.load_cert_chain(c.cert_file, keyfile=c.key_file)
        if not c.verify_ssl:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if getattr(c, "disable_strict_ssl_verification", False):
            context.verify_flags &= ~ssl.VERIFY_X509_STRICT
        return context


class _SessionWithCurrentTLS:
    """Stands in for kubernetes_asyncio's aiohttp session (`rest_client.pool_manager`): every request
    carries the current SSL context. aiohttp pools connections per context, so a new one makes new
    connections (a new CA, a new client certificate) while the open ones keep going."""

    def __init__(self, session: aiohttp.ClientSession, tls: ApiTLS) -> None:
        self._session = session
        self._tls = tls

    def request(self, *args: Any, **kwargs: Any) -> Any:
        return self._session.request(*args, ssl=self._tls.current(), **kwargs)

    async def close(self) -> None:
        await self._session.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def _api_tls(api: ApiClient, configuration: Any) -> ApiTLS | None:
    """Make `api`'s requests use an ApiTLS context (HTTPS only)."""
    if not str(configuration.host).startswith("https"):
        return None
    try:
        rest = api.rest_client
        session = rest.pool_manager
    except AttributeError as e:  # kubernetes_asyncio changed
        log.warning("kubernetes API CA file and client certificate will not be re-read (kubernetes_asyncio "
                    "changed): %s", e)  # fmt: skip
        return None
    tls = ApiTLS(configuration)
    rest.pool_manager = cast(aiohttp.ClientSession, _SessionWithCurrentTLS(session, tls))  # request, close
    return tls


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    """Where the config pointed us (for logs and errors)."""

    host: str
    source: str  # "in-cluster" or the kubeconfig path(s)


class KubeClient:
    """JSON requests and watch streams against one API server."""

    def __init__(
        self, api: ApiClient, info: ClusterInfo, tls: ApiTLS | None = None, exec_plugin: _ExecPlugin | None = None
    ) -> None:
        self._api = api
        self.info = info
        self._tls = tls
        self._exec_plugin = exec_plugin

    @classmethod
    async def connect(cls, kubeconfig: str | None = None) -> KubeClient:
        """Load credentials (see module docstring). A missing or broken config is a ConfigError."""
        # Imported here: the package loads every generated model (~1 s), which file mode never needs.
        from kubernetes_asyncio import client as k8s_client
        from kubernetes_asyncio import config as k8s_config
        from kubernetes_asyncio.config.config_exception import ConfigException
        from kubernetes_asyncio.config.kube_config import KubeConfigLoader, KubeConfigMerger

        configuration = k8s_client.Configuration()
        exec_plugin: _ExecPlugin | None = None
        try:
            if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
                k8s_config.load_incluster_config(client_configuration=configuration)
                source = "in-cluster"
            else:
                path = kubeconfig_path(kubeconfig)
                _check_kubeconfig_files(path)
                # What load_kube_config(path, persist_config=False) does, with the exec plugin run by us.
                loader = KubeConfigLoader(config_dict=KubeConfigMerger(path).config, config_base_path=None)
                try:
                    exec_plugin = _exec_plugin(loader, configuration)
                except (ImportError, AttributeError) as e:
                    log.warning("kubeconfig exec plugin run by kubernetes_asyncio (it changed): %s", e)
                await loader.load_and_set(configuration)
                try:
                    configuration.refresh_api_key_hook = _kubeconfig_refresher(loader)
                except (ImportError, AttributeError) as e:  # private parts of the library moved: load as before
                    log.warning("kubeconfig credentials will not be refreshed (kubernetes_asyncio changed): %s", e)
                _strip_token(configuration)
                source = path
        except ConfigException as e:
            raise ConfigError(f"Kubernetes client configuration: {e}") from None
        except OSError as e:
            raise ConfigError(f"Kubernetes client configuration: {e}") from None
        try:
            api = k8s_client.ApiClient(configuration)  # reads the CA and client certificate files
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            files = ", ".join(
                f"{what} {path}"
                for what, path in (("certificate authority", configuration.ssl_ca_cert),
                                   ("client certificate", configuration.cert_file))
                if path
            )  # fmt: skip
            raise ConfigError(f"Kubernetes client configuration ({source}): {files or 'TLS'}: {e}") from None
        try:
            tls = _api_tls(api, configuration)
        except (OSError, ValueError) as e:  # the file changed since ApiClient read it: as above
            await api.close()
            raise ConfigError(
                f"Kubernetes client configuration ({source}): certificate authority {configuration.ssl_ca_cert}: {e}"
            ) from None
        return cls(api, ClusterInfo(host=str(configuration.host), source=source), tls, exec_plugin)

    async def aclose(self) -> None:
        if self._exec_plugin is not None:
            await self._exec_plugin.aclose()  # a renewal still running
        await self._api.close()

    # -- requests ----------------------------------------------------------------------
    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        body: Any = None,
        request_timeout: aiohttp.ClientTimeout | float = REQUEST_TIMEOUT,
    ) -> aiohttp.ClientResponse:
        """Send one request; the response is returned unread (2xx) or raised as KubeError."""
        exec_plugin = self._exec_plugin
        if exec_plugin is not None:
            await exec_plugin.refresh()
            credential = exec_plugin.generation
        try:
            response: aiohttp.ClientResponse = await self._api.call_api(
                path,
                method,
                query_params=[(k, str(v)) for k, v in (params or {}).items()],
                header_params={"Accept": _JSON, "Content-Type": _JSON},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=request_timeout,
            )
        except aiohttp.ClientConnectorCertificateError:
            if self._tls is not None:
                self._tls.check_soon()
            raise
        if response.status == 401 and exec_plugin is not None:
            exec_plugin.unauthorized(credential)  # revoked before its expiry, or one that never expires
        if not 200 <= response.status < 300:
            try:
                data = await response.read()
            finally:
                response.release()
            raise KubeError.from_status(response.status, data)
        return response

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        body: Any = None,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> bytes:
        """One unary call; the raw JSON body of the 2xx answer."""
        response = await self._send(method, path, params=params, body=body, request_timeout=request_timeout)
        try:
            return await response.read()
        finally:
            response.release()

    async def get(self, path: str, params: Mapping[str, str | int] | None = None) -> bytes:
        return await self.request("GET", path, params=params)

    async def stream_lines(
        self,
        path: str,
        params: Mapping[str, str | int],
        *,
        read_timeout: float,
        opened: Callable[[], None] | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """A watch: one JSON event per line until the server closes the stream.

        `read_timeout` bounds the silence between lines, so a half-dead connection (a node
        that vanished, a NAT that forgot us) ends the stream instead of hanging forever.
        `opened` is called once the server has accepted the watch (a 2xx answer).
        """
        timeout = aiohttp.ClientTimeout(total=None, connect=REQUEST_TIMEOUT, sock_read=read_timeout)
        response = await self._send("GET", path, params={**params, "watch": "true"}, request_timeout=timeout)
        try:
            if opened is not None:
                opened()
            while True:
                line = await response.content.readline()
                if not line:
                    return
                if line.strip():
                    yield line
        finally:
            # close, not release: a stream we stop reading must not go back to the pool.
            response.close()
