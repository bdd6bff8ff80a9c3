"""A small asyncio etcd v3 client over etcd's HTTP/JSON gRPC gateway, and a lease-based leader election.

Why the JSON gateway and not python-etcd3: python-etcd3 ships protobuf modules generated for an old protobuf
and no longer imports with current protobuf releases, and grpcio would add a large native dependency for a
handful of calls.  Every etcd v3 server (3.4 and later) serves the same API as JSON on its client port
(``POST /v3/kv/range`` ...), so aiohttp, which threatgate already uses, is enough.

What the gateway does that a gRPC client would not show (checked against etcd 3.4.23):

* keys and values are base64 strings; int64 fields (revisions, lease IDs, TTLs) come back as JSON strings;
* fields at their zero value are left out: a PUT watch event has no ``type``, an empty value no ``value``,
  a dead lease's keep-alive answer no ``TTL``, an unknown key's range no ``kvs``;
* unary errors are ``{"error", "message", "code"}`` (gRPC code) with an HTTP status (Unavailable 503,
  NotFound 404, InvalidArgument 400, ResourceExhausted 429 for a request over ~2 MiB); streams (watch,
  keep-alive) wrap each message as ``{"result": ...}`` and an error as ``{"error": {"grpc_code": ...}}``,
  one JSON object per line;
* a watch first answers ``created``; a compacted start revision then arrives as a separate ``canceled``
  message carrying ``compact_revision``;
* when the leader dies, a proposal sent to a follower is not refused but hangs until the server's request
  timeout (about 6 s with short election timers), hence the client-side timeout and fail-over;
* maintenance status uses camelCase names (``raftTerm``, ``dbSize``) while KV messages use snake_case.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import ssl
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import aiohttp

from threatgate.errors import EtcdError
from threatgate.net.describe import body_text, describe, printable

log = logging.getLogger("threatgate.cluster")

# gRPC status codes worth trying another member for: the member cannot serve now, another one may.
_GRPC_UNAVAILABLE = 14
_GRPC_DEADLINE_EXCEEDED = 4
_GRPC_NOT_FOUND = 5
_RETRYABLE_GRPC_CODES = frozenset({_GRPC_UNAVAILABLE, _GRPC_DEADLINE_EXCEEDED})
_BIG_BODY = 1 << 19


# -- encoding -----------------------------------------------------------------------------------------------


def _bytes_of(key: str) -> bytes:
    # surrogateescape: a key some other client wrote as non-UTF-8 bytes still round-trips through str
    return key.encode("utf-8", "surrogateescape")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64key(key: str) -> str:
    return _b64(_bytes_of(key))


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _int(obj: dict[str, Any], name: str) -> int:
    """An int64 field: a JSON string (or number), absent when zero."""
    return int(obj.get(name, 0))


def prefix_range_end(prefix: bytes) -> bytes:
    """The ``range_end`` that selects every key starting with ``prefix`` (etcd's ``GetPrefixRangeEnd``)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # an empty (or all-0xff) prefix: every key


def _prefix_range(prefix: str) -> dict[str, str]:
    """``key`` and ``range_end`` of a prefix request.  etcd refuses an empty key, so "every key" is
    key ``\\0`` to range_end ``\\0``."""
    raw = _bytes_of(prefix)
    return {"key": _b64(raw or b"\0"), "range_end": _b64(prefix_range_end(raw))}


# -- data types ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd stores it; revisions are etcd's global revision counter, ``version`` counts writes."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> KeyValue:
        return cls(
            key=_unb64(obj.get("key", "")).decode("utf-8", "surrogateescape"),
            value=_unb64(obj.get("value", "")),
            create_revision=_int(obj, "create_revision"),
            mod_revision=_int(obj, "mod_revision"),
            version=_int(obj, "version"),
            lease=_int(obj, "lease"),
        )


@dataclass(frozen=True)
class WatchEvent:
    """A change seen by :meth:`EtcdClient.watch`; a DELETE's ``kv`` has only key and mod_revision."""

    type: Literal["PUT", "DELETE"]
    kv: KeyValue


class MemberStatus(TypedDict):
    """What ``/v3/maintenance/status`` says about one member (IDs are etcd's 64-bit member IDs)."""

    member_id: int
    leader: int
    raft_term: int
    raft_index: int
    revision: int
    version: str


_COMPARE_FIELDS = {"VERSION": "version", "CREATE": "create_revision", "MOD": "mod_revision", "LEASE": "lease"}


@dataclass(frozen=True)
class Compare:
    """One condition of a :meth:`EtcdClient.txn`.  A missing key compares as all-zero (and never by value)."""

    key: str
    target: Literal["VERSION", "CREATE", "MOD", "VALUE", "LEASE"]
    value: int | bytes
    result: Literal["EQUAL", "GREATER", "LESS", "NOT_EQUAL"] = "EQUAL"

    @classmethod
    def mod_revision(cls, key: str, revision: int) -> Compare:
        return cls(key, "MOD", revision)

    @classmethod
    def create_revision(cls, key: str, revision: int) -> Compare:
        return cls(key, "CREATE", revision)

    @classmethod
    def value_is(cls, key: str, value: bytes) -> Compare:
        return cls(key, "VALUE", value)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": _b64key(self.key), "target": self.target, "result": self.result}
        if self.target == "VALUE":
            if not isinstance(self.value, bytes):
                raise TypeError("a VALUE comparison needs bytes")
            out["value"] = _b64(self.value)
        else:
            if not isinstance(self.value, int):
                raise TypeError(f"a {self.target} comparison needs an int")
            out[_COMPARE_FIELDS[self.target]] = str(self.value)
        return out


@dataclass(frozen=True)
class Op:
    """One request of a :meth:`EtcdClient.txn` branch: ``Op.put``, ``Op.delete`` or ``Op.get``."""

    kind: Literal["put", "delete", "get"]
    key: str
    value: bytes = b""
    lease: int = 0
    prefix: bool = False

    @classmethod
    def put(cls, key: str, value: bytes, lease: int = 0) -> Op:
        return cls("put", key, value, lease)

    @classmethod
    def delete(cls, key: str, *, prefix: bool = False) -> Op:
        return cls("delete", key, prefix=prefix)

    @classmethod
    def get(cls, key: str, *, prefix: bool = False) -> Op:
        return cls("get", key, prefix=prefix)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = (
            _prefix_range(self.key) if self.prefix and self.kind != "put" else {"key": _b64key(self.key)}
        )
        if self.kind == "put":
            body["value"] = _b64(self.value)
            if self.lease:
                body["lease"] = str(self.lease)
            return {"request_put": body}
        return {"request_delete_range" if self.kind == "delete" else "request_range": body}


@dataclass(frozen=True)
class TxnResult:
    """A transaction's outcome: which branch ran, the revision after it, the kvs of each ``Op.get`` in order."""

    succeeded: bool
    revision: int
    ranges: tuple[tuple[KeyValue, ...], ...]


# -- transport ----------------------------------------------------------------------------------------------


class _Unavailable(Exception):
    """This member cannot answer now (down, timed out, no leader): try the next one.  Never leaves the module."""


class _Refused(EtcdError):
    """etcd understood the request and said no (a 4xx answer); ``code`` is the gRPC status code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _load(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise _Unavailable(f"not a JSON answer: {printable(raw, 80)}") from exc
    if not isinstance(body, dict):
        raise _Unavailable(f"not a JSON object: {printable(raw, 80)}")
    return body


def _stream_error(body: dict[str, Any], where: str) -> None:
    """Raise what a streamed ``{"error": {...}}`` message says (retryable codes as _Unavailable)."""
    error = body.get("error")
    if error is None:
        return
    if isinstance(error, dict):
        code, message = int(error.get("grpc_code") or error.get("code") or 0), str(error.get("message", error))
    else:
        code, message = _int(body, "code"), str(body.get("message", error))
    if code in _RETRYABLE_GRPC_CODES:
        raise _Unavailable(message)
    raise _Refused(f"etcd {where}: {message}", code)


class _JsonLines:
    """Newline-delimited JSON messages of a gateway stream.

    Not ``StreamReader.readline``: aiohttp caps a line at its buffer size, and a watch event carrying a
    1 MiB value is a longer line than that.
    """

    def __init__(self, stream: aiohttp.StreamReader) -> None:
        self._stream = stream
        self._buf = bytearray()

    async def next(self) -> dict[str, Any] | None:
        """The next message's ``result``; None at the end of the stream."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                if not line.strip():
                    continue
                body = _load(line)
                _stream_error(body, "stream")
                result = body.get("result")
                if not isinstance(result, dict):
                    raise _Unavailable(f"stream message without result: {printable(line, 80)}")
                return result
            chunk = await self._stream.readany()
            if not chunk:
                if self._buf.strip():  # every message ends with a newline: the member died mid-message
                    raise _Unavailable("stream cut in the middle of a message")
                return None
            self._buf += chunk


class EtcdClient:
    """An etcd v3 client over the JSON gateway that fails over between the members of one cluster.

    Requests go to the member that answered last; a member that is down, times out or cannot serve
    (5xx, e.g. no leader) is skipped for the next one, each member at most once per call.  etcd's own
    refusals (4xx) are raised at once: another member would say the same.

    A write that timed out may still have been applied, and the retry on the next member then sees its
    own effect (``put_if`` reports a conflict).  Callers that care check the result, as :class:`Election`
    does by comparing the key's lease with its own.
    """

    def __init__(
        self, endpoints: Sequence[str], *, timeout: float = 5.0, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        if isinstance(endpoints, str) or not endpoints:
            raise ValueError("EtcdClient needs a non-empty list of endpoints")
        for endpoint in endpoints:
            if not endpoint.startswith(("http://", "https://")):
                raise ValueError(f"etcd endpoint {endpoint!r} must start with http:// or https://")
        self._endpoints = tuple(e.rstrip("/") for e in endpoints)
        self._timeout = timeout
        self._ssl = ssl_context
        self._current = 0
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self._endpoints

    @property
    def current_endpoint(self) -> str:
        """The member the next request goes to first (the one that answered last)."""
        return self._endpoints[self._current]

    def _http(self) -> aiohttp.ClientSession:
        if self._closed:
            raise EtcdError("the etcd client is closed")
        if self._session is None:  # created here, not in __init__: a session belongs to a running loop
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True)
            self._session = aiohttp.ClientSession(
                connector=connector, headers={"Content-Type": "application/json"}, raise_for_status=False
            )
        return self._session

    def _move_on_from(self, index: int) -> None:
        """Point at the member after ``index`` unless another call already moved away from it."""
        if self._current == index:
            self._current = (index + 1) % len(self._endpoints)

    def _unreachable(self, what: str, failures: list[tuple[str, str]]) -> EtcdError:
        tried = ", ".join(f"{endpoint} ({reason})" for endpoint, reason in failures)
        return EtcdError(f"etcd {what} failed on every endpoint: tried {tried}; last error: {failures[-1][1]}")

    async def _post_once(self, endpoint: str, path: str, data: bytes) -> dict[str, Any]:
        session = self._http()
        # aiohttp warns about (and writes in one go) a bytes body over 1 MiB: stream big ones from a buffer
        payload: bytes | io.BytesIO = io.BytesIO(data) if len(data) > _BIG_BODY else data
        try:
            async with session.post(
                endpoint + path, data=payload, timeout=aiohttp.ClientTimeout(total=self._timeout)
            ) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Unavailable(describe(exc)) from exc
        body = _load(raw)
        if status >= 500:
            raise _Unavailable(f"HTTP {status}: {body.get('message', raw[:80])}")
        if status != 200:
            raise _Refused(
                f"etcd {path} on {endpoint}: HTTP {status}: {body.get('message', raw[:80])}", _int(body, "code")
            )
        _stream_error(body, f"{path} on {endpoint}")  # keep-alive answers as a stream
        return body

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to the current member, failing over to each other member once."""
        data = json.dumps(body).encode()
        failures: list[tuple[str, str]] = []
        start = self._current
        for step in range(len(self._endpoints)):
            index = (start + step) % len(self._endpoints)
            endpoint = self._endpoints[index]
            try:
                answer = await self._post_once(endpoint, path, data)
            except _Unavailable as exc:
                log.debug("etcd %s on %s failed (%s), trying the next endpoint", path, endpoint, exc)
                failures.append((endpoint, str(exc)))
                self._move_on_from(index)
                continue
            self._current = index
            return answer
        raise self._unreachable(path, failures)

    # -- KV --------------------------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        body = await self._call("/v3/kv/range", {"key": _b64key(key)})
        kvs = body.get("kvs", [])
        return KeyValue.from_json(kvs[0]) if kvs else None

    async def get_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """Every key under ``prefix`` (sorted by key bytes) and the revision they were read at.

        The revision is what a caller passes (+1) to :meth:`watch` to see every later change exactly once.
        """
        body = await self._call("/v3/kv/range", _prefix_range(prefix))
        return _int(body.get("header", {}), "revision"), [KeyValue.from_json(kv) for kv in body.get("kvs", [])]

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Store ``value``; the revision of the write."""
        request: dict[str, Any] = {"key": _b64key(key), "value": _b64(value)}
        if lease:
            request["lease"] = str(lease)
        body = await self._call("/v3/kv/put", request)
        return _int(body.get("header", {}), "revision")

    async def delete(self, key: str) -> int:
        """Delete ``key``; how many keys were deleted (0 when it did not exist)."""
        body = await self._call("/v3/kv/deleterange", {"key": _b64key(key)})
        return _int(body, "deleted")

    async def txn(self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        """Run ``success`` if every comparison holds, else ``failure``, atomically."""
        body = await self._call(
            "/v3/kv/txn",
            {
                "compare": [c.to_json() for c in compares],
                "success": [op.to_json() for op in success],
                "failure": [op.to_json() for op in failure],
            },
        )
        ranges = tuple(
            tuple(KeyValue.from_json(kv) for kv in response["response_range"].get("kvs", []))
            for response in body.get("responses", [])
            if "response_range" in response
        )
        return TxnResult(bool(body.get("succeeded", False)), _int(body.get("header", {}), "revision"), ranges)

    async def put_if(self, key: str, value: bytes, *, mod_revision: int, lease: int = 0) -> tuple[bool, int]:
        """Compare-and-swap: write only if the key's mod_revision is still ``mod_revision`` (0: key absent).

        Returns (written, revision after the transaction).
        """
        result = await self.txn([Compare.mod_revision(key, mod_revision)], [Op.put(key, value, lease)])
        return result.succeeded, result.revision

    # -- leases ----------------------------------------------------------------------------------------------

    async def lease_grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds (etcd raises very short TTLs to its minimum); its ID."""
        body = await self._call("/v3/lease/grant", {"TTL": str(ttl), "ID": "0"})  # its "error" field: _post_once
        return _int(body, "ID")

    async def lease_keepalive(self, lease_id: int) -> int:
        """Renew the lease once; its TTL again, or 0 when the lease no longer exists (expired or revoked)."""
        body = await self._call("/v3/lease/keepalive", {"ID": str(lease_id)})
        return max(0, _int(body.get("result", {}), "TTL"))

    async def lease_revoke(self, lease_id: int) -> None:
        """Revoke the lease, deleting its keys now; a lease already gone is not an error."""
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease_id)})
        except _Refused as exc:
            if exc.code != _GRPC_NOT_FOUND:
                raise

    # -- maintenance -----------------------------------------------------------------------------------------

    async def status(self, endpoint: str) -> MemberStatus:
        """What member ``endpoint`` says about itself and the leader (no fail-over: it is about that member)."""
        try:
            body = await self._post_once(endpoint.rstrip("/"), "/v3/maintenance/status", b"{}")
        except _Unavailable as exc:
            raise EtcdError(f"etcd status of {endpoint} failed: {exc}") from exc
        return MemberStatus(
            member_id=_int(body.get("header", {}), "member_id"),
            leader=_int(body, "leader"),
            raft_term=_int(body, "raftTerm"),
            raft_index=_int(body, "raftIndex"),
            revision=_int(body.get("header", {}), "revision"),
            version=str(body.get("version", "")),
        )

    # -- watch -----------------------------------------------------------------------------------------------

    async def _open_watch(self, create: dict[str, Any]) -> tuple[int, aiohttp.ClientResponse, _JsonLines]:
        """Start a watch on the first member that confirms it (``created``); the member's index and stream."""
        data = json.dumps({"create_request": create}).encode()
        failures: list[tuple[str, str]] = []
        start = self._current
        # no total/read timeout: a quiet key legitimately sends nothing for hours
        timeout = aiohttp.ClientTimeout(total=None, connect=self._timeout, sock_connect=self._timeout)
        for step in range(len(self._endpoints)):
            index = (start + step) % len(self._endpoints)
            endpoint = self._endpoints[index]
            session = self._http()
            response: aiohttp.ClientResponse | None = None
            try:
                response = await session.post(endpoint + "/v3/watch", data=data, timeout=timeout)
                if response.status != 200:
                    raw = await response.read()
                    body = _load(raw)
                    message = f"HTTP {response.status}: {body.get('message', raw[:80])}"
                    if response.status >= 500:
                        raise _Unavailable(message)
                    raise _Refused(f"etcd watch on {endpoint}: {message}", _int(body, "code"))
                lines = _JsonLines(response.content)
                async with asyncio.timeout(self._timeout):
                    first = await lines.next()
                if first is None or not first.get("created"):
                    raise _Unavailable(
                        f"watch not created: {body_text(first) if first is not None else 'the stream ended'}"
                    )
            except (_Unavailable, aiohttp.ClientError, TimeoutError) as exc:
                if response is not None:
                    response.close()
                reason = str(exc) if isinstance(exc, _Unavailable) else describe(exc)
                log.debug("etcd watch on %s failed (%s), trying the next endpoint", endpoint, reason)
                failures.append((endpoint, reason))
                self._move_on_from(index)
                continue
            except BaseException:
                if response is not None:
                    response.close()
                raise
            self._current = index
            return index, response, lines
        raise self._unreachable("watch", failures)

    async def watch(self, key: str, *, prefix: bool = False, start_revision: int) -> AsyncGenerator[WatchEvent, None]:
        """Every change of ``key`` (or every key under it) from ``start_revision`` on, in revision order.

        When the stream breaks (the member died, the connection dropped) the watch is re-created on the
        next member from the last delivered revision + 1, so nothing is lost or repeated.  Raises
        :class:`EtcdError` when no member can be reached, or when the revision to resume from was
        compacted away: the caller then re-reads the current state and watches from its revision + 1.
        Use it with ``contextlib.aclosing`` so that breaking out closes the stream at once.
        """
        create: dict[str, Any] = _prefix_range(key) if prefix else {"key": _b64key(key)}
        next_revision = start_revision
        while True:
            create["start_revision"] = str(next_revision)
            index, response, lines = await self._open_watch(create)
            try:
                while True:
                    result = await lines.next()
                    if result is None:
                        raise _Unavailable("stream ended")
                    if result.get("canceled"):
                        compacted = _int(result, "compact_revision")
                        if compacted:
                            raise EtcdError(
                                f"etcd watch of {key!r}: revision {next_revision} was compacted (oldest kept is "
                                f"{compacted}); re-read the current state and watch from its revision"
                            )
                        raise EtcdError(f"etcd cancelled the watch of {key!r}: {result.get('cancel_reason', '?')}")
                    for event in result.get("events", []):
                        kind: Literal["PUT", "DELETE"] = "DELETE" if event.get("type") == "DELETE" else "PUT"
                        kv = KeyValue.from_json(event.get("kv", {}))
                        next_revision = kv.mod_revision + 1
                        yield WatchEvent(kind, kv)
            except (_Unavailable, aiohttp.ClientError, TimeoutError) as exc:
                reason = str(exc) if isinstance(exc, _Unavailable) else describe(exc)
                log.debug(
                    "etcd watch on %s broke (%s); resuming from revision %d",
                    self._endpoints[index],
                    reason,
                    next_revision,
                )
                self._move_on_from(index)
            finally:
                response.close()

    async def aclose(self) -> None:
        """Close the connections; any later call (and a running watch) raises EtcdError."""
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


# -- election -----------------------------------------------------------------------------------------------


class Election:
    """Lease-based leader election on one key: who is the Control node of a cluster.

    The leader holds ``key`` (value = its identity) under a lease it keeps alive every ``ttl``/3 s.  If
    the leader dies, its lease expires after ``ttl`` s and etcd deletes the key, which wakes the waiting
    candidates.  The key's create_revision is the leader's *epoch*: etcd revisions only grow, so every
    new leader has a higher epoch than all before it, and members can refuse orders of a deposed leader.

    ``lost`` is set when this candidate must stop acting as leader: etcd said the lease is gone, or etcd
    could not confirm the lease for so long that it may have expired (the leader steps down *before*
    anyone else can be elected, as long as both clocks run at the same rate).
    """

    def __init__(
        self, client: EtcdClient, key: str, value: bytes, ttl: int = 5, *, recheck: float | None = None
    ) -> None:
        if ttl < 1:
            raise ValueError("the election TTL must be at least 1 s")
        self._client = client
        self.key = key
        self.value = value
        self.ttl = ttl
        # the watch wakes a waiting candidate at once; the re-check only bounds a missed or broken watch
        self._recheck = recheck if recheck is not None else float(ttl)
        self.lost = asyncio.Event()
        self._lease = 0
        self._epoch: int | None = None
        self._keepalive: asyncio.Task[None] | None = None

    @property
    def lease(self) -> int:
        """Our current lease ID (0 before the first campaign and after resign)."""
        return self._lease

    @property
    def epoch(self) -> int | None:
        """The fencing epoch while leader, else None."""
        return None if self.lost.is_set() else self._epoch

    async def leader(self) -> KeyValue | None:
        """The current holder of the key (its value identifies the leader), or None."""
        return await self._client.get(self.key)

    async def campaign(self) -> int:
        """Wait until this candidate holds the key; the fencing epoch (the key's create_revision).

        Raises EtcdError when etcd cannot be reached.  If cancelled or failed, the keep-alive stops and
        the lease expires on its own; :meth:`resign` revokes it at once.
        """
        if self._epoch is not None and not self.lost.is_set():
            return self._epoch
        try:
            while True:
                if self._lease == 0 or self.lost.is_set():
                    await self._new_lease()
                result = await self._client.txn(
                    [Compare.create_revision(self.key, 0)],
                    [Op.put(self.key, self.value, self._lease)],
                    [Op.get(self.key)],
                )
                if result.succeeded:
                    epoch = result.revision  # the put is the transaction's only write: its revision
                else:
                    holder = result.ranges[0][0] if result.ranges and result.ranges[0] else None
                    if holder is None or holder.lease != self._lease:
                        await self._wait_for_vacancy(result.revision)
                        continue
                    epoch = holder.create_revision  # a timed-out attempt of ours was applied after all
                if self.lost.is_set():  # the lease died between the write and now: the key is gone again
                    continue
                self._epoch = epoch
                log.info("won the election for %s (epoch %d)", self.key, epoch)
                return epoch
        except BaseException:
            self._stop_keepalive()
            raise

    async def resign(self) -> None:
        """Give up leadership (or candidacy): revoke the lease so that etcd deletes the key at once.

        If etcd cannot be reached the key still goes away when the lease expires, ``ttl`` s later.
        """
        self._stop_keepalive()
        self._epoch = None
        self.lost.set()
        lease, self._lease = self._lease, 0
        if lease:
            try:
                await self._client.lease_revoke(lease)
            except EtcdError as exc:
                log.warning(
                    "could not revoke the election lease of %s (%s); it expires in %d s", self.key, exc, self.ttl
                )

    def _stop_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None

    async def _new_lease(self) -> None:
        """Replace our lease (first campaign, or the old one died) and start keeping the new one alive."""
        self._stop_keepalive()
        if self._lease:
            with contextlib.suppress(EtcdError):  # it is most likely gone already
                await self._client.lease_revoke(self._lease)
            self._lease = 0
        loop = asyncio.get_running_loop()
        sent = loop.time()
        lease = await self._client.lease_grant(self.ttl)
        self._lease = lease
        self.lost.clear()
        self._keepalive = asyncio.create_task(self._keep_alive(lease, sent + self.ttl), name=f"etcd-lease-{lease:x}")

    async def _keep_alive(self, lease: int, expires: float) -> None:
        """Renew ``lease`` every ttl/3 s until it is gone or may have expired; then set ``lost``.

        ``expires`` is a lower bound of when etcd will drop the lease: the time a renewal was *sent* plus
        the TTL etcd answered, so we give up no later than etcd does.
        """
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(expires) as deadline:
                while True:
                    await asyncio.sleep(self.ttl / 3)
                    sent = loop.time()
                    try:
                        remaining = await self._client.lease_keepalive(lease)
                    except EtcdError as exc:
                        log.debug("etcd lease %x keep-alive failed: %s", lease, exc)
                        continue
                    if remaining <= 0:
                        log.warning("election lease for %s is gone (expired or revoked)", self.key)
                        break
                    deadline.reschedule(sent + remaining)
        except TimeoutError:
            log.warning("etcd did not confirm the election lease for %s within %d s: stepping down", self.key, self.ttl)
        self.lost.set()

    async def _wait_for_vacancy(self, revision: int) -> None:
        """Return when the key may be free: deleted after ``revision``, our lease died, or the re-check period."""
        watcher = asyncio.ensure_future(self._deleted_after(revision))
        lease_died = asyncio.ensure_future(self.lost.wait())
        try:
            await asyncio.wait({watcher, lease_died}, timeout=self._recheck, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            lease_died.cancel()
            await asyncio.gather(watcher, lease_died, return_exceptions=True)

    async def _deleted_after(self, revision: int) -> None:
        try:
            async with contextlib.aclosing(self._client.watch(self.key, start_revision=revision + 1)) as events:
                async for event in events:
                    if event.type == "DELETE":
                        return
        except EtcdError as exc:  # compacted or unreachable: re-check soon by reading the key again
            log.debug("watch of %s failed (%s); re-checking", self.key, exc)
            await asyncio.sleep(min(self._recheck, 1.0))
