"""The whole threatgate exception tree (see docs/exceptions.md).

Rules:
1. Every error threatgate raises on purpose derives from :class:`ThreatgateError`.
2. Every class here is raised somewhere (tests/test_errors.py checks it), and an error that crosses a
   module boundary lives here, not in the module that raises it: whoever catches it imports this
   bottom-layer module only, never the raiser (no import runs back up the layers for an exception).
3. Foreign exceptions are put into words in one place: network, TLS and aiohttp errors by
   :func:`threatgate.net.describe.describe`, a failed file or system call by
   :func:`threatgate.fs.os_reason`; :func:`threatgate.fs.write_atomic` raises :class:`FileWriteError`.
4. Errors carry what an operator needs to fix the problem: file, line, element, address.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar


class ThreatgateError(Exception):
    """Root of every error threatgate raises on purpose."""


class ConfigError(ThreatgateError):
    """A configuration file is unreadable or invalid.

    The message always reads ``<file>:<line>: <Element>: <what is wrong>`` so that an editor can jump
    to the spot; ``line`` is 0 when the problem is the file as a whole.
    """

    def __init__(self, path: str, line: int, element: str, problem: str) -> None:
        self.path = path
        self.line = line
        self.element = element
        self.problem = problem
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: <{element}>: {problem}" if element else f"{where}: {problem}")


class FeedError(ThreatgateError):
    """A feed file cannot be loaded at all (a malformed *record* is skipped, never raised)."""


class SnapshotInvalid(ThreatgateError):
    """A snapshot file that must not be trusted; ``reason`` is the metric label, the message the detail.

    Raised by node/snapfile.py, caught by node/snapshots.py and node/feeds.py, which rebuild the snapshot.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class UnsupportedRegex(ThreatgateError, ValueError):
    """A pattern (or part of one) the compiled engine cannot run with the same answer as Python's re.

    Raised by node/pcre.py and node/engine.py; the engine then runs that rule with Python's re.
    """


class FileWriteError(ThreatgateError):
    """A file could not be written (:func:`threatgate.fs.write_atomic`); the old file, if any, is intact.

    ``path`` is the file, ``reason`` the system's words (``Permission denied``).
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot write {path}: {reason}")
        self.path = path
        self.reason = reason


class PathError(ThreatgateError, ValueError):
    """The request target cannot be a path we serve (bad escape, not UTF-8, NUL, not origin-form).

    Raised by wire/paths.py; the node API and the balancer's gateway answer 400 with its message.
    """


class RequestError(ThreatgateError):
    """Bad input to a supplier or tag operation; ``status`` is the HTTP status it maps to.

    Raised by node/suppliers.py; the node API and the cluster agent answer with it as the JSON error body.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class _Keyed(Protocol):
    @property
    def key(self) -> str: ...


InstanceT = TypeVar("InstanceT", bound=_Keyed)


class PinMismatch(ThreatgateError, Generic[InstanceT]):
    """A node presented a certificate other than its pinned one: nothing was sent to it (answered 500).

    ``instance`` is the balancer's instance (generic: this module sits below the balancer); ``expected``
    and ``got`` are the SHA-256 fingerprints, colon-separated.
    """

    def __init__(self, instance: InstanceT, expected: str, got: str) -> None:
        super().__init__(f"{instance.key}: certificate {got} does not match the pinned {expected}")
        self.instance = instance
        self.expected = expected
        self.got = got

    @property
    def reason(self) -> str:
        """How a probe or a verdict says it (the instance named elsewhere)."""
        return f"certificate mismatch: pinned {self.expected}, presented {self.got}"


class UpstreamFailed(ThreatgateError):
    """The node did not answer (connect, TLS, timeout, disconnect): another node may be tried."""


class MalformedAnswer(UpstreamFailed):
    """A node's bytes are not an HTTP/1.1 answer, or too large (:mod:`threatgate.net.http1`): connection dropped."""


class PeerCertificateMismatch(ThreatgateError):
    """A new pinned connection presented another certificate than the pin; it was closed unused.

    Raised by :mod:`threatgate.net.pinned`, which knows digests, not instances: the gateway turns it
    into :class:`PinMismatch`.  ``expected`` and ``got`` are raw SHA-256 digests (``got`` empty: none).
    """

    def __init__(self, expected: bytes, got: bytes) -> None:
        super().__init__(f"certificate SHA-256 {got.hex()} does not match the pinned {expected.hex()}")
        self.expected = expected
        self.got = got


class TLSConfigError(ThreatgateError):
    """The TLS certificate/key pair cannot be used (one file missing, unreadable, encrypted or mismatched).

    Raised at start-up, never mid-connection; the message names the file(s) and what to do about them.
    """


class DrillError(ThreatgateError):
    """``threatgate drill`` cannot run as asked: no canary, a bad canary file, an option or setting missing.

    The text says what to change; the CLI prints it and exits 2.
    """


class ClusterError(ThreatgateError):
    """A cluster operation cannot be carried out now (wrong role, emergency mode, unknown member).

    ``status`` is the HTTP status the cluster API answers with, so CLI and REST report the same thing.
    """

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


class StaleRevision(ClusterError):
    """A settings write named a base revision that is no longer current (optimistic concurrency, 409)."""

    def __init__(self, base: int, current: int) -> None:
        super().__init__(f"settings changed meanwhile: the write is based on revision {base}, current is {current}")
        self.base = base
        self.current = current


class SettingsRejected(ClusterError):
    """A settings document was refused (NACK): bad digest, invalid content, stale epoch or revision."""

    def __init__(self, revision: int, detail: str, status: int = 422) -> None:
        super().__init__(f"settings revision {revision} refused: {detail}", status)
        self.revision = revision
        self.detail = detail


class EtcdError(ClusterError):
    """etcd could not be reached on any endpoint, or answered with an error."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 503)
