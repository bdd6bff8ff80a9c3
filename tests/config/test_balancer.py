"""Tests for threatgate.config.balancer: kl_balancer.conf loads into BalancerConfig or fails with file:line."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.config.configs import line_of
from tests.config.configs import write_balancer_config as write
from threatgate.config.balancer import DEFAULT_ALLOWED, MAX_SCANNERS, BalancerConfig, load_balancer_config
from threatgate.config.node import DEFAULT_MAX_EVENT_SIZE
from threatgate.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "balancer.conf"


def example_text() -> str:
    return EXAMPLE.read_text(encoding="utf-8")


def edited(old: str, new: str, count: int = 1) -> str:
    text = example_text()
    assert text.count(old) >= count, f"{old!r} not in the example config"
    return text.replace(old, new, count)


def load_error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_balancer_config(str(path))
    err = info.value
    assert err.path == str(path)
    assert str(err).startswith(f"{path}:{err.line}: <{err.element}>: "), str(err)
    return err


# -- the example ----------------------------------------------------------------------------------


def test_example_loads_with_its_summary_line() -> None:
    config = load_balancer_config(str(EXAMPLE))
    assert config.summary() == (
        f"{EXAMPLE}: balancer config OK: events on 127.0.0.1:9999, API on port 8443, alerts on port 9997, "
        "2/2 instance(s) enabled, scanners_count 20, 2 allowed request(s)"
    )
    assert (config.listen_host, config.matching_port, config.api_port, config.cybertrace_port) == (
        "127.0.0.1",
        9999,
        8443,
        9997,
    )
    assert [(i.key, i.api_port, i.enabled, i.weight) for i in config.instances] == [
        ("127.0.0.1:10001", 10443, True, 1),
        ("127.0.0.1:10002", 10444, True, 1),
    ]
    assert [i.line for i in config.instances] == [line_of(example_text(), 'matching_port="1000' + n) for n in "12"]
    assert [a.text for a in config.allowed] == ["POST /api/1.1/lookup", "GET /api/v.1.1/suppliers"]
    # The extension elements in the example are the documented defaults.
    defaults = BalancerConfig.model_fields
    assert config.health == defaults["health"].default
    assert (config.health.interval, config.health.timeout, config.health.rise, config.health.fall) == (2, 2, 2, 3)
    assert config.reply_timeout == defaults["reply_timeout"].default == 30
    assert config.max_inflight_events == defaults["max_inflight_events"].default == 20_000
    assert config.max_pending_events == defaults["max_pending_events"].default == 100_000
    assert config.output is None and config.event_delimiter is None
    assert config.max_event_size == DEFAULT_MAX_EVENT_SIZE
    # Relative paths are relative to the file.
    assert config.cert_path == str(EXAMPLE.parent / "certs" / "balancer.pem")
    assert config.cert_dir == str(EXAMPLE.parent / "pins")


def test_extension_elements_are_read(tmp_path: Path) -> None:
    text = edited(
        '<HealthCheck interval="2" timeout="2" rise="2" fall="3"/>',
        '<HealthCheck interval="1" timeout="5" rise="1" fall="4"/>'
        "<MaxEventSize>1024</MaxEventSize><HandshakeTimeout>3</HandshakeTimeout><DrainTimeout>4</DrainTimeout>"
        "<EventDelimiter>&lt;\\d+&gt;</EventDelimiter>",
    )
    text = text.replace(
        '<OutputConnectionString enabled="false">127.0.0.1:9998<',
        '<OutputConnectionString enabled="true">127.0.0.1:7000<',
    )
    text = text.replace("<ReplyTimeout>30<", "<ReplyTimeout>7<").replace(">20000<", ">50<").replace(">100000<", ">60<")
    config = load_balancer_config(str(write(tmp_path, text)))
    assert (config.health.interval, config.health.timeout, config.health.rise, config.health.fall) == (1, 5, 1, 4)
    assert (config.reply_timeout, config.max_inflight_events, config.max_pending_events) == (7, 50, 60)
    assert (config.max_event_size, config.handshake_timeout, config.drain_timeout) == (1024, 3, 4)
    assert config.output is not None and (config.output.host, config.output.port) == ("127.0.0.1", 7000)
    assert config.event_delimiter is not None and config.event_delimiter.pattern == r"<\d+>"


def test_disabled_instance_and_weight(tmp_path: Path) -> None:
    text = edited('api_port="10444" enabled="true"', 'api_port="10444" enabled="false" weight="3"')
    config = load_balancer_config(str(write(tmp_path, text)))
    assert [(i.enabled, i.weight) for i in config.instances] == [(True, 1), (False, 3)]
    assert "1/2 instance(s) enabled" in config.summary()


def test_instance_connections(tmp_path: Path) -> None:
    """``connections``: the event connections (lanes) per instance; absent or ``auto``: what the node says."""
    text = edited('api_port="10444" enabled="true"', 'api_port="10444" enabled="true" connections="4"')
    config = load_balancer_config(str(write(tmp_path, text)))
    assert [i.connections for i in config.instances] == ["auto", 4]
    text = edited('api_port="10444" enabled="true"', 'api_port="10444" enabled="true" connections=" Auto "')
    assert load_balancer_config(str(write(tmp_path, text))).instances[1].connections == "auto"


@pytest.mark.parametrize("value", ["0", "65", "two", "-1", "2.5", ""])
def test_bad_instance_connections(tmp_path: Path, value: str) -> None:
    text = edited('api_port="10444" enabled="true"', f'api_port="10444" enabled="true" connections="{value}"')
    err = load_error(tmp_path, text)
    assert (err.line, err.element) == (line_of(text, "10444"), "Instance")
    assert err.problem == (
        f"connections={value!r}: expected auto (as many as the node's /readyz says) or a number 1-64"
    )


def test_default_allowed_requests_when_absent(tmp_path: Path) -> None:
    text = re.sub(r"\s*<AllowedRequests>.*</AllowedRequests>", "", example_text(), flags=re.S)
    config = load_balancer_config(str(write(tmp_path, text)))
    assert [a.text for a in config.allowed] == [f"{m} {p}" for m, p in DEFAULT_ALLOWED]
    assert [a.method for a in config.allowed] == ["POST", "GET", "GET", "GET", "GET"]
    assert config.summary().endswith("5 allowed request(s)")


def test_allowed_request_method_is_case_insensitive(tmp_path: Path) -> None:
    config = load_balancer_config(str(write(tmp_path, edited('method="POST"', 'method="post"'))))
    assert config.allowed[0].text == "POST /api/1.1/lookup"


# -- errors: file:line, element, what is wrong -------------------------------------------------------

BALANCER_LINE = line_of(example_text(), "<Balancer ")


@pytest.mark.parametrize("attr", ["matching_port", "api_port", "cybertrace_port", "scanners_count"])
def test_missing_mandatory_balancer_attribute(tmp_path: Path, attr: str) -> None:
    text = re.sub(rf' {attr}="\d+"', "", example_text(), count=1)
    assert text != example_text()
    err = load_error(tmp_path, text)
    assert (err.line, err.element, err.problem) == (BALANCER_LINE, "Balancer", f"{attr} is mandatory")


@pytest.mark.parametrize(
    ("attr", "value", "problem"),
    [
        ("matching_port", "65536", "matching_port=65536: expected 0-65535"),
        ("api_port", "65536", "api_port=65536: expected 0-65535"),
        ("cybertrace_port", "70000", "cybertrace_port=70000: expected 0-65535"),
        ("scanners_count", str(MAX_SCANNERS + 1), "scanners_count=101: expected 1-100"),
        ("scanners_count", "0", "scanners_count=0: expected 1-100"),
        ("matching_port", "http", "matching_port='http': expected an integer"),
    ],
)
def test_balancer_attribute_out_of_range(tmp_path: Path, attr: str, value: str, problem: str) -> None:
    text = re.sub(rf' {attr}="\d+"', f' {attr}="{value}"', example_text(), count=1)
    err = load_error(tmp_path, text)
    assert (err.line, err.element, err.problem) == (BALANCER_LINE, "Balancer", problem)


def test_balancer_ports_must_differ(tmp_path: Path) -> None:
    err = load_error(tmp_path, edited('api_port="8443"', 'api_port="9999"'))
    assert (err.line, err.element) == (BALANCER_LINE, "Balancer")
    assert "matching_port, api_port and cybertrace_port must differ" in err.problem


def test_empty_listen_address(tmp_path: Path) -> None:
    err = load_error(tmp_path, edited('scanners_count="20">127.0.0.1</Balancer>', 'scanners_count="20"> </Balancer>'))
    assert (err.line, err.element) == (BALANCER_LINE, "Balancer")
    assert err.problem.startswith("empty listen address")


def test_duplicate_instance(tmp_path: Path) -> None:
    text = edited('matching_port="10002" api_port="10444"', 'matching_port="10001" api_port="10444"')
    err = load_error(tmp_path, text)
    first = line_of(text, 'matching_port="10001" api_port="10443"')
    assert (err.line, err.element) == (first + 1, "Instance")
    assert err.problem == f"instance 127.0.0.1:10001 listed twice (first at line {first})"


def test_empty_instance_text(tmp_path: Path) -> None:
    text = edited('enabled="true">127.0.0.1</Instance>\n  </Instances>', 'enabled="true">  </Instance>\n  </Instances>')
    err = load_error(tmp_path, text)
    assert (err.line, err.element) == (line_of(text, 'matching_port="10002"'), "Instance")
    assert err.problem.startswith("empty instance address")


@pytest.mark.parametrize(
    ("old", "new", "needle", "element", "problem"),
    [
        ('enabled="true">127.0.0.1</Instance>', 'enabled="true" weight="0">127.0.0.1</Instance>', "10001",
         "Instance", "weight=0: expected 1-100"),
        ('matching_port="10001"', 'matching_port="70000"', "70000", "Instance",
         "matching_port=70000: expected 1-65535"),
        ('matching_port="10001" ', "", 'api_port="10443"', "Instance", "matching_port is mandatory"),
        ('enabled="true">127.0.0.1</Instance>', 'enabled="maybe">127.0.0.1</Instance>', "10001", "Instance",
         "attribute enabled='maybe': expected true or false"),
    ],
)  # fmt: skip
def test_bad_instance_attribute(tmp_path: Path, old: str, new: str, needle: str, element: str, problem: str) -> None:
    text = edited(old, new)
    err = load_error(tmp_path, text)
    assert (err.line, err.element, err.problem) == (line_of(text, needle), element, problem)


def test_no_instance(tmp_path: Path) -> None:
    text = re.sub(r"<Instances>.*</Instances>", "<Instances>\n  </Instances>", example_text(), flags=re.S)
    err = load_error(tmp_path, text)
    assert (err.line, err.element) == (line_of(text, "<Instances>"), "Instances")
    assert err.problem == "no <Instance>: the balancer needs at least one node"


@pytest.mark.parametrize(
    ("edit", "needle", "element", "problem_start"),
    [
        (
            lambda t: t.replace("<CertDirPath>", "<Bogus/><CertDirPath>"),
            "<Bogus/>",
            "Bogus",
            "unknown element in <Config> (expected ",
        ),
        (
            lambda t: t.replace("<Instance ", "<Server/><Instance ", 1),
            "<Server/>",
            "Server",
            "unknown element in <Instances> (expected <Instance>)",
        ),
        (
            lambda t: t.replace('<Request method="POST"', '<Req method="POST"'),
            "<Req ",
            "Req",
            "unknown element in <AllowedRequests> (did you mean <Request>?)",
        ),
        (
            lambda t: t.replace("<ReplyTimeout>30</ReplyTimeout>", "<ReplyTimeout>30</ReplyTimeout>" * 2),
            "<ReplyTimeout>",
            "ReplyTimeout",
            "<ReplyTimeout> may appear only once",
        ),
        (lambda t: re.sub(r"\s*<Balancer .*</Balancer>", "", t), "<Config>", "Config", "missing mandatory element"),
        (lambda t: re.sub(r"\s*<Instances>.*</Instances>", "", t, flags=re.S), "<Config>", "Config", "missing"),
    ],
)
def test_unknown_repeated_or_missing_element(
    tmp_path: Path, edit: Callable[[str], str], needle: str, element: str, problem_start: str
) -> None:
    text = edit(example_text())
    err = load_error(tmp_path, text)
    assert (err.line, err.element) == (line_of(text, needle), element)
    assert err.problem.startswith(problem_start), err.problem
    if element == "Bogus":
        assert "HealthCheck" in err.problem and "Instances" in err.problem  # lists what is allowed


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ('method="POST"', 'method="FETCH"', "method='FETCH': expected one of DELETE, GET, HEAD, PATCH, POST, PUT"),
        ('method="POST" ', "", "method='': expected one of DELETE, GET, HEAD, PATCH, POST, PUT"),
        ('path="/api/1.1/lookup"', 'path="api/1.1/lookup"', "path='api/1.1/lookup': expected an absolute path"),
        ('path="/api/1.1/lookup"', 'path="/api/1.1/lookup?x=1"', "path='/api/1.1/lookup?x=1': expected an absolute"),
        ('path="/api/1.1/lookup"', 'path="/api/%2e%2e/lookup"', "path='/api/%2e%2e/lookup': expected an absolute"),
    ],
)
def test_bad_allowed_request(tmp_path: Path, old: str, new: str, problem: str) -> None:
    text = edited(old, new)
    err = load_error(tmp_path, text)
    assert (err.line, err.element) == (line_of(text, "lookup" if "path" in old else "/api/1.1/lookup"), "Request")
    assert err.problem.startswith(problem), err.problem


@pytest.mark.parametrize(
    ("old", "new", "element", "problem"),
    [
        ('interval="2"', 'interval="0"', "HealthCheck", "interval=0: expected 1-3600"),
        ('rise="2"', 'rise="101"', "HealthCheck", "rise=101: expected 1-100"),
        ("<ReplyTimeout>30<", "<ReplyTimeout>0<", "ReplyTimeout", "ReplyTimeout=0: expected 1-3600"),
        ("<MaxInflightEvents>20000<", "<MaxInflightEvents>lots<", "MaxInflightEvents", "MaxInflightEvents='lots'"),
        ("<MaxPendingEvents>100000<", "<MaxPendingEvents>0<", "MaxPendingEvents", "MaxPendingEvents=0: expected"),
    ],
)
def test_bad_extension_element(tmp_path: Path, old: str, new: str, element: str, problem: str) -> None:
    text = edited(old, new)
    err = load_error(tmp_path, text)
    assert (err.line, err.element) == (line_of(text, f"<{element}"), element)
    assert err.problem.startswith(problem), err.problem


def test_not_xml_and_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path, example_text().replace("</Instances>", ""))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:\d+: not well-formed XML"):
        load_balancer_config(str(path))
    with pytest.raises(ConfigError, match="kl_missing.conf"):
        load_balancer_config(str(tmp_path / "kl_missing.conf"))


# -- threatgate validate ---------------------------------------------------------------------------


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "threatgate", "validate", str(path)], capture_output=True, text=True, timeout=60
    )


def test_validate_cli_accepts_the_example() -> None:
    result = validate(EXAMPLE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == load_balancer_config(str(EXAMPLE)).summary()
    assert len(result.stdout.splitlines()) == 4  # then its ports: events, api, alerts (net/tlscheck.py)
    assert "balancer config OK" in result.stdout


def test_validate_warns_when_detections_of_plain_clients_have_nowhere_to_go(tmp_path: Path) -> None:
    """The example has the element switched off: valid (exit 0), with a warning on stderr; set, no warning."""
    result = validate(EXAMPLE)
    assert result.returncode == 0 and "balancer config OK" in result.stdout
    assert result.stderr == (
        f"{EXAMPLE}: warning: no enabled <OutputConnectionString>: detections of clients without X-KF-ReplyBack "
        "will be dropped (counted in threatgate_output_dropped_lines_total); set it to the SIEM's host:port, "
        "or have every client send X-KF-ReplyBack\n"
    )
    path = write(
        tmp_path, edited('<OutputConnectionString enabled="false">', '<OutputConnectionString enabled="true">')
    )
    result = validate(path)
    assert (result.returncode, result.stderr) == (0, "")
    assert load_balancer_config(str(path)).warnings() == []


def test_validate_cli_rejects_a_broken_balancer_config(tmp_path: Path) -> None:
    text = re.sub(r' scanners_count="\d+"', ' scanners_count="101"', example_text())
    path = write(tmp_path, text)
    result = validate(path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip() == f"{path}:{BALANCER_LINE}: <Balancer>: scanners_count=101: expected 1-100"


# -- <Drill>: the failover drill's canaries (threatgate drill) ------------------------------------------


def test_drill_canaries_are_read_with_their_lines(tmp_path: Path) -> None:
    assert load_balancer_config(str(EXAMPLE)).canaries == ()
    drill = (
        "<Drill>\n"
        '    <Canary expect="Malicious_URL">url=http://fakess123.nu</Canary>\n'
        '    <Canary expect=" Malicious_URL , IP_Reputation ">src=1.2.3.4 url=http://fakess123.nu</Canary>\n'
        '    <Canary expect="">url=http://example.org/</Canary>\n'
        "  </Drill>\n</Config>"
    )
    text = edited("</Config>", drill)
    config = load_balancer_config(str(write(tmp_path, text)))
    assert [(c.event, c.expect, c.line) for c in config.canaries] == [
        ("url=http://fakess123.nu", ("Malicious_URL",), line_of(text, 'expect="Malicious_URL"')),
        ("src=1.2.3.4 url=http://fakess123.nu", ("Malicious_URL", "IP_Reputation"), line_of(text, "IP_Reputation")),
        ("url=http://example.org/", (), line_of(text, 'expect=""')),
    ]


@pytest.mark.parametrize(
    ("drill", "element", "problem"),
    [
        ("<Drill/>", "Drill", "<Drill> without <Canary>: add at least one test event"),
        ("<Drill><Canary>url=x</Canary></Drill>", "Canary", 'missing expect="..."'),
        ('<Drill><Canary expect="X"> </Canary></Drill>', "Canary", "a canary is one event on one line"),
        ('<Drill><Canary expect="X">a&#10;b</Canary></Drill>', "Canary", "a canary is one event on one line"),
        ('<Drill><Canry expect="X">a</Canry></Drill>', "Canry", "unknown element in <Drill>"),
        ('<Drill><Canary expect="X" expected="Y">a</Canary></Drill>', "Canary", "unknown attribute 'expected'"),
    ],
)
def test_bad_drill_canaries(tmp_path: Path, drill: str, element: str, problem: str) -> None:
    err = load_error(tmp_path, edited("</Config>", drill + "</Config>"))
    assert err.element == element
    assert err.problem.startswith(problem), err.problem


def test_console_users(tmp_path: Path) -> None:
    good = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
    assert load_balancer_config(str(write(tmp_path, example_text()))).users == ()
    text = edited("</Config>", f'<Users><User name="ops" password_hash="{good}"/></Users></Config>')
    assert load_balancer_config(str(write(tmp_path, text))).users == (("ops", good),)
    bad = load_error(tmp_path, edited("</Config>", '<Users><User name="ops" password="x"/></Users></Config>'))
    assert "plaintext password attributes are refused" in bad.problem
    bad = load_error(tmp_path, edited("</Config>", '<Users><User name="ops" password_hash="x"/></Users></Config>'))
    assert "password_hash" in bad.problem
