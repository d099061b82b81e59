"""Mutual TLS between services, with a CA generated for the test: a server built by
``build_server`` with the three ``HOMEFEED_TLS_*`` files answers a client that presents a
certificate of the same CA, and refuses a plaintext client, a client without a certificate
and one whose certificate another CA signed."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import tls
from services.common.server import build_server
from services.common.settings import ServerSettings, SettingsError


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    signer: ec.EllipticCurvePrivateKey,
    ca: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(signer, hashes.SHA256())


def _issue(
    tmp: Path, name: str, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    key = _key()
    cert = _cert(name, key, ca_cert, ca_key)
    (tmp / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / f"{name}.key").write_bytes(_pem(key))
    return tmp / f"{name}.crt", tmp / f"{name}.key"


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca_key = _key()
    ca = _cert("homefeed-test-ca", ca_key, None, ca_key, ca=True)
    (tmp_path / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    other_key = _key()
    other = _cert("another-ca", other_key, None, other_key, ca=True)
    server_crt, server_key = _issue(tmp_path, "server", ca, ca_key)
    client_crt, client_key = _issue(tmp_path, "client", ca, ca_key)
    rogue_crt, rogue_key = _issue(tmp_path, "rogue", other, other_key)
    return {
        "ca": tmp_path / "ca.crt",
        "server_crt": server_crt,
        "server_key": server_key,
        "client_crt": client_crt,
        "client_key": client_key,
        "rogue_crt": rogue_crt,
        "rogue_key": rogue_key,
    }


def _check(channel: grpc.Channel) -> str:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=3
        )
    except grpc.RpcError as err:
        return str(err.code().name)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_services_talk_mutual_tls_and_refuse_everyone_else(
    pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(tls.CERT_ENV, str(pki["server_crt"]))
    monkeypatch.setenv(tls.KEY_ENV, str(pki["server_key"]))
    monkeypatch.setenv(tls.CA_ENV, str(pki["ca"]))
    server, port, _ = build_server(ServerSettings(), [], lambda s: None)
    server.start()
    address = f"localhost:{port}"
    try:
        monkeypatch.setenv(tls.CERT_ENV, str(pki["client_crt"]))
        monkeypatch.setenv(tls.KEY_ENV, str(pki["client_key"]))
        with tls.channel(address) as channel:
            assert _check(channel) == "SERVING"
        with grpc.insecure_channel(address) as channel:
            assert _check(channel) == "UNAVAILABLE"
        ca = pki["ca"].read_bytes()
        with grpc.secure_channel(address, grpc.ssl_channel_credentials(ca)) as channel:
            assert _check(channel) == "UNAVAILABLE"  # no client certificate
        monkeypatch.setenv(tls.CERT_ENV, str(pki["rogue_crt"]))
        monkeypatch.setenv(tls.KEY_ENV, str(pki["rogue_key"]))
        with tls.channel(address) as channel:
            assert _check(channel) == "UNAVAILABLE"  # signed by another CA
    finally:
        server.stop(None)


def test_half_a_tls_configuration_is_a_settings_error(
    pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tls.TlsFiles.from_env() is None
    monkeypatch.setenv(tls.CERT_ENV, str(pki["server_crt"]))
    with pytest.raises(SettingsError, match="HOMEFEED_TLS_CA, HOMEFEED_TLS_KEY unset"):
        tls.TlsFiles.from_env()
    monkeypatch.setenv(tls.KEY_ENV, str(pki["server_key"]))
    monkeypatch.setenv(tls.CA_ENV, "/nonexistent/ca.crt")
    with pytest.raises(SettingsError, match="not a readable file"):
        tls.TlsFiles.from_env()
