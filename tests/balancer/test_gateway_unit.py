"""Unit tests of the balancer's REST gateway pieces (no processes, no sockets).

The allow-list decision (_match_canonical on normalised paths), read versus write, the
headers sent upstream, the pin store and the fingerprint objects the connection pool is keyed on.  The
framing of service alert lines (balancer/alerts.py) is in tests/balancer/test_alerts.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import ssl
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock
from urllib.parse import quote

import pytest
from aiohttp.test_utils import make_mocked_request
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import example, given
from hypothesis import strategies as st
from multidict import CIMultiDict

from threatgate.balancer import gateway as gateway_module
from threatgate.balancer.gateway import HOP_BY_HOP, Gateway, _match_canonical, is_write
from threatgate.balancer.pins import Pin, PinStore
from threatgate.config.balancer import DEFAULT_ALLOWED, AllowedRequest, InstanceSettings
from threatgate.errors import FileWriteError, PathError, PeerCertificateMismatch, PinMismatch, UpstreamFailed
from threatgate.lb.instances import Instance
from threatgate.net import http1
from threatgate.net.tls import fingerprint_sha256
from threatgate.stats import BalancerStats
from threatgate.wire.paths import RoutePattern, canonical_version, normalize_path


def make_cert(name: str = "node") -> bytes:
    """A self-signed certificate, DER."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def certs() -> tuple[bytes, bytes]:
    return make_cert("first"), make_cert("second")


def settings(host: str = "127.0.0.1", matching_port: int = 10001, api_port: int = 10443) -> InstanceSettings:
    return InstanceSettings(host=host, matching_port=matching_port, api_port=api_port)


def rules(*pairs: tuple[str, str]) -> tuple[AllowedRequest, ...]:
    return tuple(AllowedRequest(method=m, pattern=RoutePattern.parse(p), text=f"{m} {p}") for m, p in pairs)


def make_gateway(tmp_path: Path, allowed: tuple[AllowedRequest, ...] = ()) -> Gateway:
    """A Gateway on a stand-in service: just what the checks, the pin store and the pool need."""
    config = SimpleNamespace(cert_dir=str(tmp_path / "pins"), allowed=allowed, api_upstream_timeout=5.0)
    service = SimpleNamespace(config=config, stats=BalancerStats(), instances={}, rng=None)
    return Gateway(service)  # type: ignore[arg-type]


# -- is_write: fan-out or one node --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "segments", "write"),
    [
        ("GET", ("api", "1.1", "suppliers"), False),
        ("HEAD", ("api", "1.1", "suppliers"), False),
        ("GET", ("ioc_exports", "urls"), False),
        ("POST", ("api", "1.1", "lookup"), False),  # a lookup changes nothing
        ("POST", ("api", "1.1", "suppliers"), True),
        ("PUT", ("api", "1.1", "suppliers", "x", "indicators"), True),
        ("DELETE", ("api", "1.1", "suppliers", "x"), True),
        ("PATCH", ("api", "1.1", "lookup"), True),
        ("PUT", ("api", "1.1", "lookup"), True),  # only POST lookup is a read
        ("POST", (), True),
    ],
)
def test_is_write(method: str, segments: tuple[str, ...], write: bool) -> None:
    assert is_write(method, segments) is write


# -- _match_canonical and the allow-list decision ---------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "segments", "match"),
    [
        ("/api/{version}/lookup", ("api", "1.1", "lookup"), True),
        ("/api/{version}/lookup", ("api", "9.9", "lookup"), True),  # the node answers 404 for a version it lacks
        ("/api/{version}/lookup", ("api", "", "lookup"), False),  # a placeholder is one non-empty segment
        ("/api/v.1.1/suppliers", ("api", "1.1", "suppliers"), True),  # both spellings are one pattern
        ("/api/1.1/suppliers", ("api", "1.1", "suppliers"), True),
        ("/api/1.1/suppliers", ("api", "1.2", "suppliers"), False),
        ("/api/1.1/lookup", ("api", "1.1", "Lookup"), False),  # literal, case-sensitive
        ("/api/1.1/lookup", ("api", "1.1", "lookup;x"), False),
        ("/api/1.1/lookup", ("api", "1.1", "lookup", "x"), False),
        ("/api/1.1/suppliers/{name}", ("api", "1.1", "suppliers"), False),
        ("/api/1.1/suppliers/{name}", ("api", "1.1", "suppliers", "a/b"), True),  # %2F stays in the name
        ("/api/1.1/suppliers/{name}", ("api", "1.1", "suppliers", "a", "b"), False),
        ("/ioc_exports/{task}", ("ioc_exports", "urls"), True),
        ("/", (), True),
    ],
)
def test_match_canonical(pattern: str, segments: tuple[str, ...], match: bool) -> None:
    assert _match_canonical(RoutePattern.parse(pattern).segments, segments) is match


BALANCER_EXAMPLE = rules(("POST", "/api/1.1/lookup"), ("GET", "/api/v.1.1/suppliers"))


@pytest.mark.parametrize(
    ("method", "target", "allowed"),
    [
        ("POST", "/api/1.1/lookup", True),
        ("POST", "/api/v.1.1/lookup", True),
        ("GET", "/api/1.1/suppliers", True),
        ("GET", "/api/v.1.1/suppliers?x=1", True),
        ("GET", "//api//1.1//suppliers/", True),
        ("GET", "/api/1.1/suppliers/x/..", True),
        ("GET", "/api/1.1/suppliers/x/%2E%2e", True),
        ("POST", "/api/1.1/lookup/../suppliers", False),
        ("GET", "/api/1.1/suppliers/x/../../tags", False),
        ("GET", "/api/1.1%2Fsuppliers", False),
        ("POST", "/api/1.1/lookup;x", False),
        ("post", "/api/1.1/lookup", False),
        ("gEt", "/api/1.1/suppliers", False),
        ("PUT", "/api/1.1/lookup", False),
        ("GET", "/api/1.1/suppliers/FalsePositive", False),
    ],
)
def test_allowed_on_normalised_paths(tmp_path: Path, method: str, target: str, allowed: bool) -> None:
    gateway = make_gateway(tmp_path, BALANCER_EXAMPLE)
    assert gateway._allowed(method, canonical_version(normalize_path(target))) is allowed


def test_route_verdicts_are_remembered_per_allow_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The remembered verdict is the one the checks give; a new allow-list (SIGHUP) decides afresh; bounded."""
    gateway = make_gateway(tmp_path, BALANCER_EXAMPLE)
    route = gateway._route("POST", "/api/v.1.1/./lookup?x=%201")
    assert (route.segments, route.allowed, route.upstream, route.write) == (
        ("api", "1.1", "lookup"),
        True,
        "/api/1.1/lookup?x=%201",
        False,
    )
    assert gateway._route("POST", "/api/v.1.1/./lookup?x=%201") is route
    put = gateway._route("PUT", "/api/1.1/suppliers/a%2Fb")
    assert (put.allowed, put.upstream, put.write) == (False, "/api/1.1/suppliers/a%2Fb", True)
    gateway.service.config.allowed = rules(("PUT", "/api/1.1/suppliers/{name}"))  # type: ignore[misc]
    assert gateway._route("PUT", "/api/1.1/suppliers/a%2Fb").allowed
    assert not gateway._route("POST", "/api/v.1.1/./lookup?x=%201").allowed
    with pytest.raises(PathError):
        gateway._route("GET", "/api/%zz")
    monkeypatch.setattr(gateway_module, "ROUTES_KEPT", 3)
    for i in range(10):
        gateway._route("GET", f"/api/1.1/suppliers?page={i}")
    assert len(gateway._routes) <= 3


SEGMENTS = st.sampled_from(
    ["api", "1.1", "v.1.1", "v.", "lookup", "suppliers", "tags", "x", "a%2Fb", "%2e%2e", "..", ".", "", "%20", "%25"]
)


@given(st.lists(SEGMENTS, max_size=6), st.sampled_from(["GET", "POST", "PUT"]))
@example(["api", "v.", "suppliers", "x"], "GET")
@example(["api", "v.1.1", "suppliers", "a%2Fb"], "GET")
def test_an_allowed_request_reaches_the_node_as_allowed(parts: list[str], method: str) -> None:
    """What the gateway forwards (segments re-encoded) normalises, at the node, to the very segments the
    allow-list accepted: no encoding can make the node see another request."""
    gateway = make_gateway(Path("/nonexistent"), rules(*DEFAULT_ALLOWED, ("PUT", "/api/{v}/suppliers/{name}")))
    try:
        segments = canonical_version(normalize_path("/" + "/".join(parts)))
    except PathError:
        return
    if not gateway._allowed(method, segments):
        return
    forwarded = "/" + "/".join(quote(s, safe="") for s in segments)  # as Gateway._handle rebuilds it
    assert normalize_path(forwarded) == segments


# -- headers sent upstream ------------------------------------------------------------------------------------


def upstream(headers: list[tuple[str, str]], peer: str = "192.0.2.10") -> dict[str, str]:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (peer, 4321) if name == "peername" else default
    request = make_mocked_request("GET", "/api/1.1/suppliers", headers=CIMultiDict(headers), transport=transport)
    return Gateway._upstream_headers(request)


def test_hop_by_hop_and_our_own_headers_are_not_copied() -> None:
    sent = [(name.title(), "x") for name in sorted(HOP_BY_HOP)]
    assert set(HOP_BY_HOP) >= {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "expect"}
    assert set(HOP_BY_HOP) >= {"proxy-authorization", "proxy-connection", "host", "content-length"}
    out = upstream([*sent, ("Authorization", "Basic YTpi"), ("Accept", "application/json")])
    assert out == {
        "Authorization": "Basic YTpi",
        "Accept": "application/json",
        "X-Forwarded-For": "x, 192.0.2.10",  # the client's value kept, the peer appended
        "X-Forwarded-Proto": "https",
        "X-Real-IP": "192.0.2.10",
    }


def test_headers_named_by_any_connection_line_are_hop_by_hop() -> None:
    out = upstream(
        [
            ("Connection", "keep-alive, X-One"),
            ("Connection", " x-TWO ,"),
            ("X-One", "1"),
            ("x-two", "2"),
            ("X-Three", "3"),
        ]
    )
    assert "X-One" not in out and "x-two" not in out
    assert out["X-Three"] == "3"


def test_repeated_fields_keep_every_value_in_order() -> None:
    out = upstream(
        [
            ("Accept", "text/plain"),
            ("accept", "application/json"),
            ("Cookie", "a=1"),
            ("Cookie", "b=2"),
            ("X-Forwarded-For", "203.0.113.1"),
            ("X-Forwarded-For", "203.0.113.2, 203.0.113.3"),
            ("X-Real-IP", "198.51.100.1"),
            ("X-Forwarded-Proto", "http"),
        ]
    )
    assert out["Accept"] == "text/plain, application/json" and "accept" not in out
    assert out["Cookie"] == "a=1; b=2"
    assert out["X-Forwarded-For"] == "203.0.113.1, 203.0.113.2, 203.0.113.3, 192.0.2.10"
    assert out["X-Real-IP"] == "192.0.2.10" and out["X-Forwarded-Proto"] == "https"


# -- PinStore -----------------------------------------------------------------------------------------------------


def test_pin_file_names_follow_instance_and_matching_port(tmp_path: Path) -> None:
    store = PinStore(str(tmp_path))
    assert store.path(settings()) == str(tmp_path / "127.0.0.1_10001.pem")
    assert store.path(settings(api_port=1)) == store.path(settings())  # the API port is not part of the name
    assert store.path(settings(host="node-1.example", matching_port=9999)) == str(tmp_path / "node-1.example_9999.pem")
    assert store.path(settings(host="::1")) == str(tmp_path / "::1_10001.pem")


def test_save_and_load(tmp_path: Path, certs: tuple[bytes, bytes]) -> None:
    der = certs[0]
    directory = tmp_path / "deep" / "pins"
    store = PinStore(str(directory))
    assert store.load(settings()) is None and store.cached(settings()) is None and store.all() == []
    pin = store.save(settings(), der)
    path = Path(pin.path)
    assert path == directory / "127.0.0.1_10001.pem"
    assert path.stat().st_mode & 0o777 == 0o600
    assert directory.stat().st_mode & 0o777 == 0o700 and (tmp_path / "deep").stat().st_mode & 0o777 == 0o700
    assert ssl.PEM_cert_to_DER_cert(path.read_text()) == der
    assert os.listdir(directory) == [path.name]  # no temporary file left behind
    loaded = store.load(settings())
    assert loaded == pin == Pin(str(path), der)
    assert loaded.sha256 == hashlib.sha256(der).digest()
    assert loaded.fingerprint == fingerprint_sha256(der) == fingerprint_sha256(path.read_bytes())


def test_a_damaged_pin_is_an_error_never_no_pin(tmp_path: Path) -> None:
    store = PinStore(str(tmp_path))
    Path(store.path(settings())).write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    with pytest.raises(ValueError, match="holds no PEM certificate; remove it or renew the pin"):
        store.load(settings())
    with pytest.raises(ValueError):
        store.cached(settings())
    assert store.all() == []  # listed nowhere, but never taken for a missing pin


def test_cached_pins_follow_the_file(tmp_path: Path, certs: tuple[bytes, bytes]) -> None:
    store = PinStore(str(tmp_path))
    first = store.save(settings(), certs[0])
    hit = store.cached(settings())
    assert hit == first and store.cached(settings()) is hit  # one stat, no read
    renewed = store.save(settings(), certs[1])  # a new file (atomic rename): seen at once
    assert store.cached(settings()) == renewed != first
    os.unlink(renewed.path)
    assert store.cached(settings()) is None


def test_all_lists_every_pin_file(tmp_path: Path, certs: tuple[bytes, bytes]) -> None:
    store = PinStore(str(tmp_path))
    a = store.save(settings(matching_port=1), certs[0])
    b = store.save(settings(host="old-host", matching_port=2), certs[1])  # a pin of a host no longer configured
    (tmp_path / "notes.txt").write_text("not a pin")
    (tmp_path / "broken.pem").write_text("garbage")
    assert sorted(p.path for p in store.all()) == sorted([a.path, b.path])


def test_an_unwritable_pin_directory_raises_file_write_error(tmp_path: Path, certs: tuple[bytes, bytes]) -> None:
    (tmp_path / "file").write_text("a file where the pin directory should be")
    with pytest.raises(FileWriteError, match="cannot write"):
        PinStore(str(tmp_path / "file" / "pins")).save(settings(), certs[0])


# -- the gateway's pinned connections -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spoil", "error"),
    [
        # A file where the directory should be: the pin cannot even be looked for.
        (lambda pins: pins.write_text("a file"), "cannot read the reference certificate: .*Not a directory"),
        # A dangling symlink: no pin yet, and the one presented cannot be saved.
        (lambda pins: pins.symlink_to(pins.parent / "gone"), "cannot save the reference certificate: cannot write"),
    ],
    ids=["file-in-the-way", "dangling-symlink"],
)
async def test_a_pin_directory_in_a_bad_state_fails_that_node_only(
    tmp_path: Path, certs: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch, spoil: Any, error: str
) -> None:
    """CertDirPath unusable: the node cannot be used (another one is tried), never an internal error."""
    spoil(tmp_path / "pins")
    gateway = make_gateway(tmp_path)

    async def presented(host: str, port: int, connect_timeout: float) -> bytes:
        return certs[0]

    monkeypatch.setattr(gateway_module, "fetch_certificate", presented)
    inst = Instance(settings(), rise=1, fall=1)
    with pytest.raises(UpstreamFailed, match=error):
        await gateway.pin_of(inst)


async def test_a_pool_refusing_the_certificate_takes_the_instance_out_of_rotation(
    tmp_path: Path, certs: tuple[bytes, bytes]
) -> None:
    """The pool's PeerCertificateMismatch becomes the gateway's PinMismatch (both fingerprints) and a refusal;
    the next answer under the pin brings the instance back."""
    gateway = make_gateway(tmp_path)
    inst = Instance(settings(), rise=1, fall=1)
    pin = gateway.pins.save(inst.settings, certs[0])
    presented = hashlib.sha256(certs[1]).digest()
    asked: list[tuple[bytes, str, str]] = []

    class Pool:
        async def request(self, digest: bytes, method: str, target: str, *rest: Any) -> Any:
            asked.append((digest, method, target))
            if len(asked) == 1:
                raise PeerCertificateMismatch(digest, presented)
            return http1.Response(200, [("X-Node", "a"), ("Content-Length", "2"), ("Server", "x")], b"[]", True)

    gateway._pool = lambda host, port: Pool()  # type: ignore[method-assign,assignment,return-value]
    with pytest.raises(PinMismatch) as caught:
        await gateway.forward(inst, "GET", "/api/1.1/suppliers", {}, b"")
    assert (caught.value.expected, caught.value.got) == (pin.fingerprint, fingerprint_sha256(certs[1]))
    assert inst.key in gateway.refused and gateway.inflight[inst.key] == 0
    answer = await gateway.forward(inst, "GET", "/api/1.1/suppliers", {}, b"")
    assert (answer.status, answer.headers, answer.body) == (200, {"X-Node": "a"}, b"[]")
    assert inst.key not in gateway.refused
    assert asked == [(pin.sha256, "GET", "/api/1.1/suppliers")] * 2


async def test_concurrent_first_requests_save_one_pin(
    tmp_path: Path, certs: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = make_gateway(tmp_path)
    fetched: list[int] = []

    async def presented(host: str, port: int, connect_timeout: float) -> bytes:
        fetched.append(port)
        await asyncio.sleep(0.01)
        return certs[0]

    monkeypatch.setattr(gateway_module, "fetch_certificate", presented)
    inst = Instance(settings(), rise=1, fall=1)
    pins = await asyncio.gather(*(gateway.pin_of(inst) for _ in range(5)))
    assert fetched == [10443]  # the node's API port, once
    assert {p.der for p in pins} == {certs[0]}


# -- balancer pins (verify.py) ---------------------------------------------------------------------------------------


def test_pin_rows_report_missing_pinned_and_unreadable(tmp_path: Path, certs: tuple[bytes, bytes]) -> None:
    from threatgate.balancer.verify import pin_rows

    instances = (settings(matching_port=1), settings(matching_port=2), settings(matching_port=3))
    config = SimpleNamespace(cert_dir=str(tmp_path / "pins"), instances=instances)
    store = PinStore(config.cert_dir)
    saved = store.save(instances[1], certs[0])
    Path(store.path(instances[2])).write_text("garbage")
    rows = asyncio.run(pin_rows(config, probe=False))  # type: ignore[arg-type]
    assert [(r.instance, r.state, r.fingerprint) for r in rows] == [
        ("127.0.0.1:1", "none", ""),
        ("127.0.0.1:2", "pinned", saved.fingerprint),
        (
            "127.0.0.1:3",
            f"unreadable: {store.path(instances[2])} holds no PEM certificate; remove it or renew the pin",
            "",
        ),
    ]
    os.unlink(store.path(instances[2]))
    os.unlink(saved.path)
    os.rmdir(config.cert_dir)
    Path(config.cert_dir).write_text("a file where the directory should be")
    rows = asyncio.run(pin_rows(config, probe=False))  # type: ignore[arg-type]
    assert all(r.state.startswith("unreadable: ") and "Not a directory" in r.state for r in rows), rows


# -- pins --renew: a pin follows a new certificate only once someone confirmed it ---------------------------------

OLD, NEW = "AA:" * 31 + "AA", "BB:" * 31 + "BB"


@pytest.mark.parametrize(
    ("pinned", "expect", "interactive", "decision"),
    [
        (NEW, None, False, "nothing"),  # it presents its pin: nothing to confirm
        (NEW, OLD, False, "nothing"),
        (OLD, NEW, False, "renew"),  # confirmed out of band
        (OLD, NEW, True, "renew"),
        ("", NEW, False, "renew"),  # no pin yet
        (OLD, OLD, False, "refuse_other"),  # another certificate than the one confirmed: someone in between
        (OLD, None, True, "ask"),
        (OLD, None, False, "refuse_unconfirmed"),  # a script: never follow whatever answers
        ("", None, False, "refuse_unconfirmed"),
    ],
)
def test_decide_renewal(pinned: str, expect: str | None, interactive: bool, decision: str) -> None:
    from threatgate.balancer.verify import decide_renewal

    assert decide_renewal(pinned, NEW, expect, interactive).value == decision


@pytest.mark.parametrize(
    ("text", "canonical_form"),
    [
        (NEW, NEW),
        (NEW.replace(":", "").lower(), NEW),
        (" " + NEW.lower() + " ", NEW),
        (NEW[:-3], None),  # 31 bytes
        (NEW.replace("B", "G"), None),
        ("", None),
    ],
)
def test_fingerprint_text(text: str, canonical_form: str | None) -> None:
    from threatgate.balancer.verify import fingerprint_text

    assert fingerprint_text(text) == canonical_form


# -- the operator console: answered here, before the allow-list, never forwarded -----------------------------


class FakeConsole:
    def __init__(self) -> None:
        self.seen: list[tuple[str, ...]] = []

    async def handle(self, request: Any, segments: tuple[str, ...]) -> Any:
        from aiohttp import web

        self.seen.append(segments)
        return web.Response(status=299)

    def started(self, url: str) -> None:
        pass

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("allowed", "target", "console"),
    [
        ((), "/console/", True),  # no rule for it: still the console's
        (rules(("GET", "/console/{page}")), "/console/api", True),  # a rule for it: still never forwarded
        ((), "/api/1.1/../../console/api/state", True),
        ((), "/console/../api/1.1/tags", False),  # climbs out: an API request, refused by the allow-list
        ((), "/console/%2e%2e/api/1.1/tags", False),
        ((), "/consoles/x", False),
    ],
)
async def test_the_console_is_reached_before_the_allow_list(
    tmp_path: Path, allowed: tuple[AllowedRequest, ...], target: str, console: bool
) -> None:
    gateway = make_gateway(tmp_path, allowed)
    fake = FakeConsole()
    gateway.console = fake
    response = await gateway.handle(make_mocked_request("GET", target))
    assert (response.status == 299) is console, response.status
    assert bool(fake.seen) is console
    if not console:
        assert response.status == 403
