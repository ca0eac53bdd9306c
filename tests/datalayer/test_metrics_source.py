"""metrics-data-source parameters: durations, interval rounding, targets, validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmepp.datalayer.endpoint import EndpointSpec
from llmepp.framework.plugin import ConfigError, PluginRegistry
from llmepp.plugins.datasources import PLUGINS
from llmepp.plugins.datasources.metrics_source import MetricsDataSource
from llmepp.units import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("50ms", 0.05), ("1s", 1.0), ("1.5s", 1.5), ("1m30s", 90.0), ("250us", 0.00025), ("2h", 7200.0), (".5s", 0.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "1x", "s", "1s2", "-1s", "1 s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def build(params: dict[str, object]) -> MetricsDataSource:
    reg = PluginRegistry()
    reg._loaded_entry_points = True  # only the classes under test
    for cls in PLUGINS:
        reg.register(cls)
    plugin = reg.build("metrics-data-source", "src", params)
    assert isinstance(plugin, MetricsDataSource)
    return plugin


@pytest.mark.parametrize(("interval", "ticks"), [(None, 1), ("10ms", 1), ("50ms", 1), ("120ms", 2), ("1s", 20)])
def test_interval_rounds_to_base_ticks(interval: str | None, ticks: int) -> None:
    params: dict[str, object] = {} if interval is None else {"interval": interval}
    assert build(params).ticks_per_poll(0.05) == ticks


def test_target_port_precedence() -> None:
    spec = EndpointSpec(name="e", address="10.0.0.1", port=8000)
    assert build({}).target_for(spec).url == "http://10.0.0.1:8000/metrics"
    with_metrics_port = EndpointSpec(name="e", address="10.0.0.1", port=8000, metrics_port=9100)
    assert build({"path": "/m"}).target_for(with_metrics_port).url == "http://10.0.0.1:9100/m"
    assert build({"port": 9200}).target_for(with_metrics_port).url == "http://10.0.0.1:9200/metrics"
    target = build({}).target_for(spec)
    assert target.request.startswith(b"GET /metrics HTTP/1.1\r\nHost: 10.0.0.1:8000\r\n")
    assert target.request.endswith(b"\r\n\r\n")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"scheme": "ftp"}, "scheme: must be http or https"),
        ({"path": "metrics"}, "path: must be an absolute URL path"),
        ({"path": "/a b"}, "path: must be an absolute URL path"),
        ({"port": 0}, "port"),
        ({"interval": "0s"}, "interval: must be positive"),
        ({"interval": "fast"}, "interval: invalid duration"),
        ({"scheme": "https", "clientCertPath": "/x.pem"}, "must be set together"),
        ({"scheme": "https", "caCertPath": "/nonexistent/ca.pem"}, "caCertPath: cannot load '/nonexistent/ca.pem'"),
        (
            {"scheme": "https", "clientCertPath": "/nonexistent/c.pem", "clientKeyPath": "/nonexistent/k.pem"},
            "clientCertPath / clientKeyPath: cannot load '/nonexistent/c.pem'",
        ),
        ({"insecureSkipVerify": "yes"}, "insecureSkipVerify"),
        ({"timeout": "1s"}, "timeout"),
    ],
)
def test_parameter_errors(params: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(params)


def test_a_ca_file_that_is_no_pem_names_the_field_and_the_file(tmp_path: Path) -> None:
    """Before: "parameters: TLS files: [X509: NO_CERTIFICATE_OR_CRL_FOUND] ...", naming neither."""
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=rf"caCertPath: cannot load '{bad}' \(PEM CA certificates\)"):
        build({"scheme": "https", "caCertPath": str(bad)})


def test_tls_files_with_scheme_http_are_named_in_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """A forgotten `scheme: https` scraped in plain text without a word; the files are still not loaded."""
    with caplog.at_level("WARNING"):
        src = build({"caCertPath": "/nonexistent/ca.pem", "clientKeyPath": "/nonexistent/k.pem"})
    assert src.ssl_context is None
    assert "parameters.caCertPath / clientKeyPath ignored: scheme is http" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        build({})
    assert caplog.text == ""


def test_tls_files_load(tmp_path: Path) -> None:
    from .fakes import TEST_CERT, TEST_KEY

    (tmp_path / "c.pem").write_text(TEST_CERT)
    (tmp_path / "k.pem").write_text(TEST_KEY)
    src = build(
        {
            "scheme": "https",
            "insecureSkipVerify": False,
            "caCertPath": str(tmp_path / "c.pem"),
            "clientCertPath": str(tmp_path / "c.pem"),
            "clientKeyPath": str(tmp_path / "k.pem"),
        }
    )
    assert src.ssl_context is not None
    assert src.target_for(EndpointSpec(name="e", address="10.0.0.1", port=1)).url.startswith("https://")
