"""A defused XML reader that remembers the line of every element.

Rules:
1. Parsing goes through :mod:`defusedxml.sax`: no DTD entity expansion, no external entities, so a
   config file cannot make us read other files or blow up memory ("billion laughs").
2. Every :class:`Node` carries ``line``, so every config error can say ``file:line``.
3. This module knows nothing about threatgate's elements; ``config/node.py`` gives them meaning.

:mod:`xml.etree.ElementTree`'s C parser cannot report element line numbers, hence this small tree.
"""

from __future__ import annotations

import xml.sax
from collections.abc import Iterator
from dataclasses import dataclass, field
from xml.sax.handler import ContentHandler
from xml.sax.xmlreader import AttributesImpl, Locator

import defusedxml
import defusedxml.sax

from threatgate.errors import ConfigError

MAX_CONFIG_BYTES = 16 * 1024 * 1024
"""A configuration file larger than this is refused: real ones are a few kilobytes."""


@dataclass
class Node:
    """One XML element: tag, attributes, text (CDATA included, whitespace kept) and children."""

    tag: str
    attrs: dict[str, str]
    line: int
    path: str
    text: str = ""
    children: list[Node] = field(default_factory=list)

    def find(self, tag: str) -> Node | None:
        """The first child named ``tag``, or None."""
        for child in self.children:
            if child.tag == tag:
                return child
        return None

    def findall(self, tag: str) -> Iterator[Node]:
        """Every child named ``tag``, in document order."""
        return (child for child in self.children if child.tag == tag)

    def require(self, tag: str) -> Node:
        """The first child named ``tag``; raises ConfigError naming this element when it is missing."""
        child = self.find(tag)
        if child is None:
            raise self.error(f"missing mandatory element <{tag}>")
        return child

    def only(self, tag: str) -> Node | None:
        """The child named ``tag`` when it appears at most once; a repeat is a ConfigError."""
        found = list(self.findall(tag))
        if len(found) > 1:
            raise found[1].error(f"<{tag}> may appear only once (first at line {found[0].line})")
        return found[0] if found else None

    @property
    def value(self) -> str:
        """The element's text without surrounding whitespace."""
        return self.text.strip()

    def error(self, problem: str) -> ConfigError:
        """A ConfigError located at this element."""
        return ConfigError(self.path, self.line, self.tag, problem)


class _TreeBuilder(ContentHandler):
    def __init__(self, path: str) -> None:
        super().__init__()
        self._path = path
        self._locator: Locator | None = None
        self._stack: list[Node] = []
        self.root: Node | None = None

    def setDocumentLocator(self, locator: Locator) -> None:  # noqa: N802 - SAX API name
        self._locator = locator

    def startElement(self, name: str, attrs: AttributesImpl) -> None:  # noqa: N802 - SAX API name
        line = self._locator.getLineNumber() if self._locator is not None else 0
        node = Node(tag=name, attrs=dict(attrs.items()), line=line or 0, path=self._path)
        if self._stack:
            self._stack[-1].children.append(node)
        else:
            self.root = node
        self._stack.append(node)

    def endElement(self, name: str) -> None:  # noqa: N802 - SAX API name
        self._stack.pop()

    def characters(self, content: str) -> None:
        if self._stack:
            self._stack[-1].text += content


def parse_xml(data: bytes, path: str) -> Node:
    """Parse ``data`` (the bytes of ``path``) into a :class:`Node` tree.

    Raises:
        ConfigError: the file is too large, not well-formed XML, or uses entities/DTD tricks.
    """
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(path, 0, "", f"file is {len(data)} bytes, more than the {MAX_CONFIG_BYTES} allowed")
    builder = _TreeBuilder(path)
    try:
        defusedxml.sax.parseString(data, builder)
    except xml.sax.SAXParseException as exc:
        raise ConfigError(path, exc.getLineNumber() or 0, "", f"not well-formed XML: {exc.getMessage()}") from None
    except defusedxml.DefusedXmlException as exc:
        raise ConfigError(path, 0, "", f"refused unsafe XML construct: {exc}") from None
    if builder.root is None:
        raise ConfigError(path, 0, "", "empty XML document")
    return builder.root


def read_xml(path: str) -> Node:
    """Read and parse the XML file at ``path``; unreadable files are a ConfigError too."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(path, 0, "", f"cannot read file: {exc.strerror or exc}") from None
    return parse_xml(data, path)
