"""Output formats: EventFormat, FinishedEventFormat, AlertFormat and the field-context formats.

Rules:
1. A format is compiled once into a :meth:`str.format_map` template; ``%Name%`` becomes a field and
   everything else is literal (braces included).  An unknown or absent field renders as "".
2. ``%RecordContext%`` is the record's fields rendered with RecordFieldContextFormat and joined with
   spaces.  When the character before it in the format is not a space, a space is put in front, so
   both documented styles render cleanly: ``alert=%Alert%%RecordContext%`` and
   ``... matchedIndicator=%MatchedIndicator% %RecordContext%``.
3. ``%ActionableFields%`` is the actionable fields rendered with ActionableFieldContextFormat and
   concatenated as they are (the documented format carries its own leading space).
Pure: no I/O, no clock (the caller passes the date text).
"""

from __future__ import annotations

from collections.abc import Iterable

from threatgate.config.node import PATTERN_RE


class Fields(dict[str, str]):
    """Pattern values for one line; an absent pattern renders as ""."""

    def __missing__(self, key: str) -> str:
        return ""


class Template:
    """A compiled output format."""

    __slots__ = ("source", "names", "_fmt", "_constant", "_spaced")

    def __init__(self, source: str) -> None:
        self.source = source
        pieces: list[str] = []
        names: list[str] = []
        pos = 0
        for m in PATTERN_RE.finditer(source):
            literal = source[pos : m.start()]
            pieces.append(literal.replace("{", "{{").replace("}", "}}"))
            name = m.group(1)
            if name == "RecordContext":
                before = source[: m.start()]
                name = "RecordContext" if (not before or before[-1].isspace()) else "_SpacedRecordContext"
            pieces.append("{" + name + "}")
            names.append(m.group(1))
            pos = m.end()
        pieces.append(source[pos:].replace("{", "{{").replace("}", "}}"))
        self._fmt = "".join(pieces)
        self._spaced = "_SpacedRecordContext" in self._fmt
        self.names = frozenset(names)
        self._constant = source if not names else None

    def __repr__(self) -> str:
        return f"Template({self.source!r})"

    def render(self, fields: dict[str, str]) -> str:
        """The format with every ``%Name%`` replaced by ``fields[Name]`` ("" when absent)."""
        if self._constant is not None:
            return self._constant
        mapping = fields if isinstance(fields, Fields) else Fields(fields)
        if self._spaced:
            context = mapping.get("RecordContext")
            mapping["_SpacedRecordContext"] = " " + context if context else ""
        return self._fmt.format_map(mapping)


class FieldFormat:
    """RecordFieldContextFormat / ActionableFieldContextFormat: one ``(name, value)`` pair each."""

    __slots__ = ("_template",)

    def __init__(self, source: str) -> None:
        self._template = Template(source)

    def render_one(self, name: str, value: str) -> str:
        return self._template.render({"ParamName": name, "ParamValue": value})

    def join(self, fields: Iterable[tuple[str, str]], separator: str) -> str:
        return separator.join(self.render_one(n, v) for n, v in fields)
