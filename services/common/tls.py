"""Optional mutual TLS between the services.

Off unless ``HOMEFEED_TLS_CERT``, ``HOMEFEED_TLS_KEY`` and ``HOMEFEED_TLS_CA`` are all set
(paths of PEM files: this service's certificate and key, and the CA that signed every
service's; the Helm chart mounts them from a Secret). Then every server listens with TLS and
requires a client certificate signed by that CA, and every channel a service opens to another
presents its own certificate and checks the server's against the CA (the certificate must
name the address it is reached by: the Service's DNS name in a cluster). Setting some of
the three variables but not all is a settings error, never a silent fallback to plaintext.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from services.common.settings import SettingsError

CERT_ENV, KEY_ENV, CA_ENV = "HOMEFEED_TLS_CERT", "HOMEFEED_TLS_KEY", "HOMEFEED_TLS_CA"


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path

    @classmethod
    def from_env(cls) -> TlsFiles | None:
        values = {name: os.environ.get(name) or None for name in (CERT_ENV, KEY_ENV, CA_ENV)}
        given = [name for name, value in values.items() if value]
        if not given:
            return None
        if len(given) < 3:
            missing = sorted(set(values) - set(given))
            raise SettingsError(
                f"mTLS needs {CERT_ENV}, {KEY_ENV} and {CA_ENV}; {', '.join(missing)} unset"
            )
        files = cls(
            Path(values[CERT_ENV] or ""), Path(values[KEY_ENV] or ""), Path(values[CA_ENV] or "")
        )
        for name, path in zip(
            (CERT_ENV, KEY_ENV, CA_ENV), (files.cert, files.key, files.ca), strict=True
        ):
            if not path.is_file():
                raise SettingsError(f"{name} names {path}, which is not a readable file")
        return files

    def _read(self) -> tuple[bytes, bytes, bytes]:
        return self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()

    def server_credentials(self) -> grpc.ServerCredentials:
        cert, key, ca = self._read()
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        cert, key, ca = self._read()
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )


def channel(address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to another service: mutual TLS when configured, else plaintext."""
    files = TlsFiles.from_env()
    if files is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, files.channel_credentials(), options=list(options))
