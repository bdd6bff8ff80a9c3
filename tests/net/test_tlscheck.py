"""Tests for threatgate.net.tlscheck: ``threatgate validate`` checks the TLS files and says which port uses which.

Configurations are the shipped examples with TLS elements added; certificates are made by tests/certs.py.
The CLI is run in-process (click's runner): exit status, stdout (summary and ports), stderr (errors, warnings).
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.certs import Authority, Pair, expired, self_signed
from threatgate.cli import main
from threatgate.config.balancer import load_balancer_config
from threatgate.config.node import load_node_config
from threatgate.net.tlscheck import balancer_report, node_report

ROOT = Path(__file__).resolve().parents[2]
NODE = (ROOT / "examples" / "node.conf").read_text(encoding="utf-8")
BALANCER = (ROOT / "examples" / "balancer.conf").read_text(encoding="utf-8")

NODE_TLS = """<ConnectionString>0.0.0.0:9999</ConnectionString>
    <TLS>
      <ClientCertificates mode="required">
        <CAFile>certs/ca.pem</CAFile>
        <Certificate>certs/balancer.pem</Certificate>
      </ClientCertificates>
    </TLS>"""


def node_conf(directory: Path, *, tls: str = NODE_TLS, extra: str = "") -> Path:
    """examples/node.conf without its feeds (validate loads them), events on ``tls``, ``extra`` at the end."""
    text = re.sub(r"<Feeds .*?</Feeds>", '<Feeds update_frequency="30"/>', NODE, flags=re.S)
    text = text.replace("<ConnectionString>127.0.0.1:9999</ConnectionString>", tls, 1)
    text = text.replace("</Configuration>", f"{extra}</Configuration>")
    path = directory / "node.conf"
    path.write_text(text, encoding="utf-8")
    return path


def balancer_conf(directory: Path, *, extra: str = "", instances_tls: bool = True) -> Path:
    text = BALANCER.replace("</Config>", f"{extra}</Config>")
    if instances_tls:
        text = text.replace('enabled="true">127.0.0.1</Instance>', 'enabled="true" tls="true">127.0.0.1</Instance>')
    path = directory / "balancer.conf"
    path.write_text(text, encoding="utf-8")
    return path


@dataclass
class Certs:
    """certs/ beside the configuration: a CA, the node's pair it issued, a balancer's own self-signed pair."""

    dir: Path
    ca: Authority
    node: tuple[str, str]
    balancer: tuple[str, str]


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    directory = tmp_path / "certs"
    ca = Authority()
    ca.pair.write_cert(directory, "ca")
    return Certs(
        directory,
        ca,
        ca.issue("node", hosts=["127.0.0.1"]).write(directory, "node"),
        self_signed("balancer", hosts=["127.0.0.1"]).write(directory, "balancer"),
    )


@dataclass
class Run:
    code: int
    out: list[str]
    err: list[str]


def validate(path: Path) -> Run:
    result = CliRunner().invoke(main, ["validate", str(path)])
    return Run(result.exit_code, result.stdout.splitlines(), result.stderr.splitlines())


def fp(pair: Pair | str) -> str:
    from threatgate.net.tls import fingerprint_sha256

    return pair.fingerprint if isinstance(pair, Pair) else fingerprint_sha256(Path(pair).read_bytes())


# -- good files ----------------------------------------------------------------------------------------------


def test_node_ports_and_certificates(tmp_path: Path, certs: Certs) -> None:
    path = node_conf(
        tmp_path,
        extra='<AllowedSources ports="events"><Source>10.0.0.0/8</Source><Source>192.0.2.7</Source></AllowedSources>\n',
    )
    run = validate(path)
    assert (run.code, run.err) == (0, [])
    assert "node config OK" in run.out[0]
    node_fp, balancer_fp = fp(certs.node[0]), fp(certs.balancer[0])
    assert run.out[1:] == [
        f"  events 0.0.0.0:9999: TLS, certificate {certs.node[0]} (SHA-256 {node_fp}), client certificates required "
        f"(CA {certs.dir / 'ca.pem'}; pinned {certs.dir / 'balancer.pem'} (SHA-256 {balancer_fp})), "
        "sources 10.0.0.0/8, 192.0.2.7/32",
        f"  api 127.0.0.1:8443: HTTPS, certificate {certs.node[0]} (SHA-256 {node_fp}), open to every source",
    ]


def test_a_missing_pair_is_generated_at_first_start(tmp_path: Path, certs: Certs) -> None:
    path = node_conf(tmp_path, tls="<ConnectionString>127.0.0.1:9999</ConnectionString><TLS/>")
    for name in ("node.pem", "node.key"):
        (certs.dir / name).unlink()
    run = validate(path)
    assert (run.code, run.err) == (0, [])
    generated = f"certificate {certs.dir / 'node.pem'} (not there yet: generated at first start, self-signed)"
    assert run.out[1:] == [
        f"  events 127.0.0.1:9999: TLS, {generated}, no client certificate asked, open to every source",
        f"  api 127.0.0.1:8443: HTTPS, {generated}, open to every source",
    ]


def test_tls_beside_the_plain_port_and_metrics(tmp_path: Path, certs: Certs) -> None:
    tls = (
        "<ConnectionString>0.0.0.0:9999</ConnectionString><TLS><ConnectionString>0.0.0.0:6514</ConnectionString></TLS>"
    )
    path = node_conf(tmp_path, tls=tls)
    path.write_text(
        path.read_text().replace(
            "</ServiceSettings>", "<MetricsConnectionString>9100</MetricsConnectionString></ServiceSettings>"
        )
    )
    run = validate(path)
    assert (run.code, run.err) == (0, [])
    assert run.out[1] == "  events 0.0.0.0:9999: plain TCP (TLS on the port below: a migration), open to every source"
    assert run.out[2].startswith(f"  events 0.0.0.0:6514: TLS, certificate {certs.node[0]} (SHA-256 ")
    assert run.out[4] == "  metrics 127.0.0.1:9100: plain HTTP, loopback, open to every source"


def test_metrics_open_to_the_network_warns(tmp_path: Path, certs: Certs) -> None:
    path = node_conf(tmp_path, tls="<ConnectionString>127.0.0.1:9999</ConnectionString>")
    path.write_text(
        path.read_text().replace(
            "</ServiceSettings>", "<MetricsConnectionString>0.0.0.0:9100</MetricsConnectionString></ServiceSettings>"
        )
    )
    run = validate(path)
    assert run.code == 0
    assert run.out[-1] == "  metrics 0.0.0.0:9100: plain HTTP, reachable from the network, open to every source"
    assert run.err == [
        f"{path}: warning: metrics 0.0.0.0:9100 is reachable from the network by every source: give a bare port "
        '(loopback) in <MetricsConnectionString>, or add <AllowedSources ports="metrics">'
    ]
    guarded = node_conf(
        tmp_path,
        tls="<ConnectionString>127.0.0.1:9999</ConnectionString>",
        extra='<AllowedSources ports="metrics"><Source>10.1.2.3</Source></AllowedSources>\n',
    )
    guarded.write_text(
        guarded.read_text().replace(
            "</ServiceSettings>", "<MetricsConnectionString>0.0.0.0:9100</MetricsConnectionString></ServiceSettings>"
        )
    )
    run = validate(guarded)
    assert (run.code, run.err) == (0, [])
    assert run.out[-1].endswith("reachable from the network, sources 10.1.2.3/32")


# -- bad files -----------------------------------------------------------------------------------------------


def test_mismatched_pair_is_an_error(tmp_path: Path, certs: Certs) -> None:
    os.replace(certs.balancer[1], certs.node[1])  # the node's certificate with the balancer's key
    run = validate(node_conf(tmp_path))
    assert run.code == 2
    assert run.out == []
    assert run.err == [
        f"{tmp_path / 'node.conf'}: error: TLS private key {certs.node[1]} does not belong to certificate "
        f"{certs.node[0]}: supply the matching pair, or remove both to have a new pair generated"
    ]


def test_expired_certificate_is_an_error(tmp_path: Path, certs: Certs) -> None:
    old = expired("node")
    old.write(certs.dir, "node")
    run = validate(node_conf(tmp_path))
    assert run.code == 2
    assert run.err == [
        f"{tmp_path / 'node.conf'}: error: TLS certificate {certs.node[0]} expired on "
        f"{old.cert.not_valid_after_utc.isoformat()}: clients will refuse it"
    ]


def test_not_yet_valid_certificate_is_an_error(tmp_path: Path, certs: Certs) -> None:
    now = dt.datetime.now(dt.UTC)
    certs.ca.issue("node", not_before=now + dt.timedelta(days=2), not_after=now + dt.timedelta(days=90)).write(
        certs.dir, "node"
    )
    run = validate(node_conf(tmp_path))
    assert run.code == 2
    assert len(run.err) == 1 and "is not valid before" in run.err[0] and "check the clock" in run.err[0]


def test_expiring_soon_is_a_warning(tmp_path: Path, certs: Certs) -> None:
    now = dt.datetime.now(dt.UTC)
    certs.ca.issue("node", not_after=now + dt.timedelta(days=10, hours=1)).write(certs.dir, "node")
    run = validate(node_conf(tmp_path))
    assert run.code == 0
    assert len(run.err) == 1
    assert re.fullmatch(
        rf"{re.escape(str(tmp_path / 'node.conf'))}: warning: TLS certificate {re.escape(certs.node[0])} expires on "
        r"\S+ \(in 10 day\(s\)\): renew it before clients refuse it",
        run.err[0],
    )


def test_key_readable_by_others_is_a_warning(tmp_path: Path, certs: Certs) -> None:
    os.chmod(certs.node[1], 0o644)
    run = validate(node_conf(tmp_path))
    assert run.code == 0 and "node config OK" in run.out[0]
    assert run.err == [
        f"{tmp_path / 'node.conf'}: warning: TLS private key {certs.node[1]} has mode 0644, readable by group or "
        f"others: chmod 600 {certs.node[1]}"
    ]


def test_half_a_pair_is_an_error(tmp_path: Path, certs: Certs) -> None:
    os.unlink(certs.node[1])
    run = validate(node_conf(tmp_path))
    assert run.code == 2
    assert run.err == [
        f"{tmp_path / 'node.conf'}: error: TLS private key {certs.node[1]} is missing but the certificate "
        f"{certs.node[0]} exists: remove {certs.node[0]} to have a new pair generated, or supply both files"
    ]


def test_missing_and_garbage_trust_files_are_errors(tmp_path: Path, certs: Certs) -> None:
    os.unlink(certs.dir / "ca.pem")
    (certs.dir / "balancer.pem").write_text("not a certificate\n")
    run = validate(node_conf(tmp_path))
    assert run.code == 2 and run.out == []
    conf = tmp_path / "node.conf"
    assert run.err == [
        f"{conf}: error: TLS CA file {certs.dir / 'ca.pem'} does not exist: check the path (a relative one is read "
        "from the configuration file's directory)",
        f"{conf}: error: TLS pinned client certificate {certs.dir / 'balancer.pem'} is not a PEM certificate file "
        "(-----BEGIN CERTIFICATE-----): convert it, e.g. openssl x509 -inform DER -in FILE -out FILE.pem",
    ]


def test_pinned_certificates_no_client_can_present_warn(tmp_path: Path, certs: Certs) -> None:
    self_signed("balancer", client=False).write(certs.dir, "balancer")
    run = validate(node_conf(tmp_path))
    assert run.code == 0
    pinned = certs.dir / "balancer.pem"
    assert run.err == [
        f"{tmp_path / 'node.conf'}: warning: TLS pinned client certificate {pinned} is for servers only (no "
        "clientAuth purpose): a client presenting it is refused (unsuitable certificate purpose); pin a certificate "
        "made for client authentication"
    ]
    expired("balancer").write(certs.dir, "balancer")
    run = validate(node_conf(tmp_path))
    assert run.code == 0
    assert len(run.err) == 1 and f"pinned client certificate {pinned} expired on " in run.err[0]
    assert run.err[0].endswith(": a client presenting it is refused")


# -- the balancer --------------------------------------------------------------------------------------------


MATCHING_TLS = """  <MatchingTLS port="6514">
    <ClientCertificates mode="optional"><CAFile>certs/ca.pem</CAFile></ClientCertificates>
  </MatchingTLS>
  <AlertTLS/>
  <AllowedSources><Source>10.0.0.0/8</Source></AllowedSources>
"""


def test_balancer_ports_hops_and_client_pair(tmp_path: Path, certs: Certs) -> None:
    path = balancer_conf(tmp_path, extra=MATCHING_TLS)
    run = validate(path)
    assert run.code == 0
    assert [e for e in run.err if "<OutputConnectionString>" not in e] == []  # the example's own warning only
    pair = f"certificate {certs.balancer[0]} (SHA-256 {fp(certs.balancer[0])})"
    assert run.out[1:] == [
        "  events 127.0.0.1:9999: plain TCP (TLS on the port below: a migration), sources 10.0.0.0/8",
        f"  events 127.0.0.1:6514: TLS, {pair}, client certificates optional (CA {certs.dir / 'ca.pem'}), "
        "sources 10.0.0.0/8",
        f"  api 127.0.0.1:8443: HTTPS, {pair}, sources 10.0.0.0/8",
        f"  alerts 127.0.0.1:9997: TLS, {pair}, no client certificate asked, sources 10.0.0.0/8",
        f"  to instance 127.0.0.1:10001: TLS, its certificate checked against its pin in {tmp_path / 'pins'} "
        f"(trust on first use); client {pair} if it asks",
        f"  to instance 127.0.0.1:10002: TLS, its certificate checked against its pin in {tmp_path / 'pins'} "
        f"(trust on first use); client {pair} if it asks",
    ]


def test_balancer_client_pair_for_servers_only_warns(tmp_path: Path, certs: Certs) -> None:
    self_signed("balancer", client=False).write(certs.dir, "balancer")
    config = load_balancer_config(str(balancer_conf(tmp_path)))
    report = balancer_report(config)
    assert report.errors == ()
    assert report.warnings == (
        f"TLS certificate {certs.balancer[0]} is for servers only (no clientAuth purpose): a node that asks for a "
        "client certificate refuses it; use one with the clientAuth purpose (<ClientCertificatePath>)",
    )
    plain = balancer_report(load_balancer_config(str(balancer_conf(tmp_path, instances_tls=False))))
    assert plain.warnings == ()  # no instance over TLS: the pair is not presented to anyone
    assert not any(line.startswith("to instance") for line in plain.ports)


def test_each_file_is_reported_once(tmp_path: Path, certs: Certs) -> None:
    os.chmod(certs.balancer[1], 0o640)
    report = balancer_report(
        load_balancer_config(str(balancer_conf(tmp_path, extra="  <MatchingTLS/>\n  <AlertTLS/>\n")))
    )
    assert report.warnings == (
        f"TLS private key {certs.balancer[1]} has mode 0640, readable by group or others: "
        f"chmod 600 {certs.balancer[1]}",
    )


def test_node_report_takes_now(tmp_path: Path, certs: Certs) -> None:
    """The clock is an input: a year on, the node's certificate (90 days) has expired."""
    config = load_node_config(str(node_conf(tmp_path)))
    assert node_report(config).errors == ()
    later = node_report(config, now=dt.datetime.now(dt.UTC) + dt.timedelta(days=365))
    assert any(f"TLS certificate {certs.node[0]} expired on" in e for e in later.errors)
    assert any("CA file" in w and "expired" in w for w in later.warnings)


# -- the examples' commented blocks, uncommented -------------------------------------------------------------


def _uncomment(text: str, opening: str) -> tuple[str, str]:
    """``text`` without the comment that starts with ``opening``, and that comment's XML (its prose dropped)."""
    start = text.index(f"<!-- {opening}")
    end = text.index("-->", start)
    lines = text[start:end].splitlines()[1:]
    first = next(i for i, line in enumerate(lines) if line.strip().startswith("<"))
    return text[:start] + text[end + len("-->") :], "\n".join(lines[first:])


def test_the_node_examples_commented_blocks_are_valid(tmp_path: Path, certs: Certs) -> None:
    text = re.sub(r"<Feeds .*?</Feeds>", '<Feeds update_frequency="30"/>', NODE, flags=re.S)
    text, tls = _uncomment(text, "Events over TLS")
    text, sources = _uncomment(text, "Who may connect")
    text, metrics = _uncomment(text, "Prometheus /metrics")
    text = text.replace("<RegExps>", tls.strip() + "\n    <RegExps>", 1)
    text = text.replace("</ServiceSettings>", metrics.strip() + "</ServiceSettings>", 1)
    text = text.replace("</Configuration>", sources.strip() + "\n</Configuration>", 1)
    certs.ca.pair.write_cert(certs.dir, "siem-ca")
    path = tmp_path / "node.conf"
    path.write_text(text, encoding="utf-8")
    run = validate(path)
    assert (run.code, run.err) == (0, []), run
    assert [line.split(": ")[0] for line in run.out[1:]] == [
        "  events 127.0.0.1:9999",
        "  api 127.0.0.1:8443",
        "  metrics 127.0.0.1:9100",
    ]
    assert "client certificates required" in run.out[1] and run.out[1].endswith("sources 127.0.0.1/32, 10.0.0.0/8")


def test_the_balancer_examples_commented_blocks_are_valid(tmp_path: Path, certs: Certs) -> None:
    text, security = _uncomment(BALANCER, "Transport security")
    text, metrics = _uncomment(text, "Prometheus /metrics")
    text = text.replace("</Config>", security.strip() + "\n" + metrics.strip() + "\n</Config>", 1)
    text = text.replace('enabled="true">127.0.0.1</Instance>', 'enabled="true" tls="true">127.0.0.1</Instance>')
    certs.ca.pair.write_cert(certs.dir, "siem-ca")
    certs.ca.issue("balancer client", server=False).write(certs.dir, "balancer-client")
    path = tmp_path / "balancer.conf"
    path.write_text(text, encoding="utf-8")
    run = validate(path)
    assert run.code == 0 and [e for e in run.err if "<OutputConnectionString>" not in e] == [], run
    assert [line.split(": ")[0] for line in run.out[1:]] == [
        "  events 127.0.0.1:9999",
        "  events 127.0.0.1:6514",
        "  api 127.0.0.1:8443",
        "  alerts 127.0.0.1:9997",
        "  metrics 127.0.0.1:9100",
        "  to instance 127.0.0.1:10001",
        "  to instance 127.0.0.1:10002",
    ]
