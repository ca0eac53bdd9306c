"""TLS on the ext_proc port: the serving certificate, its errors, both transports, reload, the flags."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from helpers import FILE_CONFIG, write_cert_pair

from llmepp.cli import settings_from_args
from llmepp.framework.plugin import ConfigError
from llmepp.server.tls import KEY_FILE, ServingCert, self_signed_pem
from llmepp.settings import Settings
from llmepp.testing.stack import serves_tls

from .client import TRANSPORT, serve, set_headers

BODY = b'{"model": "m", "prompt": "hello", "max_tokens": 5}'


async def _served_certificate(port: int) -> bytes:
    """The DER certificate a TLS handshake on `port` presents (ALPN h2, as Envoy offers)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        return bytes(der)
    finally:
        writer.close()


def _der(pem: bytes) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


# -- the certificate -----------------------------------------------------------------------------
def test_self_signed_certificate_is_made_and_removed_on_close() -> None:
    cert = ServingCert.from_settings(Settings())
    assert cert.self_signed and cert.cert_file.exists() and oct(cert.key_file.stat().st_mode)[-3:] == "600"
    parsed = x509.load_pem_x509_certificate(cert.cert_pem)
    names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    cert.ssl_context()  # OpenSSL accepts the pair
    cert.close()
    assert not cert.cert_file.exists()


def test_cert_path_pair_is_served(tmp_path: Path) -> None:
    pem = write_cert_pair(tmp_path)
    cert = ServingCert.from_settings(Settings(cert_path=str(tmp_path)))
    assert not cert.self_signed and cert.cert_pem == pem


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (Settings(cert_path="/nonexistent/certs"), "--cert-path: cannot read /nonexistent/certs/tls.crt"),
        (Settings(tls_min_version="VersionTLS10"), "--tls-min-version: 'VersionTLS10'"),
        (Settings(tls_cipher_suites=("TLS_RSA_WITH_RC4_128_SHA",)), "--tls-cipher-suites: unknown or insecure"),
        (Settings(extproc_transport="grpc", tls_min_version="VersionTLS13"), "grpc.aio fixes its TLS versions"),
        (Settings(enable_cert_reload=True), "--enable-cert-reload needs --cert-path"),
    ],
)
def test_bad_tls_settings_are_start_up_errors_naming_the_flag(settings: Settings, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        ServingCert.from_settings(settings)


def test_a_key_that_does_not_match_the_certificate_is_refused(tmp_path: Path) -> None:
    write_cert_pair(tmp_path)
    _, other_key = self_signed_pem(("localhost",))
    (tmp_path / KEY_FILE).write_bytes(other_key)
    with pytest.raises(ConfigError, match="not a usable certificate and private key"):
        ServingCert.from_settings(Settings(cert_path=str(tmp_path)))


def test_tls_13_only_and_go_cipher_names_configure_the_context() -> None:
    cert = ServingCert.from_settings(
        Settings(tls_min_version="VersionTLS13", tls_cipher_suites=("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
                                                                    "TLS_AES_128_GCM_SHA256"))
    )  # fmt: skip
    ctx = cert.ssl_context()
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    tls12 = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 == {"ECDHE-ECDSA-AES128-GCM-SHA256"}
    cert.close()


# -- the flags ------------------------------------------------------------------------------------
def test_secure_serving_flag_follows_go_bool_syntax() -> None:
    assert settings_from_args([]).secure_serving is True
    assert settings_from_args(["--secure-serving"]).secure_serving is True
    assert settings_from_args(["--secure-serving=false"]).secure_serving is False
    assert settings_from_args(["--secure-serving", "0"]).secure_serving is False
    s = settings_from_args(["--cert-path", "/certs", "--enable-cert-reload", "--tls-cipher-suites", "A, B"])
    assert (s.cert_path, s.enable_cert_reload, s.tls_cipher_suites) == ("/certs", True, ("A", "B"))
    with pytest.raises(SystemExit):
        settings_from_args(["--secure-serving=maybe"])
    assert serves_tls([]) and serves_tls(["--secure-serving=true"])
    assert not serves_tls(["--secure-serving=false"]) and not serves_tls(["--secure-serving", "f"])


# -- both transports over TLS ----------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["h2", "grpc"])
async def test_ext_proc_over_tls_routes_a_request(transport: str) -> None:
    token = TRANSPORT.set(transport)
    cert = ServingCert.from_settings(Settings(extproc_transport=transport))
    try:
        async with serve(tls=cert) as h:
            answers = await h.open().route(BODY)
            assert set_headers(answers[0].request_headers.response)["x-gateway-destination-endpoint"]
            assert await _served_certificate(h.port) == _der(cert.cert_pem)
    finally:
        TRANSPORT.reset(token)
        cert.close()


@pytest.mark.parametrize("transport", ["h2", "grpc"])
async def test_rotated_certificate_is_served_to_new_connections(transport: str, tmp_path: Path) -> None:
    first = write_cert_pair(tmp_path)
    token = TRANSPORT.set(transport)
    cert = ServingCert.from_settings(Settings(cert_path=str(tmp_path), enable_cert_reload=True,
                                              extproc_transport=transport))  # fmt: skip
    watcher = asyncio.create_task(cert.watch(interval=0.05))
    try:
        async with serve(tls=cert) as h:
            assert await _served_certificate(h.port) == _der(first)
            await asyncio.sleep(0.05)  # a later mtime
            second = write_cert_pair(tmp_path)
            for _ in range(100):
                if cert.generation:
                    break
                await asyncio.sleep(0.05)
            assert cert.generation == 1
            assert await _served_certificate(h.port) == _der(second)
            (tmp_path / KEY_FILE).write_text("not a key")  # a broken rotation keeps the last good pair
            await asyncio.sleep(0.3)
            assert cert.generation == 1 and await _served_certificate(h.port) == _der(second)
    finally:
        watcher.cancel()
        TRANSPORT.reset(token)


async def test_files_that_change_again_while_being_loaded_never_leave_a_context_without_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-atomic writer: the new pair passes the check, then the key is rewritten (half-written) before the
    pair is installed. OpenSSL drops the key of a context whose load fails midway: new handshakes must still
    get a whole pair (the last good one or the new one), never a context that cannot handshake."""
    first = write_cert_pair(tmp_path)
    cert = ServingCert.from_settings(Settings(cert_path=str(tmp_path), enable_cert_reload=True))
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=cert.ssl_context())
    port = server.sockets[0].getsockname()[1]
    read = cert._read

    def read_then_the_writer_strikes() -> tuple[object, ...]:
        checked = read()
        (tmp_path / KEY_FILE).write_text("-----BEGIN PRIVATE KEY-----\nhalf-writ")
        return checked

    monkeypatch.setattr(cert, "_read", read_then_the_writer_strikes)
    watcher = asyncio.create_task(cert.watch(interval=0.02))
    try:
        await asyncio.sleep(0.05)  # a later mtime
        second = write_cert_pair(tmp_path)
        await asyncio.sleep(0.2)
        assert await _served_certificate(port) in (_der(first), _der(second))
    finally:
        watcher.cancel()
        server.close()
        cert.close()


def test_the_app_makes_its_certificate_at_construction_and_says_when_cert_flags_are_ignored(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    from llmepp.app import App

    with pytest.raises(ConfigError, match="--cert-path: cannot read"):
        App(Settings(config_text=FILE_CONFIG, cert_path=str(tmp_path)))  # empty directory: a start-up error
    plain = App(Settings(config_text=FILE_CONFIG, secure_serving=False, cert_path=str(tmp_path)))
    assert plain.serving_cert is None
    assert "--cert-path / --enable-cert-reload ignored" in caplog.text
    served = App(Settings(config_text=FILE_CONFIG))
    assert served.serving_cert is not None and served.serving_cert.self_signed
    served.serving_cert.close()


async def test_a_broken_rotation_is_logged_once_not_every_check(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Secret left broken (key of another pair, half-written key): the last good pair keeps being served and
    the operator is told once per breakage (and counted), not every RELOAD_INTERVAL for as long as it lasts."""
    from llmepp.server.tls import CERT_FILE

    first = write_cert_pair(tmp_path)
    cert = ServingCert.from_settings(Settings(cert_path=str(tmp_path), enable_cert_reload=True))
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=cert.ssl_context())
    port = server.sockets[0].getsockname()[1]
    watcher = asyncio.create_task(cert.watch(interval=0.01))
    try:
        await asyncio.sleep(0.02)  # a later mtime
        other = tmp_path / "other"
        write_cert_pair(other)
        (tmp_path / KEY_FILE).write_bytes((other / KEY_FILE).read_bytes())  # a key that does not match
        await asyncio.sleep(0.3)  # ~30 checks
        warnings = [r for r in caplog.records if "not reloaded" in r.getMessage()]
        assert len(warnings) == 1 and cert.reload_failures == 1, [r.getMessage() for r in warnings]
        assert cert.generation == 0 and await _served_certificate(port) == _der(first)
        second = write_cert_pair(tmp_path)  # fixed: reloaded, and a later breakage is told again
        for _ in range(100):
            if cert.generation:
                break
            await asyncio.sleep(0.01)
        assert cert.generation == 1 and await _served_certificate(port) == _der(second)
        await asyncio.sleep(0.02)
        (tmp_path / CERT_FILE).write_text("-----BEGIN CERTIFICATE-----\nhalf-wr")
        await asyncio.sleep(0.3)
        warnings = [r for r in caplog.records if "not reloaded" in r.getMessage()]
        assert len(warnings) == 2 and cert.reload_failures == 2
        assert await _served_certificate(port) == _der(second)
    finally:
        watcher.cancel()
        server.close()
        cert.close()


def _dated_pair(directory: Path, days_from_now: tuple[float, float]) -> None:
    import datetime

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from llmepp.server.tls import CERT_FILE

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=days_from_now[0]))
        .not_valid_after(now + datetime.timedelta(days=days_from_now[1]))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CERT_FILE).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / KEY_FILE).write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


@pytest.mark.parametrize(("days", "says"), [((-30, -1), "expired"), ((2, 30), "not valid before")])
def test_an_expired_or_not_yet_valid_certificate_is_said_at_start_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, days: tuple[float, float], says: str
) -> None:
    """The reference (Go's LoadX509KeyPair) serves such a pair, and gateways that do not verify accept it, so
    not a start-up error; but a gateway that verifies will fail every handshake: the log says why, naming it."""
    _dated_pair(tmp_path, days)
    cert = ServingCert.from_settings(Settings(cert_path=str(tmp_path)))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(says in m and str(cert.cert_file) in m for m in warnings), warnings
    caplog.clear()
    write_cert_pair(tmp_path)
    ServingCert.from_settings(Settings(cert_path=str(tmp_path)))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
