"""Tests of the Temporal connection arguments built from TemporalSettings."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr
from temporalio.service import TLSConfig

from remediator.settings import TemporalSettings
from remediator.temporal import TemporalSettingsError, connect, connect_options

CA = b"-----BEGIN CERTIFICATE-----\nca\n-----END CERTIFICATE-----\n"
CERT = b"-----BEGIN CERTIFICATE-----\nclient\n-----END CERTIFICATE-----\n"
KEY = b"-----BEGIN PRIVATE KEY-----\nkey\n-----END PRIVATE KEY-----\n"


@pytest.fixture
def pem_files(tmp_path: Path) -> dict[str, Path]:
    files = {"ca": CA, "cert": CERT, "key": KEY}
    paths = {}
    for name, content in files.items():
        path = tmp_path / f"{name}.pem"
        path.write_bytes(content)
        paths[name] = path
    return paths


def test_defaults_have_no_tls() -> None:
    options = connect_options(TemporalSettings(namespace="prod"))
    assert options == {"namespace": "prod"}


def test_tls_flag_uses_system_roots() -> None:
    options = connect_options(TemporalSettings(tls=True))
    assert options["tls"] is True
    assert "api_key" not in options


def test_api_key_implies_tls() -> None:
    settings = TemporalSettings(api_key=SecretStr("cloud-key-123"))
    options = connect_options(settings)
    assert options["tls"] is True
    assert options["api_key"] == "cloud-key-123"


def test_empty_api_key_is_unset() -> None:
    options = connect_options(TemporalSettings(api_key=SecretStr("")))
    assert "api_key" not in options
    assert "tls" not in options


def test_mutual_tls_reads_files(pem_files: dict[str, Path]) -> None:
    settings = TemporalSettings(
        tls_cert_file=pem_files["cert"],
        tls_key_file=pem_files["key"],
        tls_ca_file=pem_files["ca"],
        tls_server_name="prod.tmprl.example",
    )
    tls = connect_options(settings)["tls"]
    assert isinstance(tls, TLSConfig)
    assert tls.client_cert == CERT
    assert tls.client_private_key == KEY
    assert tls.server_root_ca_cert == CA
    assert tls.domain == "prod.tmprl.example"


def test_ca_file_alone(pem_files: dict[str, Path]) -> None:
    tls = connect_options(TemporalSettings(tls_ca_file=pem_files["ca"]))["tls"]
    assert isinstance(tls, TLSConfig)
    assert tls.server_root_ca_cert == CA
    assert tls.client_cert is None
    assert tls.domain is None


def test_server_name_alone_turns_tls_on() -> None:
    tls = connect_options(TemporalSettings(tls_server_name="temporal.internal"))["tls"]
    assert isinstance(tls, TLSConfig)
    assert tls.domain == "temporal.internal"
    assert tls.server_root_ca_cert is None


def test_api_key_with_mutual_tls(pem_files: dict[str, Path]) -> None:
    settings = TemporalSettings(
        api_key=SecretStr("k"),
        tls_cert_file=pem_files["cert"],
        tls_key_file=pem_files["key"],
    )
    options = connect_options(settings)
    assert options["api_key"] == "k"
    assert isinstance(options["tls"], TLSConfig)


def test_cert_without_key_rejected(pem_files: dict[str, Path]) -> None:
    settings = TemporalSettings(tls_cert_file=pem_files["cert"])
    with pytest.raises(TemporalSettingsError, match="TLS_KEY_FILE"):
        connect_options(settings)


def test_missing_file_rejected(tmp_path: Path) -> None:
    settings = TemporalSettings(tls_ca_file=tmp_path / "absent.pem")
    with pytest.raises(TemporalSettingsError, match="REMEDIATOR_TEMPORAL_TLS_CA_FILE"):
        connect_options(settings)


def test_settings_read_from_environment(
    monkeypatch: pytest.MonkeyPatch, pem_files: dict[str, Path]
) -> None:
    monkeypatch.setenv("REMEDIATOR_TEMPORAL_API_KEY", "env-key")
    monkeypatch.setenv("REMEDIATOR_TEMPORAL_TLS_CA_FILE", str(pem_files["ca"]))
    monkeypatch.setenv("REMEDIATOR_TEMPORAL_TLS_SERVER_NAME", "ns.acct.tmprl.cloud")
    settings = TemporalSettings()
    assert settings.api_key is not None
    assert settings.api_key.get_secret_value() == "env-key"
    assert "env-key" not in repr(settings)
    options = connect_options(settings)
    assert options["api_key"] == "env-key"
    assert options["tls"].domain == "ns.acct.tmprl.cloud"


async def test_lazy_connect_accepts_options(pem_files: dict[str, Path]) -> None:
    # A lazy client dials nothing until its first call, so this sends nothing.
    settings = TemporalSettings(
        address="127.0.0.1:1",
        api_key=SecretStr("lazy-key"),
        tls_ca_file=pem_files["ca"],
    )
    client = await connect(settings, lazy=True)
    assert client.namespace == "default"
    assert client.service_client.config.api_key == "lazy-key"
    assert isinstance(client.service_client.config.tls, TLSConfig)
