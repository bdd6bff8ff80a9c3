"""A defused XML reader that remembers the line of every element, and which names a reader asked for.

Rules:
1. Parsing goes through :mod:`defusedxml.sax`: no DTD entity expansion, no external entities, so a
   config file cannot make us read other files or blow up memory ("billion laughs").
2. Every :class:`Node` carries ``line``, so every config error can say ``file:line``.
3. This module knows nothing about threatgate's elements; ``config/node.py`` gives them meaning.
4. A setting is applied or refused, never ignored.  A reader reaches children only through
   :meth:`Node.find`, :meth:`~Node.findall`, :meth:`~Node.only`, :meth:`~Node.require` or
   :meth:`~Node.elements`, and attributes through ``node.attrs`` (``get``, ``[]``, ``in``); each
   remembers the name it was asked for, present or not.  Once a whole configuration is built
   (:func:`read_checked`), :func:`check_unknown` refuses the first element or attribute no reader
   asked for, suggesting the closest of the names that *were* asked for at that place (nginx's
   "unknown directive").  There is no table of known names to go stale: adding an attribute is
   reading it, in one place.
5. A reader that asks for an attribute only in some cases makes it unknown in the others: read it
   always and refuse it with a precise message where it does not apply.  What is deliberately not
   read (a disabled section, a CyberTrace element threatgate does not use) is marked with
   :meth:`Node.ignore`.

:mod:`xml.etree.ElementTree`'s C parser cannot report element line numbers, hence this small tree.
"""

from __future__ import annotations

import difflib
import xml.sax
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar, overload
from xml.sax.handler import ContentHandler
from xml.sax.xmlreader import AttributesImpl, Locator

import defusedxml
import defusedxml.sax

from threatgate.errors import ConfigError
from threatgate.fs import os_reason

MAX_CONFIG_BYTES = 16 * 1024 * 1024
"""A configuration file larger than this is refused: real ones are a few kilobytes."""

_T = TypeVar("_T")

TYPO_CUTOFF = 0.8
"""How alike (difflib ratio) a name must be to one a reader looked for and did not find to be its
misspelling when the reader failed: ``enable``/``enabled`` 0.92, ``EventFormat``/``AlertFormat`` 0.73."""


class Attributes(dict[str, str]):
    """An element's attributes, remembering every name a reader asked for (``asked``), present or not.

    Only lookups by name count (``get``, ``[]``, ``in``); iterating (serialising a tree) does not.
    """

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(items)
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.asked.add(key)
        return super().__contains__(key)

    @overload
    def get(self, key: str, default: None = None, /) -> str | None: ...

    @overload
    def get(self, key: str, default: str, /) -> str: ...

    @overload
    def get(self, key: str, default: _T, /) -> str | _T: ...

    def get(self, key: str, default: object = None, /) -> object:
        self.asked.add(key)
        return super().get(key, default)


@dataclass
class Node:
    """One XML element: tag, attributes, text (CDATA included, whitespace kept) and children.

    ``used``, ``asked_tags`` and ``ignored`` record what the readers looked at (rule 4).
    """

    tag: str
    attrs: dict[str, str]
    line: int
    path: str
    text: str = ""
    children: list[Node] = field(default_factory=list)
    used: bool = field(default=False, repr=False, compare=False)
    """A reader was handed this element."""
    asked_tags: set[str] = field(default_factory=set, repr=False, compare=False)
    """The child names a reader asked this element for, present or not."""
    ignored: bool = field(default=False, repr=False, compare=False)
    """Its content is deliberately not read: :func:`check_unknown` does not look inside."""

    def __post_init__(self) -> None:
        if not isinstance(self.attrs, Attributes):
            self.attrs = Attributes(self.attrs.items())

    def _hand_out(self, child: Node) -> Node:
        child.used = True
        return child

    def find(self, tag: str) -> Node | None:
        """The first child named ``tag``, or None."""
        self.asked_tags.add(tag)
        for child in self.children:
            if child.tag == tag:
                return self._hand_out(child)
        return None

    def findall(self, tag: str) -> Iterator[Node]:
        """Every child named ``tag``, in document order."""
        self.asked_tags.add(tag)
        return (self._hand_out(child) for child in self.children if child.tag == tag)

    def elements(self) -> Iterator[Node]:
        """Every child, in document order: the caller reads each one or refuses it (:meth:`unknown_child`)."""
        return (self._hand_out(child) for child in self.children)

    def require(self, tag: str) -> Node:
        """The child named ``tag``, once; raises ConfigError naming this element when it is missing or repeated."""
        child = self.only(tag)
        if child is None:
            raise self.error(f"missing mandatory element <{tag}>")
        return child

    def only(self, tag: str) -> Node | None:
        """The child named ``tag`` when it appears at most once; a repeat is a ConfigError."""
        found = list(self.findall(tag))
        if len(found) > 1:
            raise found[1].error(f"<{tag}> may appear only once (first at line {found[0].line})")
        return found[0] if found else None

    def ignore(self) -> None:
        """Accept this element's children unread (a disabled section, an unused CyberTrace element).

        Its own attributes are still checked: ``enabled`` was read to get here.
        """
        self.used = True
        self.ignored = True

    def unknown_child(self, child: Node, known: Iterable[str]) -> ConfigError:
        """The error for a child this element does not take, suggesting the closest of ``known``."""
        hint = _suggest(child.tag, known, "<{}>")
        return child.error(f"unknown element in <{self.tag}>{hint}")

    def unknown_attribute(self, name: str, known: Iterable[str]) -> ConfigError:
        """The error for an attribute this element does not take, suggesting the closest of ``known``."""
        return self.error(f"unknown attribute {name!r}{_suggest(name, known, '{!r}')}")

    @property
    def value(self) -> str:
        """The element's text without surrounding whitespace."""
        return self.text.strip()

    def error(self, problem: str) -> ConfigError:
        """A ConfigError located at this element."""
        return ConfigError(self.path, self.line, self.tag, problem)


def _asked(node: Node) -> set[str]:
    return node.attrs.asked if isinstance(node.attrs, Attributes) else set()


def _suggest(name: str, known: Iterable[str], fmt: str) -> str:
    """`` (did you mean X?)`` when a known name is close, else the known names, else that there are none."""
    names = sorted(set(known))
    close = difflib.get_close_matches(name, names, n=1)
    if close:
        return f" (did you mean {fmt.format(close[0])}?)"
    if not names:
        return " (none is allowed here)"
    return f" (expected {', '.join(fmt.format(n) for n in names)})"


def _unread(root: Node) -> Iterator[tuple[Node, Node | None, str]]:
    """What no reader asked for, in document order: (element, unused child or None, attribute name or "")."""
    stack: list[tuple[Node | None, Node]] = [(None, root)]
    while stack:
        parent, node = stack.pop()
        if parent is not None and not node.used:
            yield parent, node, ""
            continue
        asked = _asked(node)
        for name in node.attrs:
            if name not in asked:
                yield node, None, name
        if not node.ignored:
            stack.extend((node, child) for child in reversed(node.children))


def _refusal(node: Node, child: Node | None, name: str) -> ConfigError:
    if child is None:
        return node.unknown_attribute(name, _asked(node))
    if child.tag in node.asked_tags:  # a reader took the first one with find()
        first = next(c for c in node.children if c.tag == child.tag)
        return child.error(f"<{child.tag}> may appear only once (first at line {first.line})")
    return node.unknown_child(child, node.asked_tags)


def check_unknown(root: Node) -> None:
    """Refuse the first element or attribute, in document order, that no reader asked for (rule 4).

    Call it once the whole configuration was read from ``root``.

    Raises:
        ConfigError: ``file:line: <Element>: unknown attribute 'x' (did you mean 'y'?)`` or
            ``file:line: <X>: unknown element in <Parent> (did you mean <Y>?)``.
    """
    for node, child, name in _unread(root):
        raise _refusal(node, child, name)


def first_misspelling(root: Node) -> ConfigError | None:
    """After a reader failed: the first attribute not asked for that is close to one asked for and absent.

    ``enable="false"`` on a ``<Feed>`` whose file is gone: the reader asked for ``enabled``, found
    none, kept the feed and failed on its file; the misspelling is the problem to report.  Only
    attributes: one reader reads all of an element's attributes, and no two of them are alike
    (tests/config/test_unknown_names.py), whereas a child element not read *yet* may well be close
    to one that is missing (``<AlertConnectionString>`` and ``<ConnectionString>``).
    """
    for node, child, name in _unread(root):
        if child is None and difflib.get_close_matches(name, _asked(node) - set(node.attrs), n=1, cutoff=TYPO_CUTOFF):
            return node.unknown_attribute(name, _asked(node))
    return None


def read_checked(root: Node, read: Callable[[Node], _T]) -> _T:
    """``read(root)``, then :func:`check_unknown`: every element and attribute is applied or refused.

    Raises:
        ConfigError: the reader's own error, or a misspelt name that explains it
            (:func:`first_misspelling`), or the first unknown name.
    """
    try:
        result = read(root)
    except ConfigError:
        misspelt = first_misspelling(root)
        if misspelt is not None:
            raise misspelt from None
        raise
    check_unknown(root)
    return result


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
        raise ConfigError(path, 0, "", f"cannot read file: {os_reason(exc)}") from None
    return parse_xml(data, path)
