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
import fcntl
import logging
import os
import pickle
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

INLINE_MAX = 128 * 1024
"""Payloads up to this size ride in the message itself; larger ones in a memfd."""
MAX_FDS = 250
"""Descriptors per message (the kernel's SCM_MAX_FD is 253)."""
_RECV_SIZE = INLINE_MAX + 4096
_MEMFD = "memfd"
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
        self._out: collections.deque[tuple[bytes, list[int], tuple[int, ...]]] = collections.deque()
        self._closed = False
        self._closed_by_peer = False
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def send(self, kind: str, payload: Any = None, fds: Sequence[int] = ()) -> bool:
        """Send one message (queued while the socket is full); ``fds`` are duplicated into the peer (the
        caller keeps its own).  False when the peer is gone (the channel is closed, or the send failed):
        nothing was delivered, and EOF tells the owner.
        """
        if self._closed:
            return False
        data = encode(kind, payload)
        owned: tuple[int, ...] = ()
        if len(data) > INLINE_MAX:
            owned = (_to_memfd(data),)
            data = encode(_MEMFD, None)
            fds = [*owned, *fds]
        if len(fds) > MAX_FDS:
            raise ValueError(f"{len(fds)} descriptors in one control message; at most {MAX_FDS}")
        self._out.append((data, [*fds], owned))
        return self._flush()

    def _flush(self) -> bool:
        while self._out:
            data, fds, owned = self._out[0]
            try:
                socket.send_fds(self.sock, [data], fds)
            except BlockingIOError:
                self._loop.add_writer(self.sock.fileno(), self._writable)
                return True
            except OSError as exc:  # the peer is gone: EOF follows on the reading side
                self._log.debug("control channel send failed: %s", exc)
                self._drop_queue()
                self._closed_by_peer = True
                return False
            self._out.popleft()
            for fd in owned:
                os.close(fd)
        return not self._closed_by_peer

    def _drop_queue(self) -> None:
        for _, _, owned in self._out:
            for fd in owned:
                os.close(fd)
        self._out.clear()

    def _writable(self) -> None:
        self._loop.remove_writer(self.sock.fileno())
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

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self.sock.fileno())
        self._loop.remove_writer(self.sock.fileno())
        self._drop_queue()
        self.sock.close()
