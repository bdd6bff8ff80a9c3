"""Tests for threatgate.node.render: EventFormat-style templates and field-context formats."""

from __future__ import annotations

import pytest

from threatgate.node.render import FieldFormat, Template

EVENT_FORMAT = (
    "%REQ% category=%Category% matchedIndicator=%MatchedIndicator% confidence=%Confidence% "
    "source=%SourceId% %RecordContext%"
)


def test_Template_substitutes_patterns() -> None:
    template = Template("cat=%Category% ind=%MatchedIndicator%")
    assert template.render({"Category": "Malicious_URL", "MatchedIndicator": "evil.example"}) == (
        "cat=Malicious_URL ind=evil.example"
    )


def test_Template_names_lists_patterns() -> None:
    assert Template(EVENT_FORMAT).names == frozenset(
        {"REQ", "Category", "MatchedIndicator", "Confidence", "SourceId", "RecordContext"}
    )


def test_Template_repeated_pattern_rendered_each_time() -> None:
    assert Template("%A%-%A%").render({"A": "x"}) == "x-x"


def test_Template_adjacent_patterns() -> None:
    assert Template("%A%%B%").render({"A": "1", "B": "2"}) == "12"


def test_Template_unknown_or_absent_field_renders_empty() -> None:
    template = Template("[%Missing%] [%Category%]")
    assert template.render({}) == "[] []"
    assert template.render({"Category": "C"}) == "[] [C]"


def test_Template_extra_fields_are_ignored() -> None:
    assert Template("%A%").render({"A": "a", "B": "b"}) == "a"


@pytest.mark.parametrize(
    ("source", "fields", "expected"),
    [
        ("{%A%}", {"A": "x"}, "{x}"),
        ("{{%A%}}", {"A": "x"}, "{{x}}"),
        ("{0} {A} {} %A%", {"A": "x"}, "{0} {A} {} x"),
        ("}{", {}, "}{"),
        ("%A%", {"A": "{0}{B}"}, "{0}{B}"),  # values are never formatted again
    ],
)
def test_Template_braces_are_literal(source: str, fields: dict[str, str], expected: str) -> None:
    assert Template(source).render(fields) == expected


@pytest.mark.parametrize(
    "source",
    ["LookupFinished", "{literal} braces {0}", "100% sure", "%not a pattern%", "%1abc%", ""],
)
def test_Template_constant_template_renders_source(source: str) -> None:
    template = Template(source)
    assert template.names == frozenset()
    assert template.render({"A": "x", "RecordContext": "ctx"}) == source


def test_Template_percent_signs_around_patterns() -> None:
    assert Template("100%%A%").render({"A": "x"}) == "100%x"
    assert Template("%A%%").render({"A": "x"}) == "x%"
    assert Template("%A%B%").render({"A": "x"}) == "xB%"


def test_Template_value_with_percent_is_not_substituted_again() -> None:
    assert Template("%A% %B%").render({"A": "%B%", "B": "b"}) == "%B% b"


def test_Template_record_context_after_space_is_not_doubled() -> None:
    template = Template(EVENT_FORMAT)
    fields = {
        "REQ": "7",
        "Category": "C",
        "MatchedIndicator": "evil.example",
        "Confidence": "100",
        "SourceId": "default",
        "RecordContext": "threat=Phishing first_seen=2026-02-11",
    }
    assert template.render(fields) == (
        "7 category=C matchedIndicator=evil.example confidence=100 source=default threat=Phishing first_seen=2026-02-11"
    )


def test_Template_record_context_glued_to_pattern_gets_a_space() -> None:
    # The documented AlertFormat: alert=%Alert%%RecordContext%
    template = Template("%Date% alert=%Alert%%RecordContext%")
    fields = {"Date": "Oct 11 22:14:15", "Alert": "FeedUpdated", "RecordContext": "feed=urls records=5"}
    assert template.render(fields) == "Oct 11 22:14:15 alert=FeedUpdated feed=urls records=5"


def test_Template_record_context_glued_to_literal_gets_a_space() -> None:
    assert Template("x%RecordContext%").render({"RecordContext": "a=1"}) == "x a=1"


def test_Template_record_context_empty_adds_no_space() -> None:
    assert Template("alert=%Alert%%RecordContext%").render({"Alert": "A", "RecordContext": ""}) == "alert=A"
    assert Template("alert=%Alert%%RecordContext%").render({"Alert": "A"}) == "alert=A"
    assert Template("a %RecordContext%").render({}) == "a "


def test_Template_record_context_at_start_gets_no_space() -> None:
    assert Template("%RecordContext% end").render({"RecordContext": "a=1"}) == "a=1 end"


def test_Template_record_context_after_tab_is_not_spaced() -> None:
    assert Template("x\t%RecordContext%").render({"RecordContext": "a=1"}) == "x\ta=1"


def test_Template_record_context_spacing_decided_per_occurrence() -> None:
    template = Template("%RecordContext%|%RecordContext% %RecordContext%")
    assert template.render({"RecordContext": "c"}) == "c| c c"


def test_Template_render_does_not_mutate_plain_dict() -> None:
    fields = {"RecordContext": "a=1", "A": "x"}
    Template("%A%%RecordContext%").render(fields)
    assert fields == {"RecordContext": "a=1", "A": "x"}


def test_Template_reused_for_many_renders() -> None:
    template = Template("%A%%RecordContext%")
    assert template.render({"A": "1", "RecordContext": "r"}) == "1 r"
    assert template.render({"A": "2"}) == "2"
    assert template.render({"A": "3", "RecordContext": "s"}) == "3 s"


def test_Template_repr_shows_source() -> None:
    assert repr(Template("%A%")) == "Template('%A%')"


def test_FieldFormat_render_one() -> None:
    assert FieldFormat("%ParamName%=%ParamValue%").render_one("threat", "Phishing") == "threat=Phishing"


def test_FieldFormat_join_with_separator() -> None:
    fmt = FieldFormat("%ParamName%=%ParamValue%")
    fields = [("threat", "Phishing"), ("first_seen", "2026-02-11")]
    assert fmt.join(fields, " ") == "threat=Phishing first_seen=2026-02-11"
    assert fmt.join(fields, ";") == "threat=Phishing;first_seen=2026-02-11"


def test_FieldFormat_join_actionable_style_carries_own_space() -> None:
    fmt = FieldFormat(" %ParamName%:%ParamValue%")
    assert fmt.join([("a", "1"), ("b", "2")], "") == " a:1 b:2"


def test_FieldFormat_join_empty_is_empty() -> None:
    assert FieldFormat("%ParamName%=%ParamValue%").join([], " ") == ""


def test_FieldFormat_join_accepts_any_iterable() -> None:
    fmt = FieldFormat("%ParamName%=%ParamValue%")
    assert fmt.join(iter([("k", "v")]), " ") == "k=v"
    assert fmt.join((p for p in [("k", "v"), ("l", "w")]), ",") == "k=v,l=w"


def test_FieldFormat_braces_and_values_literal() -> None:
    fmt = FieldFormat("{%ParamName%}=%ParamValue%")
    assert fmt.render_one("n", "{v}") == "{n}={v}"


def test_FieldFormat_other_patterns_render_empty() -> None:
    assert FieldFormat("%ParamName%=%ParamValue%%Category%").render_one("a", "b") == "a=b"
