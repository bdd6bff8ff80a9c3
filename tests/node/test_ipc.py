"""node/ipc.py: messages keep their boundaries, carry descriptors, and large payloads travel in a memfd."""

from __future__ import annotations

import asyncio
import os

import pytest

from threatgate.node.ipc import INLINE_MAX, Channel, ChannelError, Message, channel_pair, decode, encode


def test_encode_decode_round_trip_and_damaged_bytes() -> None:
    assert decode(encode("conn", (1, "x"))) == Message("conn", (1, "x"))
    with pytest.raises(ChannelError, match="unreadable control message"):
        decode(b"not a pickle")
    with pytest.raises(ChannelError, match="without a kind"):
        decode(encode(3, None))  # type: ignore[arg-type]


async def test_messages_descriptors_and_large_payloads_cross_in_order() -> None:
    import logging

    log = logging.getLogger("test")
    a, b = channel_pair()
    got: list[Message] = []
    arrived = asyncio.Event()
    eof = asyncio.Event()

    def received(message: Message) -> None:
        got.append(message)
        if len(got) == 3:
            arrived.set()

    left = Channel(a, lambda m: None, lambda: None, log)
    right = Channel(b, received, eof.set, log)
    r, w = os.pipe()
    try:
        big = "x" * (INLINE_MAX * 3)
        left.send("one", 1)
        left.send("fd", None, [w])
        left.send("big", big)
        await asyncio.wait_for(arrived.wait(), 5)
        assert [m.kind for m in got] == ["one", "fd", "big"]
        assert got[2].payload == big and got[2].fds == ()
        (received_fd,) = got[1].fds
        assert received_fd != w
        assert not os.get_inheritable(received_fd)  # CLOEXEC: never leaks into a feed build
        os.write(received_fd, b"hi")
        os.close(received_fd)
        assert os.read(r, 2) == b"hi"
        left.close()
        await asyncio.wait_for(eof.wait(), 5)
    finally:
        os.close(r)
        os.close(w)
        right.close()


async def test_a_message_that_waits_for_room_keeps_its_own_descriptors() -> None:
    """A full socket queues the message: the caller may close its descriptor at once (a hand-over closes
    the accepted connection right after ``send``), and the peer still gets that very file."""
    import logging

    log = logging.getLogger("test")
    a, b = channel_pair()
    left = Channel(a, lambda m: None, lambda: None, log)
    sent = 0
    while not left._out:  # fill the socket: the peer is not reading yet
        assert left.send("filler", "x" * 1000)
        sent += 1
    r, w = os.pipe()
    assert left.send("fd", None, [w])
    os.close(w)  # the caller's copy: gone before the message leaves
    decoy_r, decoy_w = os.pipe()  # may take the number w had
    got: list[Message] = []
    done = asyncio.Event()

    def received(message: Message) -> None:
        got.append(message)
        if message.kind == "fd":
            done.set()

    right = Channel(b, received, lambda: None, log)
    try:
        await asyncio.wait_for(done.wait(), 5)
        assert [m.kind for m in got] == ["filler"] * sent + ["fd"]  # in order, nothing lost
        (fd,) = got[-1].fds
        os.write(fd, b"ok")
        os.close(fd)
        assert os.read(r, 2) == b"ok"
    finally:
        for fd in (r, decoy_r, decoy_w):
            os.close(fd)
        left.close()
        right.close()
