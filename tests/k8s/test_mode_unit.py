"""Which discovery mode the flags and config select, and how bad combinations are reported."""

from __future__ import annotations

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


def test_lease_name_and_client_go_defaults() -> None:
    assert lease_name("ns", "llama") == "epp-ns-llama.llm-d.ai"
    cfg = LeaseConfig(name="n", namespace="ns", identity="me")
    assert (cfg.lease_duration, cfg.renew_deadline, cfg.retry_period) == (15.0, 10.0, 2.0)
    s = Settings()
    assert (s.ha_lease_duration, s.ha_renew_deadline, s.ha_retry_period) == (15.0, 10.0, 2.0)
