"""``threatgate balancer verify`` and ``pins``: the seed's manual certificate check, automated.

CyberTrace's procedure ("Checking certificate settings") stops the Balancer, disables every instance
but one, sends ``GET /api/v.1.1/suppliers`` through the Balancer and looks for 200 and the suppliers,
then restores the config.  ``verify`` does the same for each enabled instance without editing the
config or stopping anything: it sends the request to that instance alone through the gateway's own
code path (:meth:`Gateway.forward`, pinning included; a missing pin is saved exactly as the gateway
would), and reports status, suppliers, pinned fingerprint and any mismatch.
"""

from __future__ import annotations

import base64
import enum
import json
from dataclasses import dataclass, field
from typing import Any

from threatgate.balancer.gateway import Gateway, fetch_certificate
from threatgate.balancer.pins import PinStore
from threatgate.config.balancer import BalancerConfig, InstanceSettings
from threatgate.errors import PinMismatch, UpstreamFailed
from threatgate.lb.instances import Instance
from threatgate.net.describe import body_text, describe
from threatgate.net.tls import fingerprint_sha256


@dataclass(slots=True)
class Verdict:
    instance: str
    ok: bool
    status: int = 0
    suppliers: list[str] = field(default_factory=list)
    pin: str = ""
    pin_path: str = ""
    problem: str = ""


class _Standalone:
    """Just enough of a BalancerService for :class:`Gateway` to forward requests."""

    def __init__(self, config: BalancerConfig) -> None:
        import random

        from threatgate.stats import BalancerStats

        self.config = config
        self.stats = BalancerStats()
        self.instances: dict[str, Instance] = {}
        self.rng = random.Random()


async def verify(config: BalancerConfig, user: str | None, password: str | None) -> list[Verdict]:
    """Check every enabled instance: pinned TLS, then GET suppliers through the gateway's path."""
    service = _Standalone(config)
    gateway = Gateway(service)  # type: ignore[arg-type]
    await gateway.open_client()
    headers = {"Accept": "application/json"}
    if user is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password or ''}".encode()).decode()
    out: list[Verdict] = []
    try:
        for settings in config.instances:
            if not settings.enabled:
                continue
            inst = Instance(settings, rise=1, fall=1)
            verdict = Verdict(settings.key, ok=False, pin_path=gateway.pins.path(settings))
            try:
                answer = await gateway.forward(inst, "GET", "/api/1.1/suppliers", headers, b"")
            except PinMismatch as exc:
                verdict.problem = exc.reason
                verdict.pin = exc.expected
                out.append(verdict)
                continue
            except UpstreamFailed as exc:
                verdict.problem = f"no answer: {exc}"
                out.append(verdict)
                continue
            pin = gateway.pins.load(settings)
            verdict.pin = pin.fingerprint if pin is not None else ""
            verdict.status = answer.status
            body: Any = _json(answer.body)
            if answer.status == 200 and isinstance(body, list):
                verdict.suppliers = [str(s.get("name")) for s in body if isinstance(s, dict)]
                verdict.ok = True
            else:
                verdict.problem = f"HTTP {answer.status}: {body_text(answer.body)}"
            out.append(verdict)
    finally:
        await gateway.close()
    return out


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data[:200].decode("utf-8", "replace")


@dataclass(slots=True)
class PinRow:
    instance: str
    path: str
    fingerprint: str
    presented: str = ""
    state: str = ""


async def pin_rows(config: BalancerConfig, probe: bool) -> list[PinRow]:
    """Each configured instance's pin, and (with ``probe``) whether the node presents it now."""
    store = PinStore(config.cert_dir)
    rows: list[PinRow] = []
    for settings in config.instances:
        try:
            pin = store.load(settings)
        except (ValueError, OSError) as exc:  # a damaged file, or CertDirPath unusable
            rows.append(PinRow(settings.key, store.path(settings), "", state=f"unreadable: {describe(exc)}"))
            continue
        row = PinRow(
            settings.key, store.path(settings), pin.fingerprint if pin else "", state="pinned" if pin else "none"
        )
        if probe:
            try:
                row.presented = fingerprint_sha256(await fetch_certificate(settings.host, settings.api_port, 5.0))
                if pin is not None:
                    row.state = "match" if row.presented == pin.fingerprint else "MISMATCH"
            except (OSError, TimeoutError) as exc:
                row.presented = f"unreachable ({describe(exc)})"
        rows.append(row)
    return rows


@dataclass(frozen=True, slots=True)
class Presented:
    """What an instance presents now, next to its pin: what ``pins --renew`` shows before replacing it."""

    settings: InstanceSettings
    path: str
    old: str  # the pinned fingerprint, "" when there is no (readable) pin
    der: bytes

    @property
    def new(self) -> str:
        return fingerprint_sha256(self.der)


class Renewal(enum.Enum):
    """What ``pins --renew`` does with what the node presents (:func:`decide_renewal`)."""

    NOTHING = "nothing"  # it presents its pinned certificate
    RENEW = "renew"  # it presents the certificate --expect names
    REFUSE_OTHER = "refuse_other"  # it presents another certificate than --expect names
    ASK = "ask"  # no --expect, at a terminal: show both and ask
    REFUSE_UNCONFIRMED = "refuse_unconfirmed"  # no --expect and nobody to ask


def decide_renewal(pinned: str, presented: str, expect: str | None, interactive: bool) -> Renewal:
    """Whether a pin may follow the certificate a node presents now: only once someone confirmed it,
    by naming its fingerprint (``expect``, learnt on the node itself) or by answering at a terminal."""
    if presented == pinned:
        return Renewal.NOTHING
    if expect is not None:
        return Renewal.RENEW if expect == presented else Renewal.REFUSE_OTHER
    return Renewal.ASK if interactive else Renewal.REFUSE_UNCONFIRMED


def fingerprint_text(text: str) -> str | None:
    """``AB:CD:...`` (64 hex digits; colons, spaces and case as one likes) in the form threatgate prints, else None."""
    digits = "".join(c for c in text if c not in ": ").upper()
    if len(digits) != 64 or any(c not in "0123456789ABCDEF" for c in digits):
        return None
    return ":".join(digits[i : i + 2] for i in range(0, 64, 2))


async def presented(config: BalancerConfig, instance: str) -> Presented:
    """The certificate ``instance`` (its key ``host:matching_port`` or host) presents now, and its pin.

    Raises:
        KeyError: no such instance in the config (or more than one by that host).
        OSError, TimeoutError: the node cannot be reached.
    """
    matches = [s for s in config.instances if instance in (s.key, s.host)]
    if len(matches) != 1:
        known = ", ".join(s.key for s in config.instances)
        raise KeyError(f"{instance!r} names {len(matches)} instances; use host:matching_port, one of {known}")
    settings = matches[0]
    store = PinStore(config.cert_dir)
    try:
        old = store.load(settings)
    except (ValueError, OSError):  # damaged or unreadable: replaced all the same (or the save says why not)
        old = None
    der = await fetch_certificate(settings.host, settings.api_port, 10.0)
    return Presented(settings, store.path(settings), old.fingerprint if old else "", der)


def save_pin(config: BalancerConfig, shown: Presented) -> str:
    """Make what ``shown`` presented the instance's pin (blocking); its path.

    Raises:
        FileWriteError: the pin cannot be written (CertDirPath).
    """
    return PinStore(config.cert_dir).save(shown.settings, shown.der).path
