"""Feed files into columns (issue 13 item 4): the seam between the feed parsers and the snapshot writer.

This module starts as the stub of the seam: :class:`ParsedFeed` is the contract (record ``i`` is row ``i``
of every column), and :func:`parse_feed` delegates to the reference loader of :mod:`threatgate.node.feeds`
until the fast parsers land here.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from threatgate.config.node import FeedSettings
from threatgate.node.feeds import LoadReport


@dataclass(slots=True)
class ParsedFeed:
    """A parsed feed as columns, one row per accepted record (malformed ones are only in ``report``).

    ``values`` are normalised indicators (a CIDR as ``version/prefix length/network``), ``raws`` the
    indicator text as the feed wrote it (``%MatchedIndicator%``), ``contexts`` the record context as
    :func:`~threatgate.node.feeds.record_context` gives it (``context_columns`` already applied).
    """

    kinds: array[int] = field(default_factory=lambda: array("b"))
    values: list[str] = field(default_factory=list)
    raws: list[str] = field(default_factory=list)
    subdomains: list[bool] = field(default_factory=list)
    contexts: list[tuple[tuple[str, str], ...]] = field(default_factory=list)
    report: LoadReport = field(default_factory=LoadReport)
    header: list[str] = field(default_factory=list)


def parse_feed(settings: FeedSettings, data: bytes) -> ParsedFeed:
    """The columns of a JSON or CSV feed file's bytes (stub: the reference loader's columns).

    Raises:
        FeedError: the bytes are not a feed at all (the caller keeps the previous version).
    """
    from threatgate.node.feeds import parse_columns

    return parse_columns(settings, data)
