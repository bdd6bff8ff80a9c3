"""TLS elements, client certificates and source allow-lists in both configuration files (config/security.py)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from threatgate.config.balancer import load_balancer_config
from threatgate.config.node import load_node_config
from threatgate.errors import ConfigError

from .configs import EXAMPLES, write_balancer_config, write_node_config

NODE = (EXAMPLES / "node.conf").read_text(encoding="utf-8")
BALANCER = (EXAMPLES / "balancer.conf").read_text(encoding="utf-8")
INPUT = "<ConnectionString>127.0.0.1:9999</ConnectionString>"


def node_with(tmp_path: Path, inside_input: str = "", top: str = "") -> Path:
    assert INPUT in NODE
    text = NODE.replace(INPUT, INPUT + inside_input, 1).replace("</Configuration>", top + "</Configuration>")
    return write_node_config(tmp_path, text)


def balancer_with(tmp_path: Path, top: str) -> Path:
    return write_balancer_config(tmp_path, BALANCER.replace("</Config>", top + "</Config>"))


def node_error(tmp_path: Path, inside_input: str = "", top: str = "") -> str:
    with pytest.raises(ConfigError) as info:
        load_node_config(str(node_with(tmp_path, inside_input, top)))
    return str(info.value)


def test_no_tls_and_no_allow_list_by_default(tmp_path: Path) -> None:
    config = load_node_config(str(node_with(tmp_path)))
    assert config.input.tls is None
    assert config.allowed_sources.networks("events") is None


def test_node_tls_defaults_to_the_http_server_pair(tmp_path: Path) -> None:
    config = load_node_config(str(node_with(tmp_path, '<TLS enabled="true"/>')))
    tls = config.input.tls
    assert tls is not None and config.http is not None
    assert (tls.cert_path, tls.key_path) == (config.http.cert_path, config.http.key_path)
    assert tls.listen is None and tls.clients.mode == "none"
    assert load_node_config(str(node_with(tmp_path, '<TLS enabled="false"><Bogus/></TLS>'))).input.tls is None


def test_node_tls_own_pair_second_port_and_client_certificates(tmp_path: Path) -> None:
    config = load_node_config(
        str(
            node_with(
                tmp_path,
                "<TLS><CertificatePath>tls/e.pem</CertificatePath><PrivateKeyPath>tls/e.key</PrivateKeyPath>"
                "<ConnectionString>0.0.0.0:6514</ConnectionString>"
                '<ClientCertificates mode="optional"><CAFile>ca.pem</CAFile><Certificate>b.pem</Certificate>'
                "</ClientCertificates></TLS>",
            )
        )
    )
    tls = config.input.tls
    assert tls is not None and tls.listen is not None
    assert tls.cert_path == str(tmp_path / "tls" / "e.pem") and tls.key_path == str(tmp_path / "tls" / "e.key")
    assert (tls.listen.host, tls.listen.port) == ("0.0.0.0", 6514)
    assert tls.clients.mode == "optional"
    assert tls.clients.ca_files == (str(tmp_path / "ca.pem"),)
    assert tls.clients.certificates == (str(tmp_path / "b.pem"),)
    assert "client certificates optional (CA" in tls.describe()


@pytest.mark.parametrize(
    ("clients", "problem"),
    [
        ('<ClientCertificates mode="required"/>', "needs what to trust"),
        ('<ClientCertificates mode="none"><CAFile>ca.pem</CAFile></ClientCertificates>', "asks for no client"),
        ('<ClientCertificates mode="sometimes"><CAFile>a</CAFile></ClientCertificates>', "expected one of none"),
        ('<ClientCertificates mode="required"><CA>a</CA></ClientCertificates>', "unknown element"),
        ("<CertificatePath>same</CertificatePath><PrivateKeyPath>same</PrivateKeyPath>", "separate files"),
    ],
)
def test_bad_tls_element(tmp_path: Path, clients: str, problem: str) -> None:
    error = node_error(tmp_path, f"<TLS>{clients}</TLS>")
    assert problem in error and ":" in error.split("<")[0]


def test_allowed_sources_per_port_and_for_every_port(tmp_path: Path) -> None:
    config = load_node_config(
        str(
            node_with(
                tmp_path,
                top='<AllowedSources ports="events"><Source>10.0.0.0/8</Source><Source>192.0.2.7</Source>'
                "</AllowedSources><AllowedSources><Source>127.0.0.1</Source></AllowedSources>",
            )
        )
    )
    allowed = config.allowed_sources
    assert allowed.networks("events") == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.0.2.7/32"))
    assert allowed.networks("api") == allowed.networks("metrics") == (ipaddress.ip_network("127.0.0.1/32"),)


@pytest.mark.parametrize(
    ("top", "problem"),
    [
        ("<AllowedSources><Source>10.0.0.1/8</Source></AllowedSources>", "did you mean 10.0.0.0/8"),
        ("<AllowedSources><Source>siem.example</Source></AllowedSources>", "host names are not accepted"),
        ("<AllowedSources/>", "would refuse every peer"),
        ('<AllowedSources ports="events,alerts"><Source>::1</Source></AllowedSources>', "unknown port 'alerts'"),
        (
            '<AllowedSources ports="api"><Source>::1</Source></AllowedSources>'
            '<AllowedSources ports="api"><Source>::2</Source></AllowedSources>',
            "already has an <AllowedSources>",
        ),
        (
            "<AllowedSources><Source>::1</Source></AllowedSources><AllowedSources><Source>::2</Source></AllowedSources>",
            "without ports=",
        ),
        ("<AllowedSources><Host>::1</Host></AllowedSources>", "unknown element"),
    ],
)
def test_bad_allowed_sources(tmp_path: Path, top: str, problem: str) -> None:
    assert problem in node_error(tmp_path, top=top)


def test_metrics_bare_port_listens_on_loopback(tmp_path: Path) -> None:
    text = NODE.replace(
        "</ServiceSettings>", "<MetricsConnectionString>9100</MetricsConnectionString></ServiceSettings>"
    )
    if "</ServiceSettings>" not in NODE:
        text = NODE.replace(
            "</Configuration>",
            "<ServiceSettings><MetricsConnectionString>9100</MetricsConnectionString></ServiceSettings></Configuration>",
        )
    config = load_node_config(str(write_node_config(tmp_path, text)))
    assert config.service.metrics is not None
    assert (config.service.metrics.host, config.service.metrics.port) == ("127.0.0.1", 9100)


def test_balancer_tls_elements_client_pair_and_instance_tls(tmp_path: Path) -> None:
    text = (
        '<MatchingTLS port="6514"><ClientCertificates><CAFile>ca.pem</CAFile></ClientCertificates></MatchingTLS>'
        "<AlertTLS/><ClientCertificatePath>client.pem</ClientCertificatePath>"
        "<ClientPrivateKeyPath>client.key</ClientPrivateKeyPath>"
        '<AllowedSources ports="alerts,metrics"><Source>127.0.0.0/8</Source></AllowedSources>'
    )
    path = balancer_with(tmp_path, text)
    path.write_text(path.read_text().replace("<Instance ", '<Instance tls="true" ', 1))
    config = load_balancer_config(str(path))
    assert config.matching_tls is not None and config.matching_tls.listen is not None
    assert config.matching_tls.listen.port == 6514 and config.matching_tls.listen.host == config.listen_host
    assert config.matching_tls.clients.mode == "required"  # mode defaults to required once trust is listed
    assert config.matching_tls.cert_path == config.cert_path
    assert config.alert_tls is not None and config.alert_tls.listen is None
    assert config.client_cert_path == str(tmp_path / "client.pem")
    assert config.client_key_path == str(tmp_path / "client.key")
    assert [i.tls for i in config.instances] == [True] + [False] * (len(config.instances) - 1)
    assert config.allowed_sources.networks("events") is None
    assert config.allowed_sources.networks("alerts") == (ipaddress.ip_network("127.0.0.0/8"),)


def test_balancer_client_pair_defaults_to_its_own(tmp_path: Path) -> None:
    config = load_balancer_config(str(balancer_with(tmp_path, "")))
    assert (config.client_cert_path, config.client_key_path) == (config.cert_path, config.key_path)
    assert config.matching_tls is None and config.alert_tls is None
    assert not any(i.tls for i in config.instances)
