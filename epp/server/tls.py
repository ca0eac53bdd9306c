"""TLS on the ext_proc port (`--secure-serving`, on by default as in the reference EPP).

The certificate is `tls.crt` + `tls.key` from `--cert-path` (a mounted Secret), or, without one, a
self-signed certificate made at start-up: the gateways in front of an EPP (Istio, kgateway, GKE, the
Envoy configs in deploy/) encrypt but do not verify it, as they do for the reference's. With
`--enable-cert-reload` the files are re-read when they change (a rotated Secret): new connections get
the new certificate, open ones keep theirs. The health port stays plaintext (Kubernetes gRPC probes
speak no TLS).

`--tls-min-version` (VersionTLS12 | VersionTLS13) and `--tls-cipher-suites` (Go's names, as the reference
takes them; TLS 1.2 suites only, as in Go, where TLS 1.3 suites are not configurable) apply to the h2
transport; grpc.aio fixes its own (TLS 1.2+, gRPC's cipher list), so a non-default value with
`--extproc-transport grpc` is a start-up error rather than silently ignored.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import shutil
import socket
import ssl
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from llmepp.framework.plugin import ConfigError
from llmepp.settings import Settings

log = logging.getLogger(__name__)

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
RELOAD_INTERVAL = 5.0  # s between checks of the certificate files (--enable-cert-reload)
SELF_SIGNED_DAYS = 3650

TLS_VERSIONS = {"VersionTLS12": ssl.TLSVersion.TLSv1_2, "VersionTLS13": ssl.TLSVersion.TLSv1_3}
# Go's cipher suite names → OpenSSL's: the TLS 1.2 suites Go lists as secure (crypto/tls.CipherSuites).
CIPHER_SUITES = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
}
CIPHER_SUITES["TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305"] = CIPHER_SUITES["TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"]
CIPHER_SUITES["TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305"] = CIPHER_SUITES["TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"]
TLS13_SUITES = frozenset({"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"})


@dataclass
class ServingCert:
    """The ext_proc port's certificate and the TLS settings both transports build from."""

    cert_file: Path
    key_file: Path
    self_signed: bool
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    openssl_ciphers: str = ""
    reload: bool = False
    generation: int = 0  # bumped on every reload
    reload_failures: int = 0  # breakages seen by the reload (each logged once, however long it lasts)
    _last_error: str | None = None
    _pem: tuple[bytes, bytes] = (b"", b"")
    _stamp: tuple[float, float] = (0.0, 0.0)
    _current: ssl.SSLContext | None = None  # built from the last reloaded pair; new handshakes switch to it
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _tmpdir: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ServingCert:
        """The serving certificate `settings` ask for; ConfigError naming the flag on bad input."""
        min_version = TLS_VERSIONS.get(settings.tls_min_version)
        if min_version is None:
            known = ", ".join(TLS_VERSIONS)
            raise ConfigError(f"--tls-min-version: {settings.tls_min_version!r} is not one of {known}")
        ciphers = _openssl_ciphers(settings.tls_cipher_suites)
        if settings.extproc_transport == "grpc" and (min_version != ssl.TLSVersion.TLSv1_2 or ciphers):
            raise ConfigError("--tls-min-version / --tls-cipher-suites: grpc.aio fixes its TLS versions and cipher "
                              "suites; use --extproc-transport h2 (the default) to set them")  # fmt: skip
        if settings.cert_path:
            base = Path(settings.cert_path)
            cert = cls(base / CERT_FILE, base / KEY_FILE, False, min_version, ciphers, settings.enable_cert_reload)
        else:
            if settings.enable_cert_reload:
                raise ConfigError("--enable-cert-reload needs --cert-path (a self-signed certificate never changes)")
            tmpdir = tempfile.mkdtemp(prefix="epp-tls-")
            cert_pem, key_pem = self_signed_pem()
            base = Path(tmpdir)
            (base / CERT_FILE).write_bytes(cert_pem)
            key_path = base / KEY_FILE
            key_path.touch(mode=0o600)
            key_path.write_bytes(key_pem)
            cert = cls(base / CERT_FILE, key_path, True, min_version, ciphers, False, _tmpdir=tmpdir)
        cert._load(initial=True)
        return cert

    # -- loading ---------------------------------------------------------------------------------
    def _read(self) -> tuple[bytes, bytes, tuple[float, float], ssl.SSLContext]:
        """The pair, its mtimes, and a server context holding it: a pair OpenSSL accepts (matching key, PEM)."""
        try:
            stamp = (self.cert_file.stat().st_mtime, self.key_file.stat().st_mtime)
            cert_pem, key_pem = self.cert_file.read_bytes(), self.key_file.read_bytes()
            ctx = self._new_context()
            unchanged = (self.cert_file.read_bytes(), self.key_file.read_bytes()) == (cert_pem, key_pem)
        except ssl.SSLError as e:
            raise ConfigError(f"--cert-path: {self.cert_file} / {self.key_file} are not a usable certificate and "
                              f"private key: {e.reason or e}") from None  # fmt: skip
        except OSError as e:
            raise ConfigError(f"--cert-path: cannot read {e.filename}: {e.strerror}") from e
        if not unchanged:  # a writer at work: what was checked may not be what was read; the next check retries
            raise ConfigError(f"--cert-path: {self.cert_file} / {self.key_file} changed while being read")
        return cert_pem, key_pem, stamp, ctx

    def _load(self, initial: bool = False) -> None:
        # A new context, switched to whole: a context whose load_cert_chain fails midway loses its key.
        cert_pem, key_pem, stamp, ctx = self._read()
        with self._lock:
            self._pem, self._stamp = (cert_pem, key_pem), stamp
            if not initial:
                self.generation += 1
                self._current = ctx
        if not self.self_signed and (problem := validity_problem(cert_pem)):
            log.warning("serving certificate %s %s: clients that verify it will refuse the handshake",
                        self.cert_file, problem)  # fmt: skip

    @property
    def cert_pem(self) -> bytes:
        """The certificate being served (PEM), e.g. for a client to trust."""
        with self._lock:
            return self._pem[0]

    def changed(self) -> bool:
        try:
            return (self.cert_file.stat().st_mtime, self.key_file.stat().st_mtime) != self._stamp
        except OSError:
            return False  # mid-rotation (the Secret's symlinks swap): look again next time

    async def watch(self, interval: float = RELOAD_INTERVAL) -> None:
        """Reload the files when they change (runs until cancelled; only with --enable-cert-reload)."""
        while True:
            await asyncio.sleep(interval)
            if not self.changed():
                continue
            try:
                self._load()
            except Exception as e:  # never let a bad rotation end the watch
                # Retried every check (a chmod or a finished write may fix it), told once per breakage.
                if str(e) != self._last_error:
                    self._last_error = str(e)
                    self.reload_failures += 1
                    log.warning("serving certificate not reloaded; keeping the previous one: %s", e)
                else:
                    log.debug("serving certificate still not reloadable: %s", e)
            else:
                self._last_error = None
                log.info("serving certificate reloaded", extra={"cert_file": str(self.cert_file)})

    def close(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    # -- per transport ---------------------------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext:
        """For the h2 transport: server side, ALPN h2 (what Envoy's gRPC client offers)."""
        ctx = self._new_context()
        ctx.sni_callback = self._switch  # called on every ClientHello, with or without SNI
        return ctx

    def _new_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = self.min_version
        if self.openssl_ciphers:
            ctx.set_ciphers(self.openssl_ciphers)
        ctx.set_alpn_protocols(["h2"])
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def _switch(self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, ctx: ssl.SSLContext) -> None:
        current = self._current
        if current is not None and current is not ctx:
            conn.context = current

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """For the grpc.aio transport; with reload, each handshake picks up the newest pair."""
        with self._lock:
            cert_pem, key_pem = self._pem
        if not self.reload:
            return grpc.ssl_server_credentials([(key_pem, cert_pem)])
        served = [self.generation]

        def fetch() -> grpc.ServerCertificateConfiguration | None:  # called on gRPC's threads
            with self._lock:
                if self.generation == served[0]:
                    return None
                served[0] = self.generation
                cert, key = self._pem
            return grpc.ssl_server_certificate_configuration([(key, cert)])

        initial = grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)])
        return grpc.dynamic_ssl_server_credentials(initial, fetch)


def _openssl_ciphers(names: tuple[str, ...]) -> str:
    unknown = [n for n in names if n not in CIPHER_SUITES and n not in TLS13_SUITES]
    if unknown:
        known = ", ".join(sorted(CIPHER_SUITES))
        raise ConfigError(f"--tls-cipher-suites: unknown or insecure suite(s) {', '.join(unknown)}; known: {known} "
                          "(TLS 1.3 suites are accepted and always on)")  # fmt: skip
    return ":".join(CIPHER_SUITES[n] for n in names if n in CIPHER_SUITES)


def validity_problem(cert_pem: bytes, now: datetime.datetime | None = None) -> str | None:
    """Why the (first) certificate in `cert_pem` is outside its validity period now, or None."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return None  # OpenSSL accepted it; nothing more to say
    now = now or datetime.datetime.now(datetime.UTC)
    if now > cert.not_valid_after_utc:
        return f"expired at {cert.not_valid_after_utc.isoformat()}"
    if now < cert.not_valid_before_utc:
        return f"is not valid before {cert.not_valid_before_utc.isoformat()}"
    return None


def self_signed_pem(hosts: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
    """A fresh ECDSA P-256 key and a self-signed certificate for it (PEM), valid ten years, naming this
    host, localhost and 127.0.0.1 (clients here skip verification; the names help when one does not)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names = [*(hosts or (socket.gethostname(),)), "localhost"]
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "llm-epp"),
                      x509.NameAttribute(NameOID.COMMON_NAME, names[0])])  # fmt: skip
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dict.fromkeys(names)]
    sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


__all__ = ["CERT_FILE", "KEY_FILE", "ServingCert", "self_signed_pem", "validity_problem"]
