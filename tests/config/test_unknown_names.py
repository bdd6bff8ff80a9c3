"""Issue 12 item 1: a setting is applied or refused, never ignored.

Every element and attribute of node.conf, kl_balancer.conf and the cluster's ``<Settings>`` that no
reader asks for is an error at its ``file:line`` naming the closest valid name (nginx's "unknown
directive"); ``--log-level`` takes exactly the documented names.  On the code before issue 12 every
misspelt case below loaded, the misspelt value silently replaced by the default.
"""

from __future__ import annotations

import difflib
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.config.configs import line_of, write_balancer_config, write_node_config
from threatgate.cluster.agent import validate_document
from threatgate.cluster.settings import SettingsDocument, extract_settings, make_payload, merge_settings, set_value
from threatgate.config.balancer import balancer_config_from_xml, load_balancer_config
from threatgate.config.node import load_node_config, node_config_from_xml
from threatgate.config.xml import TYPO_CUTOFF, Attributes, Node, parse_xml, read_xml
from threatgate.errors import ConfigError, SettingsRejected

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
THREATGATE = Path(sys.executable).parent / "threatgate"

CLUSTER = (
    "  <Cluster>\n"
    "    <ConnectionString>127.0.0.1:7100</ConnectionString>\n"
    "    <HeartbeatInterval>1</HeartbeatInterval>\n"
    '    <Etcd endpoints="http://127.0.0.1:2379" lease_ttl="5"/>\n'
    "  </Cluster>\n"
)
EXTRAS = (
    "<ServiceSettings>\n"
    '    <MetricsConnectionString enabled="true">127.0.0.1:9100</MetricsConnectionString>\n'
    "    <HandshakeTimeout>5</HandshakeTimeout>"
)


def node_text() -> str:
    """The example node.conf with every section: metrics, a replace rule, a cluster with etcd."""
    text = (EXAMPLES / "node.conf").read_text(encoding="utf-8")
    text = text.replace("<ServiceSettings>", EXTRAS, 1)
    text = text.replace("<Ignore>", '<Replace input="\\t" output=" "/>\n          <Ignore>', 1)
    return text.replace("</Configuration>", CLUSTER + "</Configuration>", 1)


def balancer_text() -> str:
    """The example kl_balancer.conf with the optional elements that have attributes."""
    text = (EXAMPLES / "balancer.conf").read_text(encoding="utf-8")
    extra = (
        '  <ReadinessCheck enabled="true"/>\n'
        '  <MetricsConnectionString enabled="false">127.0.0.1:9101</MetricsConnectionString>\n'
        "  <LicensePath>kl.key</LicensePath>\n"
    )
    return text.replace("</Config>", extra + "</Config>", 1)


def sub(old: str, new: str, count: int = 1) -> Callable[[str], str]:
    """Replace the first ``count`` occurrences (-1: all)."""

    def edit(text: str) -> str:
        assert old in text, f"{old!r} not in the config"
        return text.replace(old, new, count)

    return edit


FEED_ENABLE = sub('botnet_domains.json" enabled="true"', 'botnet_domains.json" enable="false"')
"""The operator meant to disable the feed: the feed stayed enabled."""


def test_the_configs_used_below_are_valid(tmp_path: Path) -> None:
    config = load_node_config(str(write_node_config(tmp_path, node_text())))
    assert config.cluster is not None and config.cluster.etcd is not None
    assert config.service.metrics is not None and config.input.sources[1].replace
    load_balancer_config(str(write_balancer_config(tmp_path, balancer_text())))


# (id, edit, needle on the reported line, problem after "<Element>: ", element)
NODE_CASES: list[tuple[str, Callable[[str], str], str, str, str]] = [
    # the cases of the issue
    (
        "ScanerCount",
        sub("<ScannersCount>9</ScannersCount>", "<ScanerCount>9</ScanerCount>"),
        "<ScanerCount>",
        "ScanerCount",
        "unknown element in <ServiceSettings> (did you mean <ScannersCount>?)",
    ),
    (
        "MetricConnectionString",
        sub("MetricsConnectionString", "MetricConnectionString", -1),
        "<MetricConnectionString",
        "MetricConnectionString",
        "unknown element in <ServiceSettings> (did you mean <MetricsConnectionString>?)",
    ),
    (
        "Feed-enable",
        FEED_ENABLE,
        "Botnet_CnC_Domain",
        "Feed",
        "unknown attribute 'enable' (did you mean 'enabled'?)",
    ),
    (
        "Feed-confidance",
        sub('confidence="80" category="IP_Reputation"', 'confidance="80" category="IP_Reputation"'),
        "IP_Reputation",
        "Feed",
        "unknown attribute 'confidance' (did you mean 'confidence'?)",
    ),
    (
        "Source-hostnmae",
        sub('hostname="dns01"', 'hostnmae="dns01"'),
        'hostnmae="dns01"',
        "Source",
        "unknown attribute 'hostnmae' (did you mean 'hostname'?)",
    ),
    # one per section
    (
        "Configuration-child",
        sub("  <IoCExports>", "  <IOCExports/>\n  <IoCExports>"),
        "<IOCExports/>",
        "IOCExports",
        "unknown element in <Configuration> (did you mean <IoCExports>?)",
    ),
    (
        "Configuration-attribute",
        sub("<Configuration>", '<Configuration version="2">'),
        "<Configuration",
        "Configuration",
        "unknown attribute 'version' (none is allowed here)",
    ),
    (
        "InputSettings-child",
        sub("<RegExps>", "<EventDelimeter>;</EventDelimeter><RegExps>"),
        "<EventDelimeter>",
        "EventDelimeter",
        "unknown element in <InputSettings> (did you mean <EventDelimiter>?)",
    ),
    (
        "RegExps-child",
        sub("    </RegExps>", "      <Sources id='x'/>\n    </RegExps>"),
        "<Sources",
        "Sources",
        "unknown element in <RegExps> (did you mean <Source>?)",
    ),
    (
        "rule-attribute",
        sub('<RE_MD5 type="MD5"', '<RE_MD5 tpye="MD5"'),
        "<RE_MD5",
        "RE_MD5",
        "unknown attribute 'tpye' (did you mean 'type'?)",
    ),
    (
        "NormalizingRules-child",
        sub("<Ignore>", "<Ignor>x</Ignor><Ignore>"),
        "<Ignor>",
        "Ignor",
        "unknown element in <NormalizingRules> (did you mean <Ignore>?)",
    ),
    (
        "Replace-attribute",
        sub('output=" "', 'ouput=" "'),
        "<Replace",
        "Replace",
        "unknown attribute 'ouput' (did you mean 'output'?)",
    ),
    (
        "OutputSettings-child",
        sub("<AlertFormat>", "<AlertFromat>x</AlertFromat><AlertFormat>"),
        "<AlertFromat>",
        "AlertFromat",
        "unknown element in <OutputSettings> (did you mean <AlertFormat>?)",
    ),
    (
        "FinishedEventFormat-attribute",
        sub('<FinishedEventFormat enabled="true"', '<FinishedEventFormat enabled="true" enable="true"'),
        "<FinishedEventFormat",
        "FinishedEventFormat",
        "unknown attribute 'enable' (did you mean 'enabled'?)",
    ),
    (
        "AlertConnectionString-attribute",
        sub('<AlertConnectionString enabled="false"', '<AlertConnectionString enabled="false" retries="2"'),
        "<AlertConnectionString",
        "AlertConnectionString",
        "unknown attribute 'retries' (expected 'enabled')",
    ),
    (
        "Feeds-attribute",
        sub('update_frequency="30"', 'update_frequence="30"'),
        "<Feeds ",
        "Feeds",
        "unknown attribute 'update_frequence' (did you mean 'update_frequency'?)",
    ),
    (
        "Feeds-child",
        sub("  </Feeds>", "    <Feeds filename='x.json'/>\n  </Feeds>"),
        "<Feeds filename",
        "Feeds",
        "unknown element in <Feeds> (did you mean <Feed>?)",
    ),
    (
        "MetricsConnectionString-attribute",
        sub('<MetricsConnectionString enabled="true"', '<MetricsConnectionString enabeld="true"'),
        "<MetricsConnectionString",
        "MetricsConnectionString",
        "unknown attribute 'enabeld' (did you mean 'enabled'?)",
    ),
    (
        "leaf-child",
        sub("<ScannersCount>9</ScannersCount>", "<ScannersCount>9<Max>20</Max></ScannersCount>"),
        "<ScannersCount>",
        "Max",
        "unknown element in <ScannersCount> (none is allowed here)",
    ),
    (
        "HTTPServer-child",
        sub("<Database>", "<DataBase>x</DataBase><Database>"),
        "<DataBase>",
        "DataBase",
        "unknown element in <HTTPServer> (did you mean <Database>?)",
    ),
    (
        "HTTPServer-enable",
        sub("<HTTPServer>", '<HTTPServer enable="false">'),
        "<HTTPServer",
        "HTTPServer",
        "unknown attribute 'enable' (did you mean 'enabled'?)",
    ),
    (
        "Users-child",
        sub("<Users>", "<Users><user name='a'/>"),
        "<Users>",
        "user",
        "unknown element in <Users> (did you mean <User>?)",
    ),
    (
        "User-attribute",
        sub("<Users>", "<Users><User name='a' password_hash='x' passwordhash='y'/>"),
        "<Users>",
        "User",
        "unknown attribute 'passwordhash' (did you mean 'password_hash'?)",
    ),
    (
        "IoCExports-child",
        sub("<IoCExport ", "<IoCExprt name='x'/><IoCExport "),
        "<IoCExprt",
        "IoCExprt",
        "unknown element in <IoCExports> (did you mean <IoCExport>?)",
    ),
    (
        "IoCExport-attribute",
        sub('records_limit="1000"', 'record_limit="1000"'),
        "<IoCExport ",
        "IoCExport",
        "unknown attribute 'record_limit' (did you mean 'records_limit'?)",
    ),
    (
        "Cluster-child",
        sub("HeartbeatInterval>", "HeartBeatInterval>", -1),
        "<HeartBeatInterval>",
        "HeartBeatInterval",
        "unknown element in <Cluster> (did you mean <HeartbeatInterval>?)",
    ),
    (
        "Etcd-attribute",
        sub('lease_ttl="5"', 'lease_tll="5"'),
        "<Etcd",
        "Etcd",
        "unknown attribute 'lease_tll' (did you mean 'lease_ttl'?)",
    ),
    (
        "repeated-mandatory-element",
        sub(
            "<ConnectionString>127.0.0.1:9999</ConnectionString>",
            "<ConnectionString>127.0.0.1:9999</ConnectionString><ConnectionString>127.0.0.1:9</ConnectionString>",
        ),
        "127.0.0.1:9<",
        "ConnectionString",
        "<ConnectionString> may appear only once (first at line 5)",
    ),
]


@pytest.mark.parametrize(
    ("edit", "needle", "element", "problem"), [pytest.param(*case[1:], id=case[0]) for case in NODE_CASES]
)
def test_node_unknown_name_is_an_error_with_file_line_and_the_closest_name(
    tmp_path: Path, edit: Callable[[str], str], needle: str, element: str, problem: str
) -> None:
    text = edit(node_text())
    path = write_node_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_node_config(str(path))
    assert str(info.value) == f"{path}:{line_of(text, needle)}: <{element}>: {problem}"


BALANCER_CASES: list[tuple[str, Callable[[str], str], str, str, str]] = [
    (
        "Instance-weigth",
        sub('api_port="10444" enabled="true"', 'api_port="10444" enabled="true" weigth="3"'),
        'weigth="3"',
        "Instance",
        "unknown attribute 'weigth' (did you mean 'weight'?)",
    ),
    (
        "Config-child",
        sub("<ReplyTimeout>30</ReplyTimeout>", "<ReplyTimout>30</ReplyTimout>"),
        "<ReplyTimout>",
        "ReplyTimout",
        "unknown element in <Config> (did you mean <ReplyTimeout>?)",
    ),
    (
        "Balancer-attribute",  # a mandatory one: the misspelling, not "scanners_count is mandatory"
        sub('scanners_count="20"', 'scanner_count="20"'),
        "<Balancer ",
        "Balancer",
        "unknown attribute 'scanner_count' (did you mean 'scanners_count'?)",
    ),
    (
        "Instances-child",
        sub("<Instance ", "<Instanse matching_port='1'/><Instance "),
        "<Instanse",
        "Instanse",
        "unknown element in <Instances> (did you mean <Instance>?)",
    ),
    (
        "AllowedRequests-child",
        sub('<Request method="POST"', '<Requests method="POST"'),
        "<Requests",
        "Requests",
        "unknown element in <AllowedRequests> (did you mean <Request>?)",
    ),
    (
        "Request-attribute",
        sub('<Request method="POST"', '<Request metod="POST"'),
        "<Request metod",
        "Request",
        "unknown attribute 'metod' (did you mean 'method'?)",
    ),
    (
        "HealthCheck-attribute",
        sub('interval="2"', 'intervall="2"'),
        "<HealthCheck",
        "HealthCheck",
        "unknown attribute 'intervall' (did you mean 'interval'?)",
    ),
    (
        "ReadinessCheck-attribute",
        sub('<ReadinessCheck enabled="true"/>', '<ReadinessCheck enabled="true" interval="5"/>'),
        "<ReadinessCheck",
        "ReadinessCheck",
        "unknown attribute 'interval' (expected 'enabled')",
    ),
    (
        "OutputConnectionString-enable",
        sub('<OutputConnectionString enabled="false"', '<OutputConnectionString enable="false"'),
        "<OutputConnectionString",
        "OutputConnectionString",
        "unknown attribute 'enable' (did you mean 'enabled'?)",
    ),
]


@pytest.mark.parametrize(
    ("edit", "needle", "element", "problem"), [pytest.param(*case[1:], id=case[0]) for case in BALANCER_CASES]
)
def test_balancer_unknown_name_is_an_error_with_file_line_and_the_closest_name(
    tmp_path: Path, edit: Callable[[str], str], needle: str, element: str, problem: str
) -> None:
    text = edit(balancer_text())
    path = write_balancer_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_balancer_config(str(path))
    assert str(info.value) == f"{path}:{line_of(text, needle)}: <{element}>: {problem}"


def test_a_misspelling_that_breaks_the_config_is_reported_instead_of_its_consequence(tmp_path: Path) -> None:
    """``enable="false"`` left the feed enabled, so its missing file was the error: name the typo."""
    text = FEED_ENABLE(node_text())
    path = write_node_config(tmp_path, text)
    (tmp_path / "feeds" / "botnet_domains.json").unlink()
    with pytest.raises(ConfigError) as info:
        load_node_config(str(path))
    line = line_of(text, "Botnet_CnC_Domain")
    assert str(info.value) == f"{path}:{line}: <Feed>: unknown attribute 'enable' (did you mean 'enabled'?)"


def test_an_unrelated_unread_element_does_not_mask_a_missing_one(tmp_path: Path) -> None:
    """<AlertConnectionString> is close to the missing <ConnectionString> yet valid: the real error stays."""
    text = sub("<ConnectionString>127.0.0.1:9998</ConnectionString>", "")(node_text())
    path = write_node_config(tmp_path, text)
    with pytest.raises(ConfigError, match=r"<OutputSettings>: missing mandatory element <ConnectionString>$"):
        load_node_config(str(path))


def test_documented_unused_and_disabled_elements_are_accepted(tmp_path: Path) -> None:
    """CyberTrace's ResourcesIP and LicensePath/LicenseDirPath are accepted; a disabled section is not read."""
    text = sub("<Database>", "<ResourcesIP>10.0.0.1</ResourcesIP><Database>")(node_text())
    text = sub("  <Cluster>\n", '  <Cluster enabled="false">\n    <Anything at="all"/>\n')(text)
    assert load_node_config(str(write_node_config(tmp_path, text))).cluster is None
    text = sub("<HTTPServer>", '<HTTPServer enabled="false"><Junk/>')(text)
    config = load_node_config(str(write_node_config(tmp_path, text)))
    assert config.http is None and config.cluster is None
    # the section's own name is still checked
    misspelt = text.replace("<Cluster enabled", "<Clustr enabled").replace("</Cluster>", "</Clustr>")
    with pytest.raises(ConfigError, match=r"<Clustr>: unknown element in <Configuration> \(did you mean <Cluster>"):
        load_node_config(str(write_node_config(tmp_path, misspelt)))
    text = sub("</Config>", "<LicenseDirPath>licenses</LicenseDirPath></Config>")(balancer_text())
    load_balancer_config(str(write_balancer_config(tmp_path, text)))


def test_cluster_settings_set_with_a_misspelt_attribute_is_refused_naming_the_revision(tmp_path: Path) -> None:
    """``threatgate cluster settings set ... @confidance 50``: the Control validates the revision this way."""
    conf = write_node_config(tmp_path, (EXAMPLES / "node.conf").read_text(encoding="utf-8"))
    shared = extract_settings(read_xml(str(EXAMPLES / "node.conf")))
    shared = set_value(shared, "Feeds/Feed[@filename=feeds/ip_reputation.csv]/@confidance", "50")
    doc = SettingsDocument.create("c1", 7, 1, 0.0, make_payload(shared, {"suppliers": [], "tags": []}))
    with pytest.raises(SettingsRejected) as info:
        validate_document(read_xml(str(conf)), doc)
    line = line_of(shared, "confidance")
    assert info.value.detail == (
        f"invalid settings: {conf}#settings-r7:{line}: <Feed>: unknown attribute 'confidance' "
        "(did you mean 'confidence'?)"
    )


def test_cluster_settings_with_a_misspelt_element_are_refused(tmp_path: Path) -> None:
    conf = write_node_config(tmp_path, (EXAMPLES / "node.conf").read_text(encoding="utf-8"))
    shared = extract_settings(read_xml(str(EXAMPLES / "node.conf")))
    shared = shared.replace("</RegExps>", "<Sourse id='x'/></RegExps>")
    with pytest.raises(ConfigError, match=r"<Sourse>: unknown element in <RegExps> \(did you mean <Source>\?\)"):
        node_config_from_xml(merge_settings(read_xml(str(conf)), shared, f"{conf}#settings-r8"))


# -- the mechanism -------------------------------------------------------------------------------


def walk(node: Node) -> Iterator[Node]:
    yield node
    for child in node.children:
        yield from walk(child)


@pytest.mark.parametrize("kind", ["node", "balancer"])
def test_no_two_attributes_of_one_element_are_alike(tmp_path: Path, kind: str) -> None:
    """What makes reporting a misspelling in place of a reader's error safe (xml.first_misspelling)."""
    if kind == "node":
        root = read_xml(str(write_node_config(tmp_path, node_text())))
        node_config_from_xml(root)
    else:
        root = parse_xml(balancer_text().encode(), str(tmp_path / "kl_balancer.conf"))
        balancer_config_from_xml(root)
    for node in walk(root):
        assert isinstance(node.attrs, Attributes)
        for name in node.attrs.asked:
            close = difflib.get_close_matches(name, node.attrs.asked - {name}, cutoff=TYPO_CUTOFF)
            assert not close, f"<{node.tag}>: attributes {name!r} and {close} are too alike"


# -- threatgate validate -------------------------------------------------------------------------


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(THREATGATE), *args], capture_output=True, text=True, timeout=60, check=False)


def test_cli_validate_refuses_a_misspelt_node_element(tmp_path: Path) -> None:
    text = sub("<ScannersCount>9</ScannersCount>", "<ScanerCount>9</ScanerCount>")(node_text())
    path = write_node_config(tmp_path, text)
    result = run("validate", str(path))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        f"{path}:{line_of(text, '<ScanerCount>')}: <ScanerCount>: unknown element in <ServiceSettings> "
        "(did you mean <ScannersCount>?)\n"
    )


def test_cli_validate_refuses_a_misspelt_balancer_attribute(tmp_path: Path) -> None:
    text = sub('api_port="10444" enabled="true"', 'api_port="10444" weigth="3"')(balancer_text())
    path = write_balancer_config(tmp_path, text)
    result = run("validate", str(path))
    assert (result.returncode, result.stdout) == (2, "")
    line = line_of(text, "weigth")
    assert result.stderr == f"{path}:{line}: <Instance>: unknown attribute 'weigth' (did you mean 'weight'?)\n"


# -- --log-level ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["node", "balancer"])
@pytest.mark.parametrize("level", ["warn", "critical", "10", "verbose", ""])
def test_cli_log_level_refuses_an_unknown_name_listing_the_valid_ones(tmp_path: Path, command: str, level: str) -> None:
    result = run(command, "--config", str(tmp_path / "x.conf"), "--log-level", level)
    assert result.returncode == 2
    assert f"Invalid value for '--log-level': {level!r} is not one of " in result.stderr
    assert "'err', 'war', 'inf', 'dbg', 'error', 'warning', 'info', 'debug'" in result.stderr
    assert "invalid configuration" not in result.stderr  # refused before anything else
