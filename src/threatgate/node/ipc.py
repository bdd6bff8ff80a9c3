"""The control channel between a node's master and its worker processes.

One ``socketpair(AF_UNIX, SOCK_SEQPACKET)`` per worker, made by the master before it starts the
worker and passed to it as an inherited descriptor.  SEQPACKET keeps message boundaries (no
framing) and carries descriptors with a message (SCM_RIGHTS): accepted connections, snapshot files.

Invariants:
- A message is ``(kind, payload)`` pickled, plus the descriptors sent with it.  Both ends are
  processes of this program, the pair exists before the worker does and nothing else can reach it,
  so pickle is safe here (it never reads bytes from the network).
- Messages arrive in the order sent and are never split or merged.  A payload larger than
  :data:`INLINE_MAX` travels in a sealed memfd sent with a ``memfd`` message, so the socket's
  buffer size never limits a configuration's size.
- A descriptor received is owned by the receiver (close it, or hand it to what closes it).
- EOF on the channel means the other process is gone: a worker exits, the master restarts it.

:func:`encode` / :func:`decode` are sans-IO; :class:`Channel` is the asyncio edge.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import errno
import fcntl
import logging
import os
import pickle
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from threatgate.fs import os_reason

INLINE_MAX = 128 * 1024
"""Payloads up to this size ride in the message itself; larger ones in a memfd."""
MAX_FDS = 250
"""Descriptors per message (the kernel's SCM_MAX_FD is 253)."""
_RECV_SIZE = INLINE_MAX + 4096
_MEMFD = "memfd"
_PEER_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ECONNREFUSED, errno.ENOTCONN})
_INT = array.array("i")


class ChannelError(Exception):
    """A control message that cannot be read (a defect: both ends are this program)."""


@dataclass(frozen=True, slots=True)
class Message:
    kind: str
    payload: Any
    fds: tuple[int, ...] = ()


def encode(kind: str, payload: Any) -> bytes:
    return pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes, fds: Sequence[int] = ()) -> Message:
    """The message in ``data``.

    Raises:
        ChannelError: the bytes are not a control message.
    """
    try:
        kind, payload = pickle.loads(data)
    except Exception as exc:  # pickle raises many types for damaged input
        raise ChannelError(f"unreadable control message ({len(data)} bytes): {exc}") from None
    if not isinstance(kind, str):
        raise ChannelError(f"control message without a kind: {type(kind).__name__}")
    return Message(kind, payload, tuple(fds))


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """The master's end and the worker's end (the worker's is inheritable: pass it with ``pass_fds``)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.set_inheritable(True)
    return ours, theirs


def _to_memfd(data: bytes) -> int:
    fd = os.memfd_create("threatgate-control", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _from_memfd(fd: int) -> bytes:
    try:
        size = os.fstat(fd).st_size
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def _recv(sock: socket.socket) -> tuple[bytes, list[int], int]:
    """One message and its descriptors, close-on-exec (``socket.recv_fds`` ignores its flags in 3.11)."""
    data, ancdata, flags, _addr = sock.recvmsg(
        _RECV_SIZE, socket.CMSG_SPACE(MAX_FDS * _INT.itemsize), socket.MSG_CMSG_CLOEXEC
    )
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    return data, list(fds), flags


class Channel:
    """One end of a control channel on the running loop: messages in through a callback, out with :meth:`send`."""

    def __init__(
        self,
        sock: socket.socket,
        on_message: Callable[[Message], None],
        on_eof: Callable[[], None],
        log: logging.Logger,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._on_message = on_message
        self._on_eof = on_eof
        self._log = log
        # (kind, bytes, the descriptors to send, the descriptors this channel owns and closes once sent)
        self._out: collections.deque[tuple[str, bytes, list[int], tuple[int, ...]]] = collections.deque()
        self._closed = False
        self._peer_gone = False
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    @property
    def peer_gone(self) -> bool:
        """The other process is gone (its end closed): nothing sent from now on is delivered."""
        return self._peer_gone

    def send(self, kind: str, payload: Any = None, fds: Sequence[int] = ()) -> bool:
        """Send one message; ``fds`` are duplicated into the peer (the caller keeps its own, and may close
        them at once: a message that must wait for room holds duplicates of its own).  False when it was
        not delivered: the peer is gone (:attr:`peer_gone`; EOF tells the owner) or the send failed
        (logged).

        Raises:
            ValueError: more than :data:`MAX_FDS` descriptors (the caller splits its message).
        """
        if self._closed or self._peer_gone:
            return False
        if len(fds) + 1 > MAX_FDS:  # one more for a large payload's memfd
            raise ValueError(f"{len(fds)} descriptors in one control message; at most {MAX_FDS - 1}")
        data = encode(kind, payload)
        owned: tuple[int, ...] = ()
        if len(data) > INLINE_MAX:
            owned = (_to_memfd(data),)
            data = encode(_MEMFD, None)
        if not self._out:
            try:
                socket.send_fds(self.sock, [data], [*owned, *fds])
            except BlockingIOError:
                pass
            except OSError as exc:
                _close_all(owned)
                return self._failed(kind, exc)
            else:
                _close_all(owned)
                return True
        # The socket is full: keep the message, with duplicates of the caller's descriptors.
        held = owned + tuple(os.dup(fd) for fd in fds)
        self._out.append((kind, data, list(held), held))
        if len(self._out) == 1:
            self._loop.add_writer(self.sock.fileno(), self._writable)
        return True

    def _failed(self, kind: str, exc: OSError) -> bool:
        if exc.errno in _PEER_GONE:  # EOF follows on the reading side
            self._peer_gone = True
            self._drop_queue()
        else:
            self._log.error("control message %r not sent: %s", kind, os_reason(exc))
        return False

    def _flush(self) -> None:
        while self._out:
            kind, data, fds, owned = self._out[0]
            try:
                socket.send_fds(self.sock, [data], fds)
            except BlockingIOError:
                return
            except OSError as exc:
                self._out.popleft()
                _close_all(owned)
                self._failed(kind, exc)
                continue
            self._out.popleft()
            _close_all(owned)
        self._loop.remove_writer(self.sock.fileno())

    def _drop_queue(self) -> None:
        for *_, owned in self._out:
            _close_all(owned)
        self._out.clear()

    def _writable(self) -> None:
        self._flush()

    def _readable(self) -> None:
        for _ in range(64):  # a burst of messages, then let the loop run
            try:
                data, fds, flags = _recv(self.sock)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._log.debug("control channel receive failed: %s", exc)
                data, fds, flags = b"", [], 0
            if not data:
                for fd in fds:
                    os.close(fd)
                self.close()
                self._on_eof()
                return
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                for fd in fds:
                    os.close(fd)
                raise ChannelError(f"control message truncated (flags {flags:#x})")
            message = decode(data, fds)
            if message.kind == _MEMFD:
                message = decode(_from_memfd(message.fds[0]), message.fds[1:])
            self._on_message(message)
            if self._closed:
                return

    def close(self, flush_within: float = 0.0) -> None:
        """Close; with ``flush_within``, first send what is queued, waiting at most that long (a worker's
        last report before it exits)."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self.sock.fileno())
        self._loop.remove_writer(self.sock.fileno())
        if self._out and flush_within > 0 and not self._peer_gone:
            self.sock.settimeout(flush_within)
            with contextlib.suppress(OSError):
                while self._out:
                    _, data, fds, owned = self._out.popleft()
                    try:
                        socket.send_fds(self.sock, [data], fds)
                    finally:
                        _close_all(owned)
        self._drop_queue()
        self.sock.close()


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)
