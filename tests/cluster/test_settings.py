"""Tests for threatgate.cluster.settings: the settings document, its digest, and the shared XML.

The document tests pin what a receiving node checks before it looks at the content (shape, types,
digest, size) and that each refusal says what was wrong.  The XML tests pin the split between shared
and local elements: extract on one node, merge on another, and the node config that results.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import threatgate.cluster.settings as settings_module
from threatgate.cluster.settings import (
    FORMAT_VERSION,
    SettingsDocument,
    canonical_json,
    extract_settings,
    make_payload,
    merge_settings,
    parse_document,
    parse_settings_xml,
    payload_digest,
    set_value,
    to_xml,
)
from threatgate.config.node import NodeConfig, load_node_config, node_config_from_xml
from threatgate.config.xml import Node, parse_xml, read_xml
from threatgate.errors import ConfigError, SettingsRejected
from threatgate.node.auth import hash_password

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXAMPLE_CONF = EXAMPLES / "node.conf"
EMPTY_STATE: dict[str, Any] = {"suppliers": [], "tags": []}
PASSWORD_HASH = hash_password("s3cret")


def payload(config: str = "<Settings/>\n", **state: Any) -> dict[str, Any]:
    return make_payload(config, {**EMPTY_STATE, **state})


def good(**changes: Any) -> dict[str, Any]:
    """A valid document as JSON (revision 3, epoch 2), with top-level fields replaced by ``changes``."""
    raw = SettingsDocument.create("tg-test", 3, 2, 1_700_000_000.25, payload()).as_json()
    raw.update(changes)
    return raw


def with_payload(body: dict[str, Any]) -> dict[str, Any]:
    """A document carrying ``body`` with a correct digest: only the payload checks can refuse it."""
    return good(payload=body, sha256=payload_digest(body))


def refused(data: bytes | str | dict[str, Any]) -> SettingsRejected:
    with pytest.raises(SettingsRejected) as excinfo:
        parse_document(data)
    return excinfo.value


def without_lines(value: Any) -> Any:
    """A NodeConfig as plain data without element line numbers (they differ between file and document)."""
    if isinstance(value, NodeConfig):
        value = value.model_dump()
    if isinstance(value, dict):
        return {k: without_lines(v) for k, v in value.items() if k != "line"}
    if isinstance(value, list | tuple):
        return [without_lines(v) for v in value]
    return value


def line_of(text: str, needle: str) -> int:
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {text!r}")


def node_dir(base: Path, text: str | None = None) -> Path:
    """A node directory with the example feeds and a node.conf (the example's unless ``text``)."""
    base.mkdir(parents=True, exist_ok=True)
    shutil.copytree(EXAMPLES / "feeds", base / "feeds")
    conf = base / "node.conf"
    conf.write_text(text if text is not None else EXAMPLE_CONF.read_text(encoding="utf-8"), encoding="utf-8")
    return conf


# -- canonical JSON and the digest ------------------------------------------------------------------


def test_canonical_json_sorts_keys_at_every_level_without_whitespace() -> None:
    value = {"b": 1, "a": [True, None, {"d": 2.5, "c": "x"}]}
    assert canonical_json(value) == b'{"a":[true,null,{"c":"x","d":2.5}],"b":1}'


def test_canonical_json_is_utf8_not_escapes() -> None:
    value = {"k": 'é☃𝄞 "q" \\ \n'}
    assert canonical_json(value) == '{"k":"é☃𝄞 \\"q\\" \\\\ \\n"}'.encode()


def test_digest_does_not_depend_on_key_order() -> None:
    one = {"format": 1, "config": "<Settings/>", "suppliers": [{"name": "a", "x": 1}], "tags": []}
    two = {"tags": [], "suppliers": [{"x": 1, "name": "a"}], "config": "<Settings/>", "format": 1}
    assert list(one) != list(two)
    assert canonical_json(one) == canonical_json(two)
    assert payload_digest(one) == payload_digest(two) == hashlib.sha256(canonical_json(one)).hexdigest()


def test_digest_is_pinned() -> None:
    """Every version of threatgate must digest a payload the same way, or mixed clusters never agree."""
    body = {"format": 1, "config": "<Settings>ü</Settings>", "suppliers": [], "tags": [{"name": "☃"}]}
    expected = hashlib.sha256(
        '{"config":"<Settings>ü</Settings>","format":1,"suppliers":[],"tags":[{"name":"☃"}]}'.encode()
    ).hexdigest()
    assert payload_digest(body) == expected


def test_digest_changes_with_any_content_change() -> None:
    base = payload()
    assert payload_digest(base) != payload_digest(payload("<Settings />\n"))
    assert payload_digest(base) != payload_digest(payload(tags=[{"name": "t"}]))


def test_canonical_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None, database=None)
@given(st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=6), st.randoms())
def test_digest_is_independent_of_insertion_order_for_any_value(value: dict[str, Any], rnd: Any) -> None:
    def shuffled(v: Any) -> Any:
        if isinstance(v, dict):
            items = list(v.items())
            rnd.shuffle(items)
            return {k: shuffled(x) for k, x in items}
        if isinstance(v, list):
            return [shuffled(x) for x in v]
        return v

    assert canonical_json(shuffled(value)) == canonical_json(value)
    assert json.loads(canonical_json(value)) == value


# -- the document -------------------------------------------------------------------------------------


def test_document_round_trips_through_bytes_str_and_dict() -> None:
    doc = SettingsDocument.create("tg-test", 7, 3, 1_700_000_000.123456, payload(tags=[{"name": "ü"}]))
    assert doc.updated_at == 1_700_000_000.123
    assert doc.sha256 == payload_digest(doc.payload)
    assert parse_document(doc.to_bytes()) == doc
    assert parse_document(doc.to_bytes().decode()) == doc
    assert parse_document(doc.as_json()) == doc
    assert doc.to_bytes() == canonical_json(doc.as_json())
    assert doc.short() == f"revision 7 (epoch 3, sha256 {doc.sha256[:12]})"
    assert doc.config_xml == "<Settings/>\n"


def test_successor_is_the_next_revision_at_the_given_epoch() -> None:
    doc = SettingsDocument.create("tg-test", 5, 1, 10.0, payload())
    same = doc.successor(1, 20.0)
    assert (same.cluster_id, same.revision, same.epoch, same.updated_at) == ("tg-test", 6, 1, 20.0)
    assert same.sha256 == doc.sha256 and same.payload == doc.payload
    changed = same.successor(4, 30.0, payload(tags=[{"name": "t"}]))
    assert (changed.revision, changed.epoch) == (7, 4)
    assert changed.sha256 == payload_digest(changed.payload) != doc.sha256


def test_version_orders_by_epoch_first() -> None:
    old = SettingsDocument.create("tg-test", 100, 1, 0.0, payload())
    new = SettingsDocument.create("tg-test", 2, 2, 0.0, payload())
    assert new.version == (2, 2) and old.version == (1, 100)
    assert new.version > old.version
    assert old.successor(1, 0.0).version < new.version
    assert new.successor(2, 0.0).version > new.version


@settings(max_examples=100, deadline=None, database=None)
@given(st.integers(1, 50), st.integers(1, 50), st.integers(1, 50), st.integers(1, 50))
def test_higher_epoch_wins_regardless_of_revision(e1: int, r1: int, e2: int, r2: int) -> None:
    a = SettingsDocument.create("tg-test", r1, e1, 0.0, payload())
    b = SettingsDocument.create("tg-test", r2, e2, 0.0, payload())
    if e1 != e2:
        assert (a.version > b.version) == (e1 > e2)
    else:
        assert (a.version > b.version) == (r1 > r2)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"cluster_id": ""}, "cluster_id must be"),
        ({"cluster_id": "has space"}, "cluster_id must be"),
        ({"cluster_id": "x" * 65}, "cluster_id must be"),
        ({"cluster_id": 7}, "cluster_id must be"),
        ({"revision": 0}, "revision must be a positive integer"),
        ({"revision": -3}, "revision must be a positive integer"),
        ({"revision": "3"}, "revision must be a positive integer"),
        ({"revision": 3.0}, "revision must be a positive integer"),
        ({"revision": True}, "revision must be a positive integer"),
        ({"epoch": 0}, "epoch must be a positive integer"),
        ({"epoch": True}, "epoch must be a positive integer"),
        ({"epoch": "2"}, "epoch must be a positive integer"),
        ({"epoch": 2.0}, "epoch must be a positive integer"),
        ({"updated_at": "now"}, "updated_at must be"),
        ({"updated_at": None}, "updated_at must be"),
        ({"updated_at": False}, "updated_at must be"),
        ({"updated_at": 10**400}, "updated_at must be"),
        ({"sha256": "A" * 64}, "sha256 must be 64 lowercase hex digits"),
        ({"sha256": "a" * 63}, "sha256 must be 64 lowercase hex digits"),
        ({"sha256": None}, "sha256 must be 64 lowercase hex digits"),
        ({"payload": []}, "payload must be an object"),
        ({"payload": "x"}, "payload must be an object"),
    ],
)
def test_each_wrong_field_is_named(changes: dict[str, Any], problem: str) -> None:
    exc = refused(json.dumps(good(**changes)))
    assert problem in exc.detail
    assert problem in str(exc)
    assert exc.status == 422
    revision = changes.get("revision", 3)
    expected = revision if isinstance(revision, int) and not isinstance(revision, bool) and revision >= 1 else None
    if expected is not None:
        assert exc.revision == expected and str(exc).startswith(f"settings revision {expected} refused: ")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_updated_at_is_refused(literal: str) -> None:
    """Python's json reads these; a document holding one could never be written back (to_bytes)."""
    text = json.dumps(good(updated_at=1.5)).replace('"updated_at": 1.5', f'"updated_at": {literal}')
    assert literal in text
    exc = refused(text)
    assert "updated_at must be" in exc.detail


def test_bool_revision_is_not_read_as_a_revision() -> None:
    exc = refused(good(revision=True))
    assert exc.revision == -1
    assert "revision must be a positive integer" in exc.detail


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda raw: raw | {"extra": 1}, "fields must be exactly cluster_id, epoch, payload, revision, sha256"),
        (lambda raw: {k: v for k, v in raw.items() if k != "updated_at"}, "fields must be exactly"),
        (lambda raw: {k: v for k, v in raw.items() if k != "sha256"}, "fields must be exactly"),
        (lambda raw: {k: v for k, v in raw.items() if k != "revision"}, "fields must be exactly"),
    ],
)
def test_extra_or_missing_fields(edit: Any, problem: str) -> None:
    exc = refused(edit(good()))
    assert problem in exc.detail


@pytest.mark.parametrize("data", [b"[]", b'"x"', b"3", "null"])
def test_not_an_object(data: bytes | str) -> None:
    assert refused(data).detail == "expected a JSON object"


@pytest.mark.parametrize("data", [b"{not json", b"", b'{"a": 1', b"\xff\xfe\xfd{}", "{'single': 1}"])
def test_not_json(data: bytes | str) -> None:
    exc = refused(data)
    assert exc.detail.startswith("not JSON: ")
    assert exc.revision == -1 and exc.status == 422


def test_one_tampered_payload_byte_is_a_digest_mismatch() -> None:
    doc = SettingsDocument.create("tg-test", 3, 2, 0.0, payload("<Settings><Users/></Settings>"))
    data = doc.to_bytes()
    assert data.count(b"<Users/>") == 1
    tampered = data.replace(b"<Users/>", b"<Userz/>", 1)
    assert len(tampered) == len(data)
    exc = refused(tampered)
    assert exc.detail.startswith("digest mismatch: ")
    assert doc.sha256[:16] in exc.detail
    assert exc.revision == 3


def test_a_digest_of_another_payload_is_refused() -> None:
    exc = refused(good(sha256=payload_digest(payload(tags=[{"name": "t"}]))))
    assert "digest mismatch" in exc.detail


def test_oversized_document_is_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    data = SettingsDocument.create("tg-test", 3, 2, 0.0, payload()).to_bytes()
    monkeypatch.setattr(settings_module, "MAX_DOCUMENT_BYTES", len(data))
    assert parse_document(data).revision == 3  # exactly at the limit: accepted
    monkeypatch.setattr(settings_module, "MAX_DOCUMENT_BYTES", len(data) - 1)
    for form in (data, data.decode()):
        exc = refused(form)
        assert exc.status == 413
        assert exc.detail == f"document is {len(data)} bytes, more than {len(data) - 1}"


def test_the_real_size_limit() -> None:
    assert settings_module.MAX_DOCUMENT_BYTES == 256 * 1024 * 1024


def test_lone_surrogate_in_payload_cannot_be_digested() -> None:
    raw = json.dumps(good(payload=payload("<Settings>\ud800</Settings>"), sha256="0" * 64))
    assert "\\ud800" in raw
    exc = refused(raw.encode())
    assert exc.detail.startswith("payload cannot be digested: ")
    assert "surrogate" in exc.detail


def test_lone_surrogate_in_cluster_id_is_refused() -> None:
    exc = refused(json.dumps(good(cluster_id="tg\ud800")))
    assert "cluster_id must be" in exc.detail


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (payload() | {"format": FORMAT_VERSION + 1}, f"payload format must be {FORMAT_VERSION}"),
        ({k: v for k, v in payload().items() if k != "format"}, f"payload format must be {FORMAT_VERSION}"),
        (payload() | {"extra": []}, "payload fields must be exactly config, format, suppliers, tags"),
        (
            {k: v for k, v in payload().items() if k != "tags"},
            "payload fields must be exactly config, format, suppliers, tags",
        ),
        (payload() | {"config": 5}, "payload config must be the <Settings> XML text"),
        (payload() | {"suppliers": {}}, "payload suppliers and tags must be arrays"),
        (payload() | {"tags": "t"}, "payload suppliers and tags must be arrays"),
    ],
)
def test_payload_shape_is_checked_after_the_digest(body: dict[str, Any], problem: str) -> None:
    exc = refused(with_payload(body))
    assert exc.detail == problem
    assert exc.revision == 3


# -- extract and merge ---------------------------------------------------------------------------------


def test_extract_then_merge_on_the_same_node_gives_the_same_config() -> None:
    root = read_xml(str(EXAMPLE_CONF))
    shared = extract_settings(root)
    label = f"{EXAMPLE_CONF}#settings-r1"
    merged = node_config_from_xml(merge_settings(root, shared, label))
    loaded = load_node_config(str(EXAMPLE_CONF))
    assert without_lines(merged) == without_lines(loaded)
    assert merged.path == str(EXAMPLE_CONF)
    # The merged rules and feeds are located in the settings document, not in the file.
    rule = next(r for s in merged.input.sources for r in s.rules if r.name == "RE_URL")
    assert rule.line == line_of(shared, "<RE_URL")
    assert merged.feeds.feeds[0].line == line_of(shared, "malicious_urls.json")
    assert merged.input.sources[0].rules[0].pattern.pattern == r"^(\d+)\s"


def test_merge_does_not_touch_the_local_tree() -> None:
    root = read_xml(str(EXAMPLE_CONF))
    before = to_xml(root)
    merge_settings(root, "<Settings><Feeds/><IoCExports/><Users/></Settings>", "x#settings-r1")
    assert to_xml(root) == before


def test_extract_holds_only_shared_elements() -> None:
    shared = parse_settings_xml(extract_settings(read_xml(str(EXAMPLE_CONF))), "s")
    assert [c.tag for c in shared.children] == ["RegExps", "OutputSettings", "Feeds", "IoCExports", "Users"]
    output = shared.find("OutputSettings")
    assert output is not None
    assert [c.tag for c in output.children] == [
        "EventFormat",
        "RecordFieldContextFormat",
        "ActionableFieldContextFormat",
        "FinishedEventFormat",
        "AlertFormat",
    ]
    text = extract_settings(read_xml(str(EXAMPLE_CONF)))
    for local in ("ConnectionString", "ServiceSettings", "ScannersCount", "CertificatePath", "Database", "8443"):
        assert local not in text


def test_extract_refuses_a_non_node_config() -> None:
    with pytest.raises(ConfigError, match="root element must be <Configuration>"):
        extract_settings(parse_xml(b"<Settings/>", "x.conf"))


def test_extract_without_users_gives_an_empty_users_element() -> None:
    root = parse_xml(b"<Configuration><InputSettings/></Configuration>", "x.conf")
    assert extract_settings(root) == "<Settings>\n  <Users/>\n</Settings>\n"


LOCAL_CONF = (
    EXAMPLE_CONF.read_text(encoding="utf-8")
    .replace("127.0.0.1:9999", "10.1.1.1:7001")
    .replace("127.0.0.1:9998", "10.1.1.1:7002")
    .replace(
        '<AlertConnectionString enabled="false">127.0.0.1:9997', '<AlertConnectionString enabled="true">10.1.1.1:7003'
    )
    .replace("<ScannersCount>9</ScannersCount>", "<ScannersCount>4</ScannersCount>")
    .replace("127.0.0.1:8443", "10.1.1.1:7443")
    .replace("certs/node.pem", "tls/local.pem")
    .replace("certs/node.key", "tls/local.key")
    .replace("state/node.sqlite3", "db/local.sqlite3")
    .replace(
        "</Configuration>",
        "  <Cluster>\n    <ConnectionString>10.1.1.1:7444</ConnectionString>\n"
        "    <StateDirectory>cluster-state</StateDirectory>\n    <FallCount>5</FallCount>\n"
        "  </Cluster>\n</Configuration>",
    )
)


def other_settings() -> str:
    return f"""<Settings>
  <RegExps>
    <Source id="default">
      <REQ type="CONTEXT">^(\\d+)\\s</REQ>
      <RE_SHA type="SHA256">sha=([0-9a-f]{{64}})</RE_SHA>
    </Source>
  </RegExps>
  <OutputSettings>
    <EventFormat>%REQ% hit=%MatchedIndicator%</EventFormat>
    <RecordFieldContextFormat>%ParamName%:%ParamValue%</RecordFieldContextFormat>
    <ActionableFieldContextFormat>%ParamName%=%ParamValue%</ActionableFieldContextFormat>
  </OutputSettings>
  <Feeds update_frequency="60">
    <Feed filename="feeds/malicious_urls.json" confidence="55" category="Shared_URL"/>
  </Feeds>
  <IoCExports>
    <IoCExport name="shared_export" sources="Shared_URL"/>
  </IoCExports>
  <Users>
    <User name="analyst" password_hash="{PASSWORD_HASH}"/>
  </Users>
</Settings>
"""


def test_merge_keeps_local_elements_and_replaces_shared_ones(tmp_path: Path) -> None:
    conf = node_dir(tmp_path / "n2", LOCAL_CONF)
    local = read_xml(str(conf))
    before = load_node_config(str(conf))
    config = node_config_from_xml(merge_settings(local, other_settings(), f"{conf}#settings-r9"))
    # local: listen addresses, the API's paths, ServiceSettings and Cluster are this node's own
    assert str(config.input.listen) == str(before.input.listen) == "10.1.1.1:7001"
    assert str(config.output.destination) == "10.1.1.1:7002"
    assert str(config.output.alert_destination) == "10.1.1.1:7003"
    assert config.service == before.service and config.service.scanners_count == 4
    assert config.http is not None and before.http is not None
    assert str(config.http.listen) == "10.1.1.1:7443"
    assert config.http.cert_path == str(tmp_path / "n2" / "tls" / "local.pem")
    assert config.http.key_path == str(tmp_path / "n2" / "tls" / "local.key")
    assert config.http.database == str(tmp_path / "n2" / "db" / "local.sqlite3")
    assert config.cluster == before.cluster
    assert config.cluster is not None and config.cluster.fall == 5
    assert config.cluster.state_dir == str(tmp_path / "n2" / "cluster-state")
    # shared: rules, formats, feeds, exports and users come from the settings only
    assert [s.id for s in config.input.sources] == ["default"]
    assert [r.name for r in config.input.sources[0].rules] == ["REQ", "RE_SHA"]
    assert config.output.event_format == "%REQ% hit=%MatchedIndicator%"
    assert config.output.record_field_format == "%ParamName%:%ParamValue%"
    assert config.output.finished_enabled is False and config.output.alert_format is None
    assert config.feeds.update_frequency == 60
    assert [(f.category, f.confidence) for f in config.feeds.feeds] == [("Shared_URL", 55)]
    assert [e.name for e in config.exports] == ["shared_export"]
    assert config.http.users == (("analyst", PASSWORD_HASH),)
    assert before.http.users == ()


def test_settings_without_an_element_remove_the_local_one(tmp_path: Path) -> None:
    conf = node_dir(tmp_path / "n", LOCAL_CONF)
    text = other_settings()
    text = text[: text.index("  <IoCExports>")] + text[text.index("  <Users>") :]
    config = node_config_from_xml(merge_settings(read_xml(str(conf)), text, f"{conf}#settings-r2"))
    assert config.exports == ()
    assert load_node_config(str(conf)).exports != ()


def test_relative_feed_paths_resolve_on_each_node(tmp_path: Path) -> None:
    shared = extract_settings(read_xml(str(EXAMPLE_CONF)))
    for name in ("a", "b"):
        conf = node_dir(tmp_path / name)
        config = node_config_from_xml(merge_settings(read_xml(str(conf)), shared, f"{conf}#settings-r4"))
        paths = [f.path for f in config.feeds.feeds]
        assert paths and all(p.startswith(str(tmp_path / name / "feeds") + "/") for p in paths)
        assert paths[0] == str(tmp_path / name / "feeds" / "malicious_urls.json")


def test_a_feed_missing_on_this_node_is_reported_against_the_settings(tmp_path: Path) -> None:
    conf = node_dir(tmp_path / "n")
    (tmp_path / "n" / "feeds" / "malicious_urls.json").unlink()
    label = f"{conf}#settings-r4"
    shared = extract_settings(read_xml(str(EXAMPLE_CONF)))
    with pytest.raises(ConfigError) as excinfo:
        node_config_from_xml(merge_settings(read_xml(str(conf)), shared, label))
    assert excinfo.value.path == label
    assert excinfo.value.element == "Feed"
    assert excinfo.value.line == line_of(shared, "malicious_urls.json")
    assert str(tmp_path / "n" / "feeds" / "malicious_urls.json") in str(excinfo.value)
    assert "does not exist" in str(excinfo.value)


def test_invalid_rule_regex_names_the_settings_and_the_element(tmp_path: Path) -> None:
    conf = node_dir(tmp_path / "n")
    label = f"{conf}#settings-r12"
    shared = extract_settings(read_xml(str(EXAMPLE_CONF))).replace(r"md5=([\da-fA-F]{32})", "md5=([")
    with pytest.raises(ConfigError) as excinfo:
        node_config_from_xml(merge_settings(read_xml(str(conf)), shared, label))
    message = str(excinfo.value)
    assert message.startswith(f"{label}:{line_of(shared, '<RE_MD5')}: <RE_MD5>: ")
    assert "does not compile" in message


def test_unknown_format_pattern_names_the_settings_and_the_element(tmp_path: Path) -> None:
    conf = node_dir(tmp_path / "n")
    label = f"{conf}#settings-r13"
    shared = set_value(extract_settings(read_xml(str(EXAMPLE_CONF))), "OutputSettings/EventFormat", "%Nope% x")
    with pytest.raises(ConfigError) as excinfo:
        node_config_from_xml(merge_settings(read_xml(str(conf)), shared, label))
    message = str(excinfo.value)
    assert message.startswith(f"{label}:{line_of(shared, '<EventFormat')}: <EventFormat>: ")
    assert "unknown pattern %Nope%" in message


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("<Configuration/>", "<Configuration>: root element must be <Settings>"),
        ("<Settings><ServiceSettings/></Settings>", "<ServiceSettings>: not a shared setting; expected one of"),
        ("<Settings><Cluster/></Settings>", "<Cluster>: not a shared setting"),
        ("<Settings><Feeds/><Feeds/></Settings>", "<Feeds>: <Feeds> may appear only once"),
        (
            "<Settings><OutputSettings><ConnectionString>1.2.3.4:5</ConnectionString></OutputSettings></Settings>",
            "<ConnectionString>: only the formats are shared in <OutputSettings>",
        ),
        ("<Settings><Feeds></Settings>", "not well-formed XML"),
    ],
)
def test_settings_xml_refusals_name_the_label(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_settings_xml(text, "node.conf#settings-r3")
    assert str(excinfo.value).startswith("node.conf#settings-r3:")
    assert problem in str(excinfo.value)


def test_merge_refuses_settings_xml_that_is_not_settings() -> None:
    root = read_xml(str(EXAMPLE_CONF))
    with pytest.raises(ConfigError, match=r"^lbl:1: <HTTPServer>: not a shared setting"):
        merge_settings(root, "<Settings><HTTPServer/></Settings>", "lbl")


# -- set_value -----------------------------------------------------------------------------------------

SETTINGS = """<Settings>
  <OutputSettings>
    <EventFormat>old</EventFormat>
  </OutputSettings>
  <Feeds update_frequency="30">
    <Feed filename="feeds/x.json" enabled="true"/>
    <Feed filename="feeds/y.json" enabled="true"/>
  </Feeds>
  <Users/>
</Settings>
"""


def feed_attrs(text: str) -> list[dict[str, str]]:
    feeds = parse_settings_xml(text, "s").find("Feeds")
    assert feeds is not None
    return [c.attrs for c in feeds.children]


def test_set_value_sets_text() -> None:
    out = set_value(SETTINGS, "OutputSettings/EventFormat", "%REQ% <new> & 'x'")
    output = parse_settings_xml(out, "s").find("OutputSettings")
    assert output is not None and output.children[0].text == "%REQ% <new> & 'x'"
    assert feed_attrs(out) == feed_attrs(SETTINGS)


def test_set_value_sets_an_attribute() -> None:
    out = set_value(SETTINGS, "/Feeds/@update_frequency/", "60")
    feeds = parse_settings_xml(out, "s").find("Feeds")
    assert feeds is not None and feeds.attrs == {"update_frequency": "60"}


@pytest.mark.parametrize(
    "path",
    [
        "Feeds/Feed[@filename=feeds/y.json]/@enabled",
        "Feeds/Feed[@filename='feeds/y.json']/@enabled",
        'Feeds/Feed[@filename="feeds/y.json"]/@enabled',
    ],
)
def test_set_value_with_a_predicate_changes_only_the_match(path: str) -> None:
    out = set_value(SETTINGS, path, "false")
    assert feed_attrs(out) == [
        {"filename": "feeds/x.json", "enabled": "true"},
        {"filename": "feeds/y.json", "enabled": "false"},
    ]


def test_set_value_adds_a_new_attribute_after_the_existing_ones() -> None:
    out = set_value(SETTINGS, "Feeds/Feed[@filename=feeds/x.json]/@confidence", "70")
    assert list(feed_attrs(out)[0].items()) == [("filename", "feeds/x.json"), ("enabled", "true"), ("confidence", "70")]


def test_set_value_creates_a_missing_last_element() -> None:
    out = set_value(SETTINGS, "OutputSettings/AlertFormat", "%Date% %Alert%")
    output = parse_settings_xml(out, "s").find("OutputSettings")
    assert output is not None
    assert [(c.tag, c.text) for c in output.children] == [("EventFormat", "old"), ("AlertFormat", "%Date% %Alert%")]
    top = set_value("<Settings/>", "IoCExports", "")
    assert [c.tag for c in parse_settings_xml(top, "s").children] == ["IoCExports"]


def test_set_value_result_is_still_validated() -> None:
    """A path may create an element that is not a setting; parsing the result refuses it."""
    out = set_value(SETTINGS, "Bogus", "1")
    with pytest.raises(ConfigError, match="not a shared setting"):
        parse_settings_xml(out, "s")


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("Feeds/Feed/@enabled", "<Feeds>: path segment 'Feed' matches 2 elements; add [@attr=value]"),
        ("Feeds/Feed[@filename=feeds/z.json]/@enabled", "<Feeds>: no element matches 'Feed[@filename=feeds/z.json]'"),
        ("Feeds/Feed[@nope=feeds/x.json]", "no element matches"),
        ("IoCExports/IoCExport/@enabled", "<Settings>: no element matches 'IoCExports'"),
        ("Feeds/@1bad", "<Settings>: bad attribute name '1bad'"),
        ("Feeds/@", "bad attribute name ''"),
        ("Feeds/@a b", "bad attribute name 'a b'"),
        ("Feeds", "<Feeds>: has child elements; set an attribute or a child instead"),
        ("OutputSettings", "<OutputSettings>: has child elements"),
        ("Feeds/Fe ed/@x", "bad path segment 'Fe ed'"),
        ("Feeds/Feed[filename=x]/@x", "bad path segment 'Feed[filename=x]'"),
        ("@update_frequency", "names no element under <Settings>"),
        ("", "names no element under <Settings>"),
        ("//", "names no element under <Settings>"),
    ],
)
def test_set_value_errors(path: str, problem: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        set_value(SETTINGS, path, "v")
    assert problem in str(excinfo.value)
    assert str(excinfo.value).startswith("settings:")


def test_set_value_refuses_text_that_is_not_settings() -> None:
    with pytest.raises(ConfigError, match="root element must be <Settings>"):
        set_value("<Configuration/>", "Feeds/@update_frequency", "1")


# -- to_xml --------------------------------------------------------------------------------------------

XML_CHARS = st.characters(
    codec="utf-8",
    exclude_categories=("Cs",),
    exclude_characters="\ufffe\uffff",
).filter(lambda c: c >= " " or c in "\t\n\r")
XML_TEXT = st.text(alphabet=st.one_of(st.sampled_from("<>&\"'\r\n\t ]]>"), XML_CHARS), max_size=40)


@settings(max_examples=300, deadline=None, database=None)
@given(text=XML_TEXT, attr=XML_TEXT)
def test_to_xml_round_trips_any_text_and_attribute(text: str, attr: str) -> None:
    fmt = Node("EventFormat", {"note": attr, "b": "2"}, 0, "x", text=text)
    tree = Node("Settings", {}, 0, "x", children=[Node("OutputSettings", {}, 0, "x", children=[fmt])])
    back = parse_settings_xml(to_xml(tree), "x")
    output = back.find("OutputSettings")
    assert output is not None
    (node,) = output.children
    assert node.text == text
    assert node.attrs == {"note": attr, "b": "2"}
    assert list(node.attrs) == ["note", "b"]


@settings(max_examples=200, deadline=None, database=None)
@given(value=XML_TEXT)
def test_set_value_round_trips_any_value(value: str) -> None:
    out = set_value(SETTINGS, "OutputSettings/EventFormat", value)
    output = parse_settings_xml(out, "s").find("OutputSettings")
    assert output is not None and output.children[0].text == value
    out = set_value(SETTINGS, "Feeds/Feed[@filename=feeds/x.json]/@category", value)
    assert feed_attrs(out)[0]["category"] == value


def test_to_xml_layout() -> None:
    tree = Node(
        "Settings",
        {},
        0,
        "x",
        children=[
            Node("Feeds", {"a": "1"}, 0, "x", children=[Node("Feed", {"f": 'x"y'}, 0, "x")]),
            Node("U", {}, 0, "x", text="t"),
        ],
    )
    assert to_xml(tree) == '<Settings>\n  <Feeds a="1">\n    <Feed f=\'x"y\'/>\n  </Feeds>\n  <U>t</U>\n</Settings>'


# -- API users -----------------------------------------------------------------------------------------


def users_of(text: str) -> dict[str, str]:
    users = parse_settings_xml(text, "s").find("Users")
    assert users is not None
    return {u.attrs["name"]: u.attrs["password_hash"] for u in users.children}


def test_set_value_adds_a_user_by_its_name_path() -> None:
    out = set_value(SETTINGS, "Users/User[@name=bob]/@password_hash", PASSWORD_HASH)
    assert users_of(out) == {"bob": PASSWORD_HASH}
    again = set_value(out, "Users/User[@name='bob']/@password_hash", "other")
    assert users_of(again) == {"bob": "other"}
    # <Users> is created as well when the settings have none.
    assert users_of(set_value("<Settings/>", "Users/User[@name=bob]/@password_hash", "h")) == {"bob": "h"}


def test_put_remove_and_list_users() -> None:
    out, existed = settings_module.put_user(SETTINGS, "bob", PASSWORD_HASH)
    assert not existed and settings_module.user_names(out) == ["bob"]
    out, existed = settings_module.put_user(out, "carol", "h2")
    assert not existed and settings_module.user_names(out) == ["bob", "carol"]
    out, existed = settings_module.put_user(out, "bob", "h3")
    assert existed and users_of(out) == {"bob": "h3", "carol": "h2"}
    out = settings_module.remove_user(out, "bob")
    assert users_of(out) == {"carol": "h2"}
    assert feed_attrs(out) == feed_attrs(SETTINGS)  # nothing else touched
    with pytest.raises(ConfigError, match="no API user 'bob' in the cluster settings"):
        settings_module.remove_user(out, "bob")
    with pytest.raises(ConfigError, match="no API user"):
        settings_module.remove_user("<Settings/>", "bob")
    assert settings_module.user_names("<Settings/>") == []


def test_a_user_added_by_path_is_validated_with_the_node_config(tmp_path: Path) -> None:
    conf = node_dir(tmp_path / "n2", LOCAL_CONF)
    local = read_xml(str(conf))
    base = extract_settings(local)
    good_xml, _ = settings_module.put_user(base, "bob", PASSWORD_HASH)
    config = node_config_from_xml(merge_settings(local, good_xml, f"{conf}#settings-r2"))
    assert config.http is not None and ("bob", PASSWORD_HASH) in config.http.users
    bad = set_value(base, "Users/User[@name=bob]/@password_hash", "plaintext")
    with pytest.raises(ConfigError, match="password_hash"):
        node_config_from_xml(merge_settings(local, bad, f"{conf}#settings-r2"))


# -- import and diff -----------------------------------------------------------------------------------


def test_extract_incomplete_leaves_out_a_missing_users_element() -> None:
    root = parse_xml(b"<Configuration><InputSettings/></Configuration>", "x.conf")
    assert extract_settings(root, complete=False) == "<Settings/>\n"


def test_import_replaces_the_elements_the_file_holds_and_keeps_the_others() -> None:
    incoming = "<Settings>\n  <Feeds update_frequency='5'/>\n</Settings>\n"
    out = settings_module.import_settings(SETTINGS, incoming, "new.xml")
    root = parse_settings_xml(out, "s")
    assert [c.tag for c in root.children] == ["OutputSettings", "Feeds", "Users"]
    feeds = root.find("Feeds")
    assert feeds is not None and feeds.attrs == {"update_frequency": "5"} and not feeds.children
    output = root.find("OutputSettings")
    assert output is not None and output.children[0].text == "old"


def test_import_refusals_name_the_imported_file() -> None:
    with pytest.raises(ConfigError, match=r"^new\.xml:1: <Cluster>: not a shared setting"):
        settings_module.import_settings(SETTINGS, "<Settings><Cluster/></Settings>", "new.xml")


def test_diff_is_empty_for_the_same_settings_written_differently() -> None:
    same = (
        "<Settings><OutputSettings><EventFormat>old</EventFormat></OutputSettings>"
        '<Feeds update_frequency="30"><Feed enabled="true" filename="feeds/x.json"></Feed>\n'
        "<!-- a comment --><Feed enabled='true' filename='feeds/y.json'/></Feeds><Users>\n  </Users></Settings>"
    )
    assert settings_module.settings_diff(SETTINGS, same, "a", "b") == []


def test_diff_marks_what_is_replaced_or_removed() -> None:
    new = set_value(SETTINGS, "Feeds/Feed[@filename=feeds/y.json]/@enabled", "false")
    new, _ = settings_module.put_user(new, "bob", "h")
    diff = settings_module.settings_diff(SETTINGS, new, "settings revision 4", "node1.conf")
    assert diff[:2] == ["--- settings revision 4", "+++ node1.conf"]
    assert '-    <Feed enabled="true" filename="feeds/y.json"/>' in diff
    assert '+    <Feed enabled="false" filename="feeds/y.json"/>' in diff
    assert "-  <Users/>" in diff and '+    <User name="bob" password_hash="h"/>' in diff
    assert settings_module.removed_lines(diff) == 2
    only_added = settings_module.settings_diff(
        new, set_value(new, "Users/User[@name=carol]/@password_hash", "h"), "a", "b"
    )
    assert settings_module.removed_lines(only_added) == 0 and len(only_added) > 2
