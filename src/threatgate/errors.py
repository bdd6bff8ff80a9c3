"""The whole threatgate exception tree (see docs/exceptions.md).

Rules:
1. Every error threatgate raises on purpose derives from :class:`ThreatgateError`.
2. Errors say whose fault it was: ``Local*`` means we (or the operator's config) got it wrong,
   ``Remote*`` means a peer misbehaved.  Only ``net/`` converts foreign exceptions.
3. Errors carry what an operator needs to fix the problem: file, line, element, address.
"""

from __future__ import annotations


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


class ProtocolError(ThreatgateError):
    """A violation of the event wire protocol.  Abstract: raise a subclass."""

    def __new__(cls, *args: object, **kwargs: object) -> ProtocolError:
        if cls is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError, not ProtocolError")
        return super().__new__(cls, *args)


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol does not allow (a bug in threatgate)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class NetworkError(ThreatgateError):
    """A socket operation failed."""


class ConnectError(NetworkError):
    """Could not connect to a peer."""


class WriteError(NetworkError):
    """Could not write to a peer."""


class TLSConfigError(ThreatgateError):
    """The TLS certificate/key pair cannot be used (one file missing, unreadable, encrypted or mismatched).

    Raised at start-up, never mid-connection; the message names the file(s) and what to do about them.
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
