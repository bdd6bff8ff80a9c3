"""Tests for threatgate.config.node (with config.xml and config.common underneath): load or fail with file:line."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.config.configs import line_of
from tests.config.configs import write_node_config as write_config
from threatgate.config.common import Address
from threatgate.config.node import DEFAULT_MAX_EVENT_SIZE, NodeConfig, RuleType, load_node_config, resolve_workers
from threatgate.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
EXAMPLE_CONF = EXAMPLES / "node.conf"
THREATGATE = Path(sys.executable).parent / "threatgate"


def example_text() -> str:
    return EXAMPLE_CONF.read_text(encoding="utf-8")


def replace_once(old: str, new: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert old in text, f"{old!r} not in the example config"
        return text.replace(old, new, 1)

    return edit


def remove_block(start: str, end: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        i, j = text.index(start), text.index(end)
        return text[:i] + text[j:]

    return edit


# -- the example --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example() -> NodeConfig:
    return load_node_config(str(EXAMPLE_CONF))


def test_NodeConfig_example_loads_input(example: NodeConfig) -> None:
    assert example.input.listen == Address("127.0.0.1", 9999)
    assert example.input.event_delimiter is None
    assert example.input.max_event_size == DEFAULT_MAX_EVENT_SIZE
    assert [s.id for s in example.input.sources] == ["default", "dns"]
    default, dns = example.input.sources
    assert [(r.name, r.type, r.extract_all) for r in default.rules] == [
        ("REQ", RuleType.CONTEXT, False),
        ("RE_URL", RuleType.URL, True),
        ("RE_IP", RuleType.IP, True),
        ("RE_MD5", RuleType.MD5, False),
    ]
    assert default.rules[0].line == 9
    assert dns.hostnames == frozenset({"dns01"})
    assert [p.pattern for p in dns.ignore] == [r"query=localhost\b"]
    assert [r.name for r in dns.rules] == ["RE_DOMAIN"]
    assert example.rule_names == frozenset({"REQ", "RE_URL", "RE_IP", "RE_MD5", "RE_DOMAIN"})


def test_NodeConfig_example_loads_output_feeds_service(example: NodeConfig) -> None:
    out = example.output
    assert out.destination == Address("127.0.0.1", 9998)
    assert out.event_format.startswith("%REQ% category=%Category%")
    assert out.record_field_format == "%ParamName%=%ParamValue%"
    assert out.actionable_field_format == "%ParamName%:%ParamValue%"
    assert out.finished_format == "%REQ% LookupFinished"
    assert out.finished_enabled is True
    assert out.alert_format == "%Date% alert=%Alert%%RecordContext%"
    assert out.alert_destination is None  # enabled="false"
    feeds = example.feeds
    assert feeds.update_frequency == 30
    assert feeds.per_scan_detect_limit == 0
    assert [f.name for f in feeds.feeds] == [
        "malicious_urls.json",
        "ip_reputation.csv",
        "malicious_hashes.json",
        "botnet_domains.json",
        "false_positives.json",
        "internal_ti.json",
        "stix_bundle.json",
        "misp",
    ]
    by_name = {f.name: f for f in feeds.feeds}
    assert by_name["ip_reputation.csv"].format == "csv"
    assert by_name["ip_reputation.csv"].confidence == 80
    assert by_name["false_positives.json"].supplier == "FalsePositive"
    assert by_name["false_positives.json"].category == "FalsePositive"
    assert by_name["internal_ti.json"].supplier == "InternalTI"
    assert all(Path(f.path).is_absolute() and Path(f.path).exists() for f in feeds.feeds)
    assert by_name["misp"].format == "misp" and Path(by_name["misp"].path).is_dir()
    assert example.service.scanners_count == 9


def test_NodeConfig_drain_timeout(example: NodeConfig, tmp_path: Path) -> None:
    assert example.service.drain_timeout == 10.0  # the default: the example does not write it
    scanners = "<ScannersCount>9</ScannersCount>"
    edit = replace_once(scanners, scanners + "<DrainTimeout>3</DrainTimeout>")
    config = load_node_config(str(write_config(tmp_path, edit(example_text()))))
    assert config.service.drain_timeout == 3.0


def test_NodeConfig_summary_is_one_line(example: NodeConfig) -> None:
    summary = example.summary()
    assert "\n" not in summary
    assert "node config OK" in summary
    assert "5 rule(s)" in summary and "8/8 feed(s) enabled" in summary


def test_NodeConfig_is_frozen(example: NodeConfig) -> None:
    with pytest.raises(Exception, match="frozen"):
        example.service.scanners_count = 3  # type: ignore[misc]


def test_NodeConfig_feed_paths_resolve_relative_to_config_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, example_text())
    config = load_node_config(str(path))
    assert {Path(f.path).parent for f in config.feeds.feeds} == {tmp_path / "feeds"}


def test_NodeConfig_event_delimiter_and_max_event_size(tmp_path: Path) -> None:
    text = replace_once(
        "<ConnectionString>127.0.0.1:9999</ConnectionString>",
        "<ConnectionString>127.0.0.1:9999</ConnectionString><EventDelimiter>;</EventDelimiter>"
        "<MaxEventSize>4096</MaxEventSize>",
    )(example_text())
    config = load_node_config(str(write_config(tmp_path, text)))
    assert config.input.event_delimiter is not None
    assert config.input.event_delimiter.pattern == ";"
    assert config.input.max_event_size == 4096


def test_NodeConfig_workers_default_auto_number_and_resolution(tmp_path: Path) -> None:
    assert load_node_config(str(EXAMPLE_CONF)).scan.workers == "auto"
    end = "</Configuration>"
    for raw, want in (("auto", "auto"), (" AUTO ", "auto"), ("3", 3), ("64", 64)):
        text = example_text().replace(end, f"<ScanSettings><Workers>{raw}</Workers></ScanSettings>{end}")
        config = load_node_config(str(write_config(tmp_path, text)))
        assert config.scan.workers == want
        assert f"Workers {want}" in config.summary()
    assert resolve_workers("auto", 2) == 2
    assert resolve_workers("auto", 0) == 1
    assert resolve_workers("auto", 500) == 64
    assert resolve_workers(3, 2) == 3


@pytest.mark.parametrize("raw", ["0", "65", "two", ""])
def test_NodeConfig_workers_out_of_range_is_an_error_with_its_line(tmp_path: Path, raw: str) -> None:
    end = "</Configuration>"
    text = example_text().replace(end, f"<ScanSettings>\n<Workers>{raw}</Workers></ScanSettings>{end}")
    with pytest.raises(ConfigError, match="Workers") as info:
        load_node_config(str(write_config(tmp_path, text)))
    assert f":{line_of(text, '<Workers>')}:" in str(info.value)


# -- bad configs --------------------------------------------------------------------------------

# (id, edit of the example text, needle locating the expected line, element, problem fragment)
BAD_CONFIGS: list[tuple[str, Callable[[str], str], str, str, str]] = [
    (
        "missing-InputSettings",
        remove_block("  <InputSettings>", "  <OutputSettings>"),
        "<Configuration>",
        "Configuration",
        "missing mandatory element <InputSettings>",
    ),
    (
        "missing-input-ConnectionString",
        replace_once("<ConnectionString>127.0.0.1:9999</ConnectionString>", ""),
        "<InputSettings>",
        "InputSettings",
        "missing mandatory element <ConnectionString>",
    ),
    (
        "missing-output-ConnectionString",
        replace_once("<ConnectionString>127.0.0.1:9998</ConnectionString>", ""),
        "<OutputSettings>",
        "OutputSettings",
        "missing mandatory element <ConnectionString>",
    ),
    (
        "port-0",  # an address to connect to: a listen address may be 0 (the kernel picks the port)
        replace_once("127.0.0.1:9998", "127.0.0.1:0"),
        "127.0.0.1:0",
        "ConnectionString",
        "bad port '0'",
    ),
    (
        "port-70000",
        replace_once("127.0.0.1:9999", "127.0.0.1:70000"),
        "127.0.0.1:70000",
        "ConnectionString",
        "bad port '70000'",
    ),
    (
        "port-abc",
        replace_once("127.0.0.1:9998", "127.0.0.1:abc"),
        "127.0.0.1:abc",
        "ConnectionString",
        "bad port 'abc'",
    ),
    (
        "address-without-port",
        replace_once("127.0.0.1:9999", "localhost"),
        ">localhost<",
        "ConnectionString",
        "expected <host>:<port>",
    ),
    (
        "regex-does-not-compile",
        replace_once(r"md5=([\da-fA-F]{32})", "md5=([0-9"),
        "<RE_MD5",
        "RE_MD5",
        "does not compile",
    ),
    (
        "unknown-rule-type",
        replace_once('<RE_MD5 type="MD5"', '<RE_MD5 type="FILEHASH"'),
        "<RE_MD5",
        "RE_MD5",
        "unknown rule type 'FILEHASH'",
    ),
    (
        "bad-extract",
        replace_once('extract="first"', 'extract="some"'),
        "<RE_MD5",
        "RE_MD5",
        "extract='some'",
    ),
    (
        "reserved-rule-name",
        lambda t: t.replace("<RE_MD5 ", "<Category ").replace("</RE_MD5>", "</Category>"),
        "<Category ",
        "Category",
        "reserved",
    ),
    (
        "duplicate-rule",
        lambda t: t.replace('<RE_MD5 type="MD5"', '<RE_URL type="MD5"').replace("</RE_MD5>", "</RE_URL>"),
        '<RE_URL type="MD5"',
        "RE_URL",
        "defined twice",
    ),
    (
        "duplicate-source",
        replace_once('<Source id="dns" hostname="dns01">', '<Source id="default" hostname="dns01">'),
        'hostname="dns01"',
        "Source",
        "defined twice",
    ),
    (
        "missing-default-source",
        replace_once('<Source id="default">', '<Source id="proxy">'),
        "<RegExps>",
        "RegExps",
        'a <Source id="default"> is mandatory',
    ),
    (
        "missing-feed-file",
        replace_once("feeds/malicious_hashes.json", "feeds/no_such_feed.json"),
        "no_such_feed.json",
        "Feed",
        "does not exist",
    ),
    (
        "bad-feed-supplier",
        replace_once('supplier="InternalTI"', 'supplier="Partner"'),
        'supplier="Partner"',
        "Feed",
        "supplier='Partner'",
    ),
    (
        "bad-confidence",
        replace_once('confidence="80"', 'confidence="101"'),
        'confidence="101"',
        "Feed",
        "confidence=101",
    ),
    (
        "ScannersCount-0",
        replace_once("<ScannersCount>9</ScannersCount>", "<ScannersCount>0</ScannersCount>"),
        "<ScannersCount>",
        "ScannersCount",
        "ScannersCount=0: expected 1-20",
    ),
    (
        "ScannersCount-21",
        replace_once("<ScannersCount>9</ScannersCount>", "<ScannersCount>21</ScannersCount>"),
        "<ScannersCount>",
        "ScannersCount",
        "ScannersCount=21: expected 1-20",
    ),
    (
        "ScannersCount-not-a-number",
        replace_once("<ScannersCount>9</ScannersCount>", "<ScannersCount>nine</ScannersCount>"),
        "<ScannersCount>",
        "ScannersCount",
        "expected an integer",
    ),
    (
        "DrainTimeout-0",
        replace_once(
            "<ScannersCount>9</ScannersCount>", "<ScannersCount>9</ScannersCount><DrainTimeout>0</DrainTimeout>"
        ),
        "<DrainTimeout>",
        "DrainTimeout",
        "DrainTimeout=0: expected 1-3600",
    ),
    (
        "DrainTimeout-fraction",
        replace_once(
            "<ScannersCount>9</ScannersCount>", "<ScannersCount>9</ScannersCount><DrainTimeout>2.5</DrainTimeout>"
        ),
        "<DrainTimeout>",
        "DrainTimeout",
        "expected an integer",
    ),
    (
        "unknown-pattern-in-EventFormat",
        replace_once("source=%SourceId%", "source=%Sauce%"),
        "<EventFormat>",
        "EventFormat",
        "unknown pattern %Sauce%",
    ),
    (
        "unknown-pattern-in-FinishedEventFormat",
        replace_once("%REQ% LookupFinished", "%Nope% LookupFinished"),
        "<FinishedEventFormat",
        "FinishedEventFormat",
        "unknown pattern %Nope%",
    ),
    (
        "empty-EventFormat",
        lambda t: t[: t.index("<EventFormat>")] + "<EventFormat>  </EventFormat>" + t[t.index("</EventFormat>") + 14 :],
        "<EventFormat>",
        "EventFormat",
        "must not be empty",
    ),
    (
        "repeated-ScannersCount",
        replace_once(
            "<ScannersCount>9</ScannersCount>", "<ScannersCount>9</ScannersCount>\n<ScannersCount>3</ScannersCount>"
        ),
        "<ScannersCount>3",
        "ScannersCount",
        "may appear only once",
    ),
    (
        "delimiter-matches-empty",
        replace_once(
            "<ConnectionString>127.0.0.1:9999</ConnectionString>",
            "<ConnectionString>127.0.0.1:9999</ConnectionString>\n<EventDelimiter>;*</EventDelimiter>",
        ),
        "<EventDelimiter>",
        "EventDelimiter",
        "matches the empty string",
    ),
    (
        "unknown-top-level-element",
        replace_once("  <ServiceSettings>", "  <Bogus/>\n  <ServiceSettings>"),
        "<Bogus/>",
        "Bogus",
        "unknown element",
    ),
    (
        "unknown-element-in-RegExps",
        replace_once("    </RegExps>", "      <Sorce id='x'/>\n    </RegExps>"),
        "<Sorce",
        "Sorce",
        "unknown element in <RegExps> (did you mean <Source>?)",
    ),
    (
        "unknown-element-in-Feeds",
        replace_once("  </Feeds>", "    <Fed filename='x.json'/>\n  </Feeds>"),
        "<Fed ",
        "Fed",
        "unknown element in <Feeds> (did you mean <Feed>?)",
    ),
    (
        "unknown-element-in-NormalizingRules",
        replace_once("<Ignore>query=localhost\\b</Ignore>", "<Drop>x</Drop>"),
        "<Drop>",
        "Drop",
        "unknown element",
    ),
]


@pytest.mark.parametrize(
    ("edit", "needle", "element", "problem"),
    [pytest.param(e, n, el, p, id=case) for case, e, n, el, p in BAD_CONFIGS],
)
def test_NodeConfig_bad_config_error_has_file_line_element_problem(
    tmp_path: Path, edit: Callable[[str], str], needle: str, element: str, problem: str
) -> None:
    text = edit(example_text())
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_node_config(str(path))
    exc = info.value
    line = line_of(text, needle)
    message = str(exc)
    assert message.startswith(f"{path}:{line}: <{element}>: "), message
    assert problem in message
    assert (exc.path, exc.line, exc.element) == (str(path), line, element)


def test_NodeConfig_not_well_formed_xml(tmp_path: Path) -> None:
    text = replace_once("</RegExps>", "</RegExp>")(example_text())
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_node_config(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}:{line_of(text, '</RegExp>')}: ")
    assert "not well-formed XML" in message
    assert "mismatched tag" in message


def test_NodeConfig_empty_file_is_not_well_formed(tmp_path: Path) -> None:
    path = write_config(tmp_path, "")
    with pytest.raises(ConfigError, match="not well-formed XML"):
        load_node_config(str(path))


def test_NodeConfig_wrong_root_element(tmp_path: Path) -> None:
    path = write_config(tmp_path, "<?xml version='1.0'?>\n\n<Balancer/>\n")
    with pytest.raises(ConfigError) as info:
        load_node_config(str(path))
    assert str(info.value).startswith(f"{path}:3: <Balancer>: root element must be <Configuration>")


def test_NodeConfig_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.conf"
    with pytest.raises(ConfigError) as info:
        load_node_config(str(path))
    assert str(info.value).startswith(f"{path}: cannot read file")
    assert info.value.line == 0


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE Configuration [
  <!ENTITY lol "lol">
  <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
  <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
  <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
  <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
  <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
  <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
  <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
  <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
  <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<Configuration><InputSettings><ConnectionString>&lol9;</ConnectionString></InputSettings></Configuration>
"""


def test_NodeConfig_doctype_entity_billion_laughs_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, BILLION_LAUGHS)
    with pytest.raises(ConfigError) as info:
        load_node_config(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}")
    assert "refused unsafe XML construct" in message
    assert "EntitiesForbidden" in message
    assert "lol" in message
    assert len(message) < 1000  # nothing was expanded


def test_NodeConfig_external_entity_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET-127.0.0.1:1234")
    text = (
        '<?xml version="1.0"?>\n'
        f'<!DOCTYPE Configuration [<!ENTITY xxe SYSTEM "file://{secret}">]>\n'
        + example_text().split("\n", 1)[1].replace("127.0.0.1:9999", "&xxe;")
    )
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_node_config(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}")
    assert "refused unsafe XML construct" in message
    assert "xxe" in message
    assert "TOPSECRET" not in message


def test_NodeConfig_error_lines_point_at_the_right_element_in_a_long_file(tmp_path: Path) -> None:
    # Comments and blank lines above must not shift the reported line.
    text = example_text().replace("<Configuration>", "<!--\n\n\n-->\n<Configuration>\n\n", 1)
    text = replace_once("<ScannersCount>9</ScannersCount>", "<ScannersCount>99</ScannersCount>")(text)
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_node_config(str(path))
    assert info.value.line == line_of(text, "<ScannersCount>99") == 48


# -- the CLI ------------------------------------------------------------------------------------


def run_validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(THREATGATE), "validate", str(path)], capture_output=True, text=True, timeout=60, check=False
    )


def test_NodeConfig_cli_validate_good_file() -> None:
    result = run_validate(EXAMPLE_CONF)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "node config OK" in lines[0]
    assert str(EXAMPLE_CONF) in lines[0]
    assert [line.split(":")[0] for line in lines[1:]] == ["  events 127.0.0.1", "  api 127.0.0.1"]  # net/tlscheck.py


def test_NodeConfig_cli_validate_bad_file(tmp_path: Path) -> None:
    text = replace_once("127.0.0.1:9999", "127.0.0.1:70000")(example_text())
    path = write_config(tmp_path, text)
    result = run_validate(path)
    assert result.returncode == 2
    assert f"{path}:{line_of(text, '70000')}:" in result.stderr
    assert "bad port" in result.stderr
    assert result.stdout == ""


def test_NodeConfig_cli_validate_reports_a_feed_that_does_not_load(tmp_path: Path) -> None:
    text = example_text()
    path = write_config(tmp_path, text)
    urls = tmp_path / "feeds" / "malicious_urls.json"
    urls.write_text(urls.read_text()[:-20])  # truncated, as a crashed download leaves it
    hashes = tmp_path / "feeds" / "malicious_hashes.json"
    hashes.write_bytes(b"\xff\xfe not a feed")
    result = run_validate(path)
    assert result.returncode == 2, result
    assert result.stdout == ""
    errors = result.stderr.splitlines()
    assert errors == [
        f"{path}:{line_of(text, 'feeds/malicious_urls.json')}: <Feed> malicious_urls.json: does not load: "
        f"{urls}: truncated JSON feed: it does not end with ']'",
        f"{path}:{line_of(text, 'feeds/malicious_hashes.json')}: <Feed> malicious_hashes.json: does not load: "
        f"{hashes}: not UTF-8 (byte 0)",
    ]


def test_NodeConfig_cli_validate_warns_of_malformed_records_and_skips_disabled_feeds(tmp_path: Path) -> None:
    text = replace_once(
        '<Feed filename="feeds/ip_reputation.csv" enabled="true"',
        '<Feed filename="feeds/ip_reputation.csv" enabled="false"',
    )(example_text())
    path = write_config(tmp_path, text)
    (tmp_path / "feeds" / "ip_reputation.csv").write_text("not, a feed\n")  # disabled: not looked at
    urls = tmp_path / "feeds" / "malicious_urls.json"
    urls.write_text('[{"url": "http://ok.example/a"}, {"url": "not a url at all"}, 7]')
    result = run_validate(path)
    assert result.returncode == 0, result.stderr
    assert "node config OK" in result.stdout
    assert result.stderr.splitlines() == [
        f"{path}:{line_of(text, 'feeds/malicious_urls.json')}: <Feed> malicious_urls.json: warning: "
        "2 malformed record(s) will be skipped, e.g. record 2: url='not a url at all' is not a valid indicator; "
        "record 3: expected an object, got int"
    ]


def test_NodeConfig_cli_validate_a_missing_feed_file_is_an_error(tmp_path: Path) -> None:
    text = example_text()
    path = write_config(tmp_path, text)
    (tmp_path / "feeds" / "botnet_domains.json").unlink()
    result = run_validate(path)
    assert result.returncode == 2
    assert f"{path}:{line_of(text, 'feeds/botnet_domains.json')}: <Feed>: feed file " in result.stderr
    assert "botnet_domains.json does not exist" in result.stderr
