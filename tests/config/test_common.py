"""config/common.py: the typed readers every loader uses, each failing at the element it reads from.

Checked on synthetic elements and models: addresses (IPv6 in brackets, ports 1-65535), booleans, integers in
a range, regexes, paths relative to the config file, the integer bounds a model declares (also inside a
union) and the first validation error placed at the element its field came from.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import pydantic
import pytest

from threatgate.config.common import (
    UNBOUNDED,
    Address,
    Frozen,
    build,
    compile_regex,
    field_bounds,
    field_range,
    parse_address,
    parse_bool,
    parse_field,
    parse_int,
    resolve_path,
)
from threatgate.config.xml import Node
from threatgate.errors import ConfigError


def element(text: str = "", **attrs: str) -> Node:
    return Node(tag="X", attrs=attrs, line=7, path="/etc/tg/node.conf", text=text)


def refused(call: object) -> str:
    """The message of the ConfigError ``call`` raises (``call`` is a zero-argument callable)."""
    with pytest.raises(ConfigError) as caught:
        call()  # type: ignore[operator]
    return str(caught.value)


@pytest.mark.parametrize(
    ("text", "address", "shown"),
    [
        ("127.0.0.1:9999", Address("127.0.0.1", 9999), "127.0.0.1:9999"),
        (" localhost:1 ", Address("localhost", 1), "localhost:1"),
        ("[::1]:65535", Address("::1", 65535), "[::1]:65535"),
        ("[fe80::1]:443", Address("fe80::1", 443), "[fe80::1]:443"),
        ("::1:80", Address("::1", 80), "[::1]:80"),  # the last colon splits; shown in brackets
    ],
)
def test_an_address_is_read_and_shown_with_an_ipv6_host_in_brackets(text: str, address: Address, shown: str) -> None:
    assert parse_address(element(text)) == address
    assert str(address) == shown


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("localhost", "expected <host>:<port>, got 'localhost'"),
        (":80", "expected <host>:<port>, got ':80'"),
        ("[nothost]:80", "'nothost' is not an IPv6 address"),
        ("h:0", "bad port '0' in 'h:0': expected 1-65535"),
        ("h:65536", "bad port '65536'"),
        ("h:8o", "bad port '8o'"),
    ],
)
def test_a_bad_address_is_refused_at_its_element(text: str, problem: str) -> None:
    assert refused(lambda: parse_address(element(text))).startswith("/etc/tg/node.conf:7: <X>: ")
    assert problem in refused(lambda: parse_address(element(text)))


def test_an_address_may_come_from_an_attribute_instead_of_the_text() -> None:
    assert parse_address(element("ignored"), "h:1") == Address("h", 1)


@pytest.mark.parametrize(("raw", "value"), [("true", True), (" YES ", True), ("1", True), ("On", True)])
def test_booleans_take_the_usual_spellings(raw: str, value: bool) -> None:
    assert parse_bool(element(flag=raw), "flag", default=False) is value


def test_a_boolean_is_false_for_the_false_spellings_default_when_absent_and_refused_otherwise() -> None:
    for raw in ("false", "0", "no", "OFF"):
        assert parse_bool(element(flag=raw), "flag", default=True) is False
    assert parse_bool(element(), "flag", default=True) is True
    assert refused(lambda: parse_bool(element(flag="maybe"), "flag", True)) == (
        "/etc/tg/node.conf:7: <X>: attribute flag='maybe': expected true or false"
    )


def test_integers_are_bounded_inclusive_and_absent_means_the_default() -> None:
    node = element()
    assert parse_int(node, " 5 ", "n", 1, 5) == 5
    assert parse_int(node, "1", "n", 1, 5) == 1
    assert parse_int(node, None, "n", 1, 5, default=3) == 3
    assert parse_int(node, "  ", "n", 1, 5, default=3) == 3
    assert refused(lambda: parse_int(node, None, "n", 1, 5)).endswith("<X>: n is mandatory")
    assert refused(lambda: parse_int(node, "6", "n", 1, 5)).endswith("<X>: n=6: expected 1-5")
    assert refused(lambda: parse_int(node, "0", "n", 1, 5)).endswith("<X>: n=0: expected 1-5")
    assert refused(lambda: parse_int(node, "2.5", "n", 1, 5)).endswith("<X>: n='2.5': expected an integer")


def test_a_regex_compiles_with_its_flags_or_is_refused_in_the_compilers_words() -> None:
    assert compile_regex(element(), "a+", "rule", re.IGNORECASE).match("AA")
    message = refused(lambda: compile_regex(element(), "(a", "rule"))
    assert message.startswith("/etc/tg/node.conf:7: <X>: rule '(a' does not compile: missing ), unterminated")


def test_a_path_is_relative_to_the_config_files_directory() -> None:
    assert resolve_path(element(), "feeds/a.json ") == "/etc/tg/feeds/a.json"
    assert resolve_path(element(), "../x/./y") == "/etc/x/y"
    assert resolve_path(element(), "/abs/path") == "/abs/path"
    assert refused(lambda: resolve_path(element(), " ")).endswith("<X>: empty path")


class Model(Frozen):
    plain: int = 0
    ranged: Annotated[int, pydantic.Field(ge=1, le=100)] = 1
    strict: Annotated[float, pydantic.Field(gt=0.5, lt=10.0)] = 1.0
    either: Annotated[int, pydantic.Field(ge=2, le=64)] | Literal["auto"] = "auto"
    ratio: Annotated[float, pydantic.Field(ge=0.25, le=0.75)] = 0.5
    positive: Annotated[int, pydantic.Field(gt=0, lt=8)] = 1


def test_field_bounds_are_the_models_own_also_strict_and_inside_a_union() -> None:
    assert field_bounds(Model, "plain") == (-UNBOUNDED, UNBOUNDED)
    assert field_bounds(Model, "ranged") == (1, 100)
    assert field_bounds(Model, "strict") == (1, 9)  # whole numbers above 0.5 and below 10
    assert field_bounds(Model, "either") == (2, 64)
    assert field_bounds(Model, "positive") == (1, 7)
    assert field_range(Model, "ratio") == (0.25, 0.75)
    assert field_range(Model, "plain") == (float("-inf"), float("inf"))


def test_parse_field_reads_within_the_models_bounds() -> None:
    assert parse_field(element(), "64", "Workers", Model, "either") == 64
    assert refused(lambda: parse_field(element(), "65", "Workers", Model, "either")).endswith(
        "Workers=65: expected 2-64"
    )


def test_the_first_validation_error_is_placed_at_the_element_its_field_came_from() -> None:
    root, child = element(), Node(tag="Ranged", attrs={}, line=12, path="/etc/tg/node.conf")
    assert build(root, Model, {"ranged": 7}).ranged == 7
    message = refused(lambda: build(root, Model, {"ranged": 0}, {"ranged": child}))
    assert message.startswith("/etc/tg/node.conf:12: <Ranged>: ranged: Input should be greater than or equal to 1")
    assert refused(lambda: build(root, Model, {"other": 1})).startswith("/etc/tg/node.conf:7: <X>: other: Extra")


def test_a_config_model_is_frozen() -> None:
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        Model().plain = 1  # type: ignore[misc]
