"""Which discovery mode the flags and config select, and how bad combinations are reported."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from helpers import FILE_CONFIG

from llmepp.app import App
from llmepp.cli import settings_from_args
from llmepp.framework.plugin import ConfigError
from llmepp.k8s.leader import LeaseConfig, lease_name
from llmepp.settings import Settings


def test_cli_flags_reach_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NAMESPACE", "from-env")
    s = settings_from_args([])
    assert (s.pool_name, s.pool_name_set, s.pool_namespace) == ("epp", False, "from-env")
    s = settings_from_args([
        "--pool-name", "llama", "--pool-group", "inference.networking.x-k8s.io", "--kubeconfig", "/k",
        "--ha-enable-leader-election", "--ha-lease-duration", "30s", "--ha-renew-deadline", "20s",
        "--ha-retry-period", "500ms",
    ])  # fmt: skip
    assert (s.pool_name, s.pool_name_set, s.pool_group, s.kubeconfig) == (
        "llama", True, "inference.networking.x-k8s.io", "/k"
    )  # fmt: skip
    assert (s.ha_enable_leader_election, s.ha_lease_duration, s.ha_renew_deadline, s.ha_retry_period) == (
        True, 30.0, 20.0, 0.5
    )  # fmt: skip
    s = settings_from_args(["--endpoint-selector", "app=v", "--endpoint-target-ports", "8000,8001"])
    assert (s.endpoint_selector, s.endpoint_target_ports) == ("app=v", (8000, 8001))
    with pytest.raises(SystemExit):
        settings_from_args(["--endpoint-target-ports", "8000,http"])


def test_mode_selection() -> None:
    # Config discovery wins (file mode), whatever the flags say.
    app = App(Settings(config_text=FILE_CONFIG, pool_name="llama", pool_name_set=True))
    assert app.kube is None and app.components.discovery is not None
    # No discovery anywhere: the existing error, now naming the Kubernetes flags too.
    with pytest.raises(ConfigError, match="--pool-name or --endpoint-selector"):
        App(Settings())
    pool = App(Settings(pool_name="llama", pool_name_set=True))
    assert pool.kube is not None and pool.kube.target.pool_mode and pool.director.rewriter is not None
    selector = App(Settings(endpoint_selector="app=v", endpoint_target_ports=(8000,)))
    assert selector.kube is not None and not selector.kube.target.pool_mode and selector.director.rewriter is None


def test_a_selector_that_file_mode_ignores_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="llmepp.app"):
        App(Settings(config_text=FILE_CONFIG, pool_name="llama", pool_name_set=True))
    assert "--endpoint-selector" not in caplog.text  # --pool-name labels file mode's pool: not ignored
    with caplog.at_level("WARNING", logger="llmepp.app"):
        app = App(Settings(config_text=FILE_CONFIG, endpoint_selector="app=v", endpoint_target_ports=(8000,)))
    assert app.kube is None
    assert "--endpoint-selector 'app=v' (and --endpoint-target-ports) ignored: dataLayer.discovery" in caplog.text


@pytest.mark.parametrize(
    "argv",
    [
        ["--kubecon", "/k"],  # a prefix of --kubeconfig only: Go's flags take none
        ["--grpc-port", "\u0669"],  # Arabic-Indic nine: int() reads it
        ["--endpoint-target-ports", "8000,8_001"],  # the reference reads the list base 10: no '_'
        # Stricter than the reference: Go's flag.Int reads Go integer literals ('+9002', '9_002', '0x232a',
        # '010' = 8); a port here is plain decimal digits.
        ["--grpc-port", "9_002"],
        ["--grpc-port", "+9002"],
        ["--grpc-port", "0x232a"],
    ],
)
def test_abbreviations_and_non_decimal_ports_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        settings_from_args(argv)
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (Settings(pool_name="a", pool_name_set=True, endpoint_selector="app=v", endpoint_target_ports=(1,)),
         "exactly one of --pool-name and --endpoint-selector"),
        (Settings(endpoint_selector="app=v"), "--endpoint-target-ports"),
        (Settings(endpoint_selector="app=v", endpoint_target_ports=tuple(range(8000, 8009))),
         "--endpoint-target-ports"),
        (Settings(endpoint_selector="app=v", endpoint_target_ports=(8000, 8001, 8000)),
         "--endpoint-target-ports: 8000 is listed twice"),
        (Settings(pool_name="a", pool_name_set=True, ha_enable_leader_election=True, ha_renew_deadline=20.0),
         "retry period < renew deadline < lease duration"),
        (Settings(pool_name="Llama", pool_name_set=True),
         r"^--pool-name 'Llama': must be a lowercase RFC 1123 subdomain"),
        (Settings(pool_name="a" * 254, pool_name_set=True), r"^--pool-name 'a+': must be no more than 253 characters"),
        (Settings(pool_name="a", pool_name_set=True, pool_namespace="my.ns"),
         r"^--pool-namespace \(or \$NAMESPACE\) 'my.ns': must be a lowercase RFC 1123 label"),
        (Settings(endpoint_selector="app=v", endpoint_target_ports=(8000,), pool_namespace="-ns"),
         r"^--pool-namespace \(or \$NAMESPACE\) '-ns': must be a lowercase RFC 1123 label"),
        (Settings(endpoint_selector="app=v", endpoint_target_ports=(8000,), pool_namespace="n" * 64),
         r"must be no more than 63 characters"),
    ],
)  # fmt: skip
def test_bad_kubernetes_flags_are_config_errors(settings: Settings, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        App(settings)


def test_objectives_file_conflicts_with_the_pool_objectives(tmp_path: Path) -> None:
    path = tmp_path / "objectives.yaml"
    path.write_text(
        "apiVersion: llm-d.ai/v1alpha2\nkind: InferenceObjective\nmetadata: {name: a}\nspec: {priority: 1}\n"
    )
    with pytest.raises(ConfigError, match="objectives come from InferenceObjective resources"):
        App(Settings(pool_name="a", pool_name_set=True, objectives_file=str(path)))
    # Standalone selector mode has no CRDs: the file is how it gets priorities.
    app = App(Settings(endpoint_selector="app=v", endpoint_target_ports=(8000,), objectives_file=str(path)))
    assert app.kube is not None and app.kube.objectives.get("a") == 1


async def test_missing_kubeconfig_is_a_config_error(tmp_path: Path) -> None:
    app = App(Settings(pool_name="a", pool_name_set=True, kubeconfig=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="--kubeconfig"):
        await app.start()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", r"kubeconfig .*kc: is empty, not a kubeconfig"),
        ("- a\n", r"kubeconfig .*kc: is a list, not a kubeconfig"),
        ("junk: [\n", r"kubeconfig .*kc: not valid YAML: "),
    ],
)
async def test_a_file_that_is_no_kubeconfig_is_a_config_error(tmp_path: Path, content: str, expected: str) -> None:
    """Was a traceback from the client library (a TypeError, or the YAML parser's error)."""
    path = tmp_path / "kc"
    path.write_text(content)
    app = App(Settings(pool_name="a", pool_name_set=True, kubeconfig=str(path)))
    with pytest.raises(ConfigError, match=expected):
        await app.start()
    await app.shutdown()


@pytest.mark.parametrize("env", ["KUBECONFIG", "HOME"])
async def test_no_kubeconfig_to_read_is_a_config_error_naming_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: str
) -> None:
    """Was "Invalid kube-config file. Expected key current-context", from the library's empty config."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv(env, str(tmp_path / "nope"))
    expected = (
        r"\$KUBECONFIG: .*nope: no such file"
        if env == "KUBECONFIG"
        else r"no Kubernetes credentials: .*nope/\.kube/config"
    )
    app = App(Settings(pool_name="a", pool_name_set=True))
    with pytest.raises(ConfigError, match=expected):
        await app.start()
    await app.shutdown()


def test_lease_name_and_client_go_defaults() -> None:
    assert lease_name("ns", "llama") == "epp-ns-llama.llm-d.ai"
    cfg = LeaseConfig(name="n", namespace="ns", identity="me")
    assert (cfg.lease_duration, cfg.renew_deadline, cfg.retry_period) == (15.0, 10.0, 2.0)
    s = Settings()
    assert (s.ha_lease_duration, s.ha_renew_deadline, s.ha_retry_period) == (15.0, 10.0, 2.0)


def test_leader_election_in_file_discovery_mode_is_a_config_error() -> None:
    # Was ignored: no Lease to hold in file mode, so every replica reported ready (not active-passive).
    with pytest.raises(ConfigError) as refused:
        App(Settings(config_text=FILE_CONFIG, ha_enable_leader_election=True))
    message = str(refused.value)
    assert message.startswith("--ha-enable-leader-election:")
    assert "Kubernetes mode" in message and "every replica would report ready" in message


@pytest.mark.parametrize(
    ("ha", "message"),
    [
        ({"ha_retry_period": 0.0}, "--ha-retry-period: must be > 0, got 0s"),
        ({"ha_renew_deadline": 20.0}, "--ha-renew-deadline: 20s must be shorter than --ha-lease-duration (15s)"),
        ({"ha_renew_deadline": 15.0}, "--ha-renew-deadline: 15s must be shorter than --ha-lease-duration (15s)"),
        ({"ha_lease_duration": 1.0, "ha_renew_deadline": 0.5, "ha_retry_period": 0.5},
         "--ha-retry-period: 0.5s must be shorter than --ha-renew-deadline (0.5s)"),
    ],
)  # fmt: skip
def test_bad_lease_timings_name_the_exact_flag(ha: dict[str, float], message: str) -> None:
    # Was "--ha-*: leader election needs ...": which of the three flags to change was left to guess.
    with pytest.raises(ConfigError) as refused:
        App(Settings(pool_name="a", pool_name_set=True, ha_enable_leader_election=True, **ha))  # type: ignore[arg-type]
    assert str(refused.value).startswith(message), refused.value
    assert "--ha-*" not in str(refused.value)


async def test_aclose_closes_the_client_when_the_lease_release_fails() -> None:
    # A failing release (not one of the API errors the elector logs itself) left the informer tasks running and
    # the client open; and a release retried by aclose after a failed one was logged twice.
    from llmepp.datalayer.datastore import Datastore
    from llmepp.flowcontrol.objectives import ObjectiveStore
    from llmepp.k8s.discovery import DiscoveryTarget
    from llmepp.k8s.runtime import KubeOptions, KubeRuntime

    class BrokenElector:
        is_leader = True
        releases = 0

        async def release(self) -> None:
            self.releases += 1
            raise RuntimeError("lease release broke")

    class Client:
        closed = False

        async def aclose(self) -> None:
            self.closed = True

    target = DiscoveryTarget(namespace="ns", pool_name="p", pool_group="g", selector=None, target_ports=())
    kube = KubeRuntime(target, KubeOptions(), Datastore("p", "ns"), ObjectiveStore())
    elector, client = BrokenElector(), Client()
    kube.elector, kube.client = elector, client  # type: ignore[assignment]
    task = kube._spawn(asyncio.sleep(3600), "k8s-informer")
    with pytest.raises(RuntimeError, match="lease release broke"):
        await kube.aclose()
    assert client.closed and kube.client is None and task.cancelled()
    await kube.aclose()  # nothing left to close; the failed release is not tried again
    assert elector.releases == 1


async def test_finished_tasks_are_not_kept() -> None:
    # Each leadership change (haPopulateNonLeaderDatastore=false) spawns reconcilers and a forget task; the
    # runtime kept every finished one until shutdown, so a replica whose lease flapped grew without bound.
    from llmepp.datalayer.datastore import Datastore
    from llmepp.flowcontrol.objectives import ObjectiveStore
    from llmepp.k8s.discovery import DiscoveryTarget
    from llmepp.k8s.runtime import KubeOptions, KubeRuntime

    target = DiscoveryTarget(namespace="ns", pool_name="p", pool_group="g", selector=None, target_ports=())
    kube = KubeRuntime(target, KubeOptions(), Datastore("p", "ns"), ObjectiveStore())
    done = [kube._spawn(asyncio.sleep(0), f"k8s-forget-{i}") for i in range(3)]
    running = kube._spawn(asyncio.sleep(3600), "k8s-discovery")
    await asyncio.gather(*done)
    assert set(kube._tasks) == {running}
    await kube.aclose()
    assert running.cancelled()
