"""config/xml.py: a defused XML tree whose every element knows its line, and that refuses what no reader read.

The tree is built from bytes here; the node's and the balancer's readers that give the elements a meaning are
tested in tests/config/test_node.py and tests/config/test_balancer.py, and every misspelling of their names in
tests/config/test_unknown_names.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from threatgate.config.xml import (
    MAX_CONFIG_BYTES,
    Attributes,
    Node,
    check_unknown,
    first_misspelling,
    parse_xml,
    read_checked,
    read_xml,
)
from threatgate.errors import ConfigError

DOC = b"""<?xml version="1.0"?>
<Settings a="1">
  <Feeds>
    <Feed name="one" enabled="true"/>
    <Feed name="two"><![CDATA[ x < y ]]></Feed>
  </Feeds>
  <Limit>  42 </Limit>
</Settings>
"""


def test_every_element_keeps_its_line_path_text_and_attributes() -> None:
    root = parse_xml(DOC, "s.conf")
    feeds = root.require("Feeds")
    one, two = feeds.findall("Feed")
    assert (root.tag, root.line, root.path, dict(root.attrs)) == ("Settings", 2, "s.conf", {"a": "1"})
    assert (feeds.line, one.line, two.line) == (3, 4, 5)
    assert two.text == " x < y " and two.value == "x < y"  # CDATA whole, whitespace kept in text
    assert root.require("Limit").value == "42"
    assert root.find("Missing") is None and list(root.findall("Missing")) == []


def test_only_and_require_refuse_a_repeat_or_a_missing_element_at_its_line() -> None:
    feeds = parse_xml(DOC, "s.conf").require("Feeds")
    with pytest.raises(ConfigError) as repeated:
        feeds.only("Feed")
    assert str(repeated.value) == "s.conf:5: <Feed>: <Feed> may appear only once (first at line 4)"
    with pytest.raises(ConfigError) as missing:
        feeds.require("Cache")
    assert str(missing.value) == "s.conf:3: <Feeds>: missing mandatory element <Cache>"


def read_all(root: Node) -> int:
    for feed in root.require("Feeds").findall("Feed"):
        feed.attrs.get("name"), feed.attrs.get("enabled")
    root.attrs.get("a")
    return int(root.require("Limit").value)


def test_a_tree_read_whole_passes_the_check() -> None:
    assert read_checked(parse_xml(DOC, "s.conf"), read_all) == 42


@pytest.mark.parametrize(
    ("old", "new", "error"),
    [
        (b'a="1"', b'a="1" aa="2"', "s.conf:2: <Settings>: unknown attribute 'aa' (did you mean 'a'?)"),
        (b'a="1"', b'a="1" zzz="2"', "s.conf:2: <Settings>: unknown attribute 'zzz' (expected 'a')"),
        (
            b"<Limit>",
            b"<Limits/><Limit>",
            "s.conf:7: <Limits>: unknown element in <Settings> (did you mean <Limit>?)",
        ),
        (
            b"<Limit>",
            b"<Other/><Limit>",
            "s.conf:7: <Other>: unknown element in <Settings> (expected <Feeds>, <Limit>)",
        ),
        (
            b"</Limit>",
            b"</Limit><Limit>1</Limit>",
            "s.conf:7: <Limit>: <Limit> may appear only once (first at line 7)",
        ),
        (
            b'enabled="true"/>',
            b'enabled="true"><X/></Feed>',
            "s.conf:4: <X>: unknown element in <Feed> (none is allowed here)",
        ),
    ],
)
def test_the_first_name_no_reader_asked_for_is_refused_with_the_closest_asked_name(
    old: bytes, new: bytes, error: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        read_checked(parse_xml(DOC.replace(old, new, 1), "s.conf"), read_all)
    assert str(refused.value) == error


def test_an_ignored_element_is_accepted_unread_but_its_own_attributes_are_checked() -> None:
    root = parse_xml(b'<R><Off enabled="false" x="1"><Anything y="2"/></Off></R>', "r.conf")
    off = root.require("Off")
    off.attrs.get("enabled")
    off.ignore()
    with pytest.raises(ConfigError, match="unknown attribute 'x'"):
        check_unknown(root)
    off.attrs.get("x")
    check_unknown(root)


def test_a_misspelt_attribute_is_reported_instead_of_the_readers_error() -> None:
    root = parse_xml(b'<R><Feed name="a" enable="false"/></R>', "r.conf")

    def read(root: Node) -> None:
        feed = root.require("Feed")
        feed.attrs.get("name")
        if feed.attrs.get("enabled", "true") == "true":
            raise feed.error("cannot read the feed's file")

    with pytest.raises(ConfigError) as refused:
        read_checked(root, read)
    assert str(refused.value) == "r.conf:1: <Feed>: unknown attribute 'enable' (did you mean 'enabled'?)"


def test_an_unrelated_unread_attribute_does_not_replace_the_readers_error() -> None:
    root = parse_xml(b'<R><Feed name="a" colour="red"/></R>', "r.conf")

    def read(root: Node) -> None:
        feed = root.require("Feed")
        feed.attrs.get("name")
        raise feed.error("cannot read the feed's file")

    with pytest.raises(ConfigError, match="cannot read the feed's file"):
        read_checked(root, read)
    assert first_misspelling(root) is None


def test_serialising_a_tree_does_not_count_as_reading_it() -> None:
    root = parse_xml(b'<Settings a="1"><Feeds b="2"/></Settings>', "x")
    assert dict(root.attrs.items()) == {"a": "1"} and list(root.attrs) == ["a"]
    assert isinstance(root.attrs, Attributes) and root.attrs.asked == set()
    assert "a" in root.attrs and root.attrs.get("z") is None
    assert root.attrs.asked == {"a", "z"}


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", "x.conf:1: not well-formed XML: no element found"),
        (b"<a><b></a>", "x.conf:1: not well-formed XML: mismatched tag"),
        (b'<!DOCTYPE a [<!ENTITY e "x">]><a>&e;</a>', "x.conf: refused unsafe XML construct"),
        (b" " * (MAX_CONFIG_BYTES + 1), f"x.conf: file is {MAX_CONFIG_BYTES + 1} bytes, more than the"),
    ],
)
def test_what_is_not_a_safe_small_xml_document_is_refused(data: bytes, error: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_xml(data, "x.conf")
    assert str(refused.value).startswith(error)


def test_an_unreadable_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        read_xml(str(tmp_path / "gone.conf"))
    assert str(refused.value) == f"{tmp_path / 'gone.conf'}: cannot read file: No such file or directory"
    path = tmp_path / "ok.conf"
    path.write_bytes(b"<a/>")
    assert read_xml(str(path)).tag == "a"
    if os.geteuid() != 0:
        path.chmod(0)
        with pytest.raises(ConfigError, match="cannot read file: Permission denied"):
            read_xml(str(path))
