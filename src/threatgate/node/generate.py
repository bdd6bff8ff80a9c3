"""Synthetic feeds, matching events and a node config, for tests and benchmarks.

Rules:
1. Deterministic: the same arguments write byte-identical files.  Feed records are pure functions of
   ``(seed, record number)`` (a splitmix64 mix, no ``random`` state), so a hit event can rebuild any
   indicator without keeping the feeds in memory; events use one ``random.Random(seed)``.  No clock.
2. Streaming: records are formatted and written in chunks; memory stays flat whatever the size.
3. Disjoint name spaces, so an event detects exactly what ``expected.txt`` says:

   ==================  ==========================================================================
   urls.json           ``<word>-<n>.{phish,malware,drop}.example/...`` URLs; masks
                       ``*.cdn<j>.example/<word>/*`` and ``host<j>.example/<word>/*``
   domains.json        ``<hex><n>.{botnet,c2,dga}.test``; sub-domain records ``*.<word>-<n>.dyn.test``
   ips.csv             addresses counted up from 100.64.0.0/10 (then down from 99.0.0.0/8);
                       CIDRs /24-/28 packed from 10.0.0.0/8 (then up from 11.0.0.0/8)
   hashes.csv          MD5 (half), SHA-1, SHA-256 of ``<seed>:hash:<n>``
   events, no hit      hosts ``<sub>.<word>-<n>.example``, src in 192.168.0.0/16, dst in
                       172.16.0.0/12 or 198.18.0.0/15, MD5 of ``<seed>:event:<n>``
   ==================  ==========================================================================

   A hit event carries exactly one listed value (the URL, the host of a domain record or a
   sub-domain of a ``*.`` record, an address or CIDR member as ``dst``, an MD5), which detects
   exactly one record; ``expected.txt`` lists ``<event number> <category>`` for it.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Iterator
from typing import TextIO

__all__ = ["generate"]

_M64 = (1 << 64) - 1
_CHUNK = 50_000
"""Records formatted per ``write`` call."""

URL_SHARE, DOMAIN_SHARE, IP_SHARE = 25, 15, 15
"""Per cent of indicators in urls.json, domains.json and ips.csv; hashes.csv gets the rest."""
MASK_SHARE, SUFFIX_SHARE, CIDR_SHARE = 5, 10, 10
"""Per cent of URL records that are masks, domain records that are ``*.`` and IP records that are CIDRs."""

CATEGORY_URL = "Malicious_URL"
CATEGORY_DOMAIN = "Botnet_Domain"
CATEGORY_IP = "IP_Reputation"
CATEGORY_HASH = "Malicious_Hash"

_WORDS = (
    "account", "admin", "alpha", "api", "apps", "assets", "auth", "bank", "beta", "blog", "board", "box",
    "cart", "cloud", "club", "code", "core", "data", "delta", "desk", "docs", "drive", "edge", "files",
    "forum", "gate", "go", "group", "help", "hub", "id", "img", "info", "lab", "link", "live", "login",
    "mail", "market", "media", "mobile", "news", "office", "online", "pay", "photo", "portal", "press",
    "secure", "service", "shop", "sign", "site", "smart", "social", "soft", "space", "sport", "store",
    "stream", "support", "sync", "team", "tech", "track", "travel", "update", "video", "web", "wiki",
)  # fmt: skip
_SUBS = ("api", "app", "cdn", "img", "m", "mail", "ns1", "static", "upd", "web", "dl", "s3")
_PATHS = ("wp-content", "wp-admin", "images", "files", "download", "doc", "invoice", "secure", "update", "js")
_FILES = ("index", "login", "gate", "panel", "payload", "setup", "invoice", "verify", "update", "post")
_EXTS = ("php", "exe", "zip", "js", "html", "doc", "bin", "aspx")
_BENIGN_EXTS = ("html", "js", "css", "png", "jpg", "json", "gif", "svg", "woff2", "php")
_MAL_SLDS = ("phish", "malware", "drop")
_DOMAIN_SLDS = ("botnet", "c2", "dga")
_THREATS = (
    "Phishing", "Trojan.Win32.Agent", "Exploit.Kit", "Backdoor.Linux.Mirai", "Trojan-Downloader.JS.Agent",
    "Ransom.Win32.Locker", "Scanner", "Botnet", "TOR exit", "Spam", "HEUR:Trojan.Script.Generic", "Adware",
)  # fmt: skip
_FAMILIES = ("ExampleBot", "Emotet", "QakBot", "Mirai", "Zeus", "Necurs", "Dridex", "TrickBot")
_USERS = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar")

# Address pools (integers).  CIDRs count up from 10.0.0.0/8; single addresses fill 100.64.0.0/10 then
# count down from 99.0.0.0/8, so the two never meet below ~900 million indicators.
_CIDR_BASE = 10 << 24
_SINGLE_BASE = (100 << 24) | (64 << 16)
_SINGLE_FIRST = 1 << 22
_SRC_BASE = (192 << 24) | (168 << 16)  # event sources: 192.168.0.0/16
_DST_POOLS = (((172 << 24) | (16 << 16), 1 << 20), ((198 << 24) | (18 << 16), 1 << 17))  # 172.16/12, 198.18/15


def _mix(x: int) -> int:
    """splitmix64: a well-spread 64-bit value of ``x`` (pure, fast enough for 10 M calls)."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _ip(address: int) -> str:
    return f"{address >> 24}.{(address >> 16) & 255}.{(address >> 8) & 255}.{address & 255}"


def _date(bits: int) -> str:
    return f"2026-{1 + bits % 12:02d}-{1 + (bits >> 4) % 28:02d}"


def _split(record: int, total: int, special: int) -> tuple[bool, int]:
    """Record ``record`` of ``total``, ``special`` of them spread evenly: (is special, index in its kind)."""
    before = record * special // total
    if (record + 1) * special // total > before:
        return True, before
    return False, record - before


class _Layout:
    """How many records of each kind, and every record as a pure function of its number."""

    def __init__(self, indicators: int, seed: int) -> None:
        self.urls = indicators * URL_SHARE // 100
        self.domains = indicators * DOMAIN_SHARE // 100
        self.ips = indicators * IP_SHARE // 100
        self.hashes = indicators - self.urls - self.domains - self.ips
        self.masks = self.urls * MASK_SHARE // 100
        self.suffixes = self.domains * SUFFIX_SHARE // 100
        self.cidrs = self.ips * CIDR_SHARE // 100
        self.md5s = self.hashes // 4 * 2 + min(self.hashes % 4, 2)
        self.seed = seed
        keys = [_mix((seed & _M64) * 16 + i) for i in range(8)]
        self._k_url, self._k_host, self._k_mask, self._k_dom, self._k_ip, self._k_hash = keys[:6]
        # CIDR c has prefix 24 + c % 5; the five groups are packed largest first, so all stay aligned.
        counts = [(self.cidrs - g + 4) // 5 for g in range(5)]
        self._group_start = [sum(counts[h] << (8 - h) for h in range(g)) for g in range(5)]
        cidr_space = sum(counts[g] << (8 - g) for g in range(5))
        single_top = (
            100 if self.ips - self.cidrs <= _SINGLE_FIRST else 99 - ((self.ips - self.cidrs - _SINGLE_FIRST) >> 24)
        )
        if cidr_space and 10 + ((cidr_space - 1) >> 24) >= single_top:
            raise ValueError(f"{indicators} indicators do not fit the synthetic address space")

    # -- urls.json ----------------------------------------------------------------------------

    def url(self, record: int) -> tuple[str, str, int]:
        """(feed value, URL that matches it, random bits for the context) of URL record ``record``."""
        is_mask, index = _split(record, self.urls, self.masks)
        if is_mask:
            r = _mix(self._k_mask + index)
            word = _PATHS[r % len(_PATHS)]
            tail = f"{(r >> 8) & 0xFFFFFF:x}.{_EXTS[(r >> 32) % len(_EXTS)]}"
            if index % 2 == 0:
                sub = _SUBS[(r >> 40) % len(_SUBS)]
                return f"*.cdn{index}.example/{word}/*", f"http://{sub}.cdn{index}.example/{word}/{tail}", r
            return f"host{index}.example/{word}/*", f"http://host{index}.example/{word}/{tail}", r
        r = _mix(self._k_url + index)
        url = self.url_host(index // 3) + (
            f"/{_PATHS[r % len(_PATHS)]}/{index:x}/{_FILES[(r >> 8) % len(_FILES)]}.{_EXTS[(r >> 16) % len(_EXTS)]}"
        )
        if (r >> 24) & 1:
            url += f"?id={(r >> 25) & 0xFFFFFF:06x}"
        scheme = "https://" if (r >> 50) & 1 else "http://"
        return scheme + url, scheme + url, r

    def url_host(self, host_no: int) -> str:
        """The host of plain URLs ``3 * host_no`` to ``3 * host_no + 2``."""
        h = _mix(self._k_host + host_no)
        return f"{_WORDS[h % len(_WORDS)]}-{host_no:x}.{_MAL_SLDS[(h >> 8) % len(_MAL_SLDS)]}.example"

    def plain_urls(self) -> int:
        return self.urls - self.masks

    # -- domains.json -------------------------------------------------------------------------

    def domain(self, record: int) -> tuple[str, str, int]:
        """(feed value, a host name that matches it, random bits) of domain record ``record``."""
        is_suffix, index = _split(record, self.domains, self.suffixes)
        r = _mix(self._k_dom + record)
        if is_suffix:
            base = f"{_WORDS[r % len(_WORDS)]}-{index:x}.dyn.test"
            return "*." + base, f"{_SUBS[(r >> 8) % len(_SUBS)]}.{base}", r
        name = f"{r & 0xFFFFFFFF:08x}{index:x}.{_DOMAIN_SLDS[(r >> 32) % len(_DOMAIN_SLDS)]}.test"
        return name, name, r

    # -- ips.csv ------------------------------------------------------------------------------

    def ip(self, record: int) -> tuple[str, str, int]:
        """(feed value, an address that matches it, random bits) of IP record ``record``."""
        is_cidr, index = _split(record, self.ips, self.cidrs)
        r = _mix(self._k_ip + record)
        if is_cidr:
            group = index % 5
            offset = self._group_start[group] + ((index // 5) << (8 - group))
            network = _CIDR_BASE + offset
            member = network + (r >> 20) % (1 << (8 - group))
            return f"{_ip(network)}/{24 + group}", _ip(member), r
        if index < _SINGLE_FIRST:
            address = _SINGLE_BASE + index
        else:
            rest = index - _SINGLE_FIRST
            address = ((99 - (rest >> 24)) << 24) | (rest & 0xFFFFFF)
        text = _ip(address)
        return text, text, r

    # -- hashes.csv ---------------------------------------------------------------------------

    def hash_value(self, record: int) -> str:
        """Record ``record`` of hashes.csv: MD5 when ``record % 4`` is 0 or 1, then SHA-1, SHA-256."""
        data = f"{self.seed}:hash:{record}".encode()
        kind = record % 4
        if kind < 2:
            return hashlib.md5(data).hexdigest()
        if kind == 2:
            return hashlib.sha1(data).hexdigest()
        return hashlib.sha256(data).hexdigest()

    def md5_record(self, md5_no: int) -> int:
        """The hashes.csv record number of the ``md5_no``-th MD5."""
        return md5_no // 2 * 4 + md5_no % 2


# -- writers ----------------------------------------------------------------------------------


def _write_json(fh: TextIO, count: int, record: Callable[[int], str]) -> None:
    """A JSON array with one record per line: ``[\\n{...},\\n{...}\\n]\\n``."""
    fh.write("[\n")
    for start in range(0, count, _CHUNK):
        if start:
            fh.write(",\n")
        fh.write(",\n".join([record(i) for i in range(start, min(start + _CHUNK, count))]))
    fh.write("\n]\n" if count else "]\n")


def _write_csv(fh: TextIO, header: str, count: int, record: Callable[[int], str]) -> None:
    fh.write(header + "\n")
    for start in range(0, count, _CHUNK):
        fh.write("\n".join([record(i) for i in range(start, min(start + _CHUNK, count))]) + "\n")


def _url_json(layout: _Layout) -> Callable[[int], str]:
    def record(i: int) -> str:
        value, _, r = layout.url(i)
        field = "mask" if "*" in value else "url"
        threat = _THREATS[(r >> 52) % len(_THREATS)]
        return f'{{"{field}": "{value}", "threat": "{threat}", "first_seen": "{_date(r >> 56)}"}}'

    return record


def _domain_json(layout: _Layout) -> Callable[[int], str]:
    def record(i: int) -> str:
        value, _, r = layout.domain(i)
        family = _FAMILIES[(r >> 40) % len(_FAMILIES)]
        if (r >> 48) & 1:
            return f'{{"domain": "{value}", "family": "{family}", "first_seen": "{_date(r >> 50)}"}}'
        return f'{{"domain": "{value}", "family": "{family}"}}'

    return record


def _ip_csv(layout: _Layout) -> Callable[[int], str]:
    def record(i: int) -> str:
        value, _, r = layout.ip(i)
        return f"{value},{_THREATS[(r >> 40) % len(_THREATS)]},{_date(r >> 48)}"

    return record


def _hash_csv(layout: _Layout) -> Callable[[int], str]:
    def record(i: int) -> str:
        return f"{layout.hash_value(i)},{_THREATS[(i * 7 + layout.seed) % len(_THREATS)]}"

    return record


# -- events -----------------------------------------------------------------------------------


class _Events:
    """Proxy events: mostly distinct benign URLs, a ``hit_rate`` share carrying one listed value."""

    def __init__(self, layout: _Layout, hit_rate: float, seed: int) -> None:
        self.layout = layout
        self.hit_rate = hit_rate
        self.rng = random.Random(seed)
        self.pickable = layout.urls + layout.domains + layout.ips + layout.md5s
        self.popular = [self._benign_url() for _ in range(2000)]  # the few URLs everybody fetches

    def _benign_host(self) -> str:
        rng = self.rng
        return f"{rng.choice(_SUBS)}.{rng.choice(_WORDS)}-{rng.randrange(100_000)}.example"

    def _benign_url(self) -> str:
        rng = self.rng
        path = "/".join(rng.choice(_PATHS) for _ in range(rng.randrange(1, 4)))
        url = f"{rng.choice(('http', 'https'))}://{self._benign_host()}/{path}/{rng.getrandbits(48):x}"
        url += f".{rng.choice(_BENIGN_EXTS)}"
        if rng.random() < 0.6:
            url += f"?v={rng.randrange(1000)}&sid={rng.getrandbits(64):016x}"
        return url

    def _other_url(self) -> str:
        """A URL that is not listed: popular, on a listed URL's host (other path), or new."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.1:
            return self.popular[int(len(self.popular) * rng.random() ** 3)]
        plain = self.layout.plain_urls()
        if roll < 0.15 and plain:
            host = self.layout.url_host(rng.randrange((plain + 2) // 3))
            return f"http://{host}/index-{rng.getrandbits(64):016x}.html"
        return self._benign_url()

    def _other_dst(self) -> str:
        base, size = _DST_POOLS[0] if self.rng.random() < 0.8 else _DST_POOLS[1]
        return _ip(base + self.rng.randrange(size))

    def lines(self, count: int) -> Iterator[tuple[str, str | None]]:
        """(event line, category it detects as or None) for events 1..count."""
        rng = self.rng
        layout = self.layout
        for n in range(1, count + 1):
            src = _ip(_SRC_BASE + rng.randrange(1 << 16))
            dst = self._other_dst()
            url = self._other_url()
            md5 = hashlib.md5(f"{layout.seed}:event:{n}".encode()).hexdigest() if rng.random() < 0.5 else ""
            category = None
            if self.pickable and rng.random() < self.hit_rate:
                pick = rng.randrange(self.pickable)
                if pick < layout.urls:
                    url = layout.url(pick)[1]
                    category = CATEGORY_URL
                elif (pick := pick - layout.urls) < layout.domains:
                    host = layout.domain(pick)[1]
                    url = f"http://{host}/{rng.choice(_FILES)}.{rng.choice(_EXTS)}"
                    category = CATEGORY_DOMAIN
                elif (pick := pick - layout.domains) < layout.ips:
                    dst = layout.ip(pick)[1]
                    category = CATEGORY_IP
                else:
                    md5 = layout.hash_value(layout.md5_record(pick - layout.ips))
                    category = CATEGORY_HASH
            action = "TCP_MISS" if rng.random() < 0.7 else "TCP_HIT"
            extra = f" md5={md5}" if md5 else f" out={rng.randrange(200, 2_000_000)}"
            user = f"{rng.choice(_USERS)}{rng.randrange(1000)}"
            tls = url.startswith("https")
            line = (
                f"{n} CEF:0|Squid|Proxy|3.5|{action}|GET|3|src={src} spt={rng.randrange(1024, 65536)} "
                f"dst={dst} dpt={443 if tls else 80} app={'HTTPS' if tls else 'HTTP'} url={url}{extra} suser={user}"
            )
            yield line, category


def _write_events(out_dir: str, layout: _Layout, events: int, hit_rate: float, seed: int) -> int:
    gen = _Events(layout, hit_rate, seed)
    hits = 0
    with (
        open(os.path.join(out_dir, "events.txt"), "w", encoding="ascii", newline="\n") as ev_fh,
        open(os.path.join(out_dir, "expected.txt"), "w", encoding="ascii", newline="\n") as exp_fh,
    ):
        lines: list[str] = []
        expected: list[str] = []
        for n, (line, category) in enumerate(gen.lines(events), 1):
            lines.append(line)
            if category is not None:
                hits += 1
                expected.append(f"{n} {category}")
            if len(lines) >= _CHUNK:
                ev_fh.write("\n".join(lines) + "\n")
                lines.clear()
        if lines:
            ev_fh.write("\n".join(lines) + "\n")
        if expected:
            exp_fh.write("\n".join(expected) + "\n")
    return hits


_NODE_CONF = """\
<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by `threatgate feeds generate` (indicators={indicators}, events={events}, seed={seed}). -->
<Configuration>
  <InputSettings>
    <ConnectionString>127.0.0.1:{port}</ConnectionString>
    <RegExps>
      <Source id="default">
        <REQ type="CONTEXT">^(\\d+)\\s</REQ>
        <RE_URL type="URL" extract="all">url=(\\S+)</RE_URL>
        <RE_IP type="IP" extract="all">(?:src|dst)=(\\d{{1,3}}(?:\\.\\d{{1,3}}){{3}})</RE_IP>
        <RE_MD5 type="MD5" extract="first">md5=([\\da-fA-F]{{32}})</RE_MD5>
      </Source>
    </RegExps>
  </InputSettings>
  <OutputSettings>
    <ConnectionString>127.0.0.1:9998</ConnectionString>
    <EventFormat>%REQ% category=%Category% matchedIndicator=%MatchedIndicator% \
confidence=%Confidence% source=%SourceId% %RecordContext%</EventFormat>
    <RecordFieldContextFormat>%ParamName%=%ParamValue%</RecordFieldContextFormat>
    <ActionableFieldContextFormat>%ParamName%:%ParamValue%</ActionableFieldContextFormat>
    <FinishedEventFormat enabled="true">%REQ% LookupFinished</FinishedEventFormat>
  </OutputSettings>
  <Feeds update_frequency="0" per_scan_detect_limit="0">
    <Feed filename="urls.json" enabled="true" confidence="100" category="{url}"/>
    <Feed filename="domains.json" enabled="true" confidence="90" category="{domain}"/>
    <Feed filename="ips.csv" enabled="true" confidence="80" category="{ip}"/>
    <Feed filename="hashes.csv" enabled="true" confidence="100" category="{hash}"/>
  </Feeds>
</Configuration>
"""


def generate(out_dir: str, *, indicators: int, events: int, hit_rate: float, seed: int, port: int) -> str:
    """Write urls.json, domains.json, ips.csv, hashes.csv, events.txt, expected.txt and node.conf.

    Returns a one-line summary.  Raises ValueError for arguments out of range.
    """
    if indicators < 0 or events < 0 or not 0.0 <= hit_rate <= 1.0 or not 1 <= port <= 65535:
        raise ValueError("indicators and events must be >= 0, hit_rate in [0, 1], port in 1..65535")
    layout = _Layout(indicators, seed)
    os.makedirs(out_dir, exist_ok=True)

    def out(name: str) -> TextIO:
        return open(os.path.join(out_dir, name), "w", encoding="ascii", newline="\n")

    with out("urls.json") as fh:
        _write_json(fh, layout.urls, _url_json(layout))
    with out("domains.json") as fh:
        _write_json(fh, layout.domains, _domain_json(layout))
    with out("ips.csv") as fh:
        _write_csv(fh, "ip,threat,first_seen", layout.ips, _ip_csv(layout))
    with out("hashes.csv") as fh:
        _write_csv(fh, "indicator,detection", layout.hashes, _hash_csv(layout))
    hits = _write_events(out_dir, layout, events, hit_rate, seed)
    with out("node.conf") as fh:
        fh.write(
            _NODE_CONF.format(
                indicators=indicators,
                events=events,
                seed=seed,
                port=port,
                url=CATEGORY_URL,
                domain=CATEGORY_DOMAIN,
                ip=CATEGORY_IP,
                hash=CATEGORY_HASH,
            )
        )
    return (
        f"wrote {indicators} indicators (urls {layout.urls}, domains {layout.domains}, ips {layout.ips}, "
        f"hashes {layout.hashes}) and {events} events ({hits} hits) to {out_dir}"
    )
