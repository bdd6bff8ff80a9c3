"""Balancer to node over TLS (``<Instance tls="true">``), with real processes.

Each node's event port is fronted by socat terminating TLS (``OPENSSL-LISTEN ... TCP:node``): a real
TLS server for the balancer, whatever the node itself speaks.  Checked here: every event answered
exactly once over TLS; the balancer's client certificate is presented (socat ``verify=1`` requires
it); a man in the middle with another certificate after the pin was made gets not one event byte and
the instance goes out of rotation with an ERROR line carrying both fingerprints; the SIGKILL failover
test passes over TLS.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    FINISHED_LINE,
    REPLY_FLAGS,
    BalancerProcess,
    answers_in_order,
    balancer_config,
    running_balancer,
    socat,
    stream,
    wait_for_log_count,
    wait_until,
)
from tests.integration.test_balancer import (
    EVENTS,
    SLOW_NODES,
    STARTUP_TIMEOUT,
    STREAM_TIMEOUT,
    Dataset,
    Examples,
    assert_answers,
    client,
    instance,
    instance_cli,
    nodes,
)
from tests.integration.test_balancer import (
    dataset as dataset,  # noqa: F401 - the module fixture, shared with these tests
)
from tests.integration.test_balancer import (
    example_nodes as example_nodes,  # noqa: F401 - the module fixture, shared with these tests
)
from threatgate.net.tls import ensure_server_pair, fingerprint_sha256


def make_pair(directory: Path, name: str) -> tuple[str, str]:
    """A self-signed pair (also good as a client certificate), made with the project's own generator."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = str(directory / f"{name}.pem"), str(directory / f"{name}.key")
    ensure_server_pair(cert, key, common_name=name, hosts=["127.0.0.1"], client_auth=True)
    return cert, key


def fingerprint(cert: str) -> str:
    return fingerprint_sha256(Path(cert).read_bytes())


class Terminator:
    """socat terminating TLS in front of a plain port; killed with its children (the connections) at the end."""

    def __init__(self, target: int, cert: str, key: str, *, port: int = 0, client_ca: str | None = None) -> None:
        verify = f"verify=1,cafile={client_ca}" if client_ca else "verify=0"
        listen = (
            f"OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={cert},key={key},{verify},"
            "openssl-min-proto-version=TLS1.2"
        )
        self.proc = subprocess.Popen(
            [socat(), "-d", "-d", listen, f"TCP:127.0.0.1:{target}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its forked children in its process group: killed together
        )
        assert self.proc.stderr is not None
        self.port = 0
        for _ in range(200):  # bounded: socat says where it listens within its first lines
            line = self.proc.stderr.readline()
            m = re.search(r"listening on AF=2 127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m[1])
                break
            assert line, f"socat exited: {self.proc.wait(5)}"
        assert self.port
        # Keep reading its log so it never blocks on a full pipe.
        self._drain = threading.Thread(target=self.proc.stderr.read, daemon=True)
        self._drain.start()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._drain.join(10)  # its children gone too: the pipe is at its end
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@contextlib.contextmanager
def terminators(*specs: tuple[int, str, str, str | None]) -> Iterator[list[Terminator]]:
    """One socat per (node port, cert, key, client CA or None)."""
    made: list[Terminator] = []
    try:
        for target, cert, key, client_ca in specs:
            made.append(Terminator(target, cert, key, client_ca=client_ca))
        yield made
    finally:
        for t in made:
            t.kill()


class Intruder:
    """A TLS server with its own certificate on a given port: records every byte it decrypts."""

    def __init__(self, port: int, cert: str, key: str) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.connections = 0
        self.handshakes = 0
        self.decrypted = b""
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                with self.lock:
                    self.handshakes += 1
                while data := tls.recv(65536):
                    with self.lock:
                        self.decrypted += data
        except (OSError, ssl.SSLError):
            pass

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def tls_balancer(path: Path, ports: list[int], **options: object) -> Iterator[BalancerProcess]:
    """A balancer whose instances (``ports``) are all ``tls="true"``, once every one is UP."""
    balancer_config(path, instances=ports, **options)  # type: ignore[arg-type]
    text = path.read_text()
    path.write_text(text.replace("<Instance ", '<Instance tls="true" '))
    with running_balancer(path) as balancer:
        wait_for_log_count(balancer, r"instance 127\.0\.0\.1:\d+ is UP", len(ports), timeout=STARTUP_TIMEOUT)
        yield balancer


def balancer_pair(directory: Path) -> tuple[str, str]:
    """The balancer's own pair, made before it starts (its default SSLCertificatePath), so socat can require it."""
    return make_pair(directory / "certs", "balancer")


def test_events_to_tls_nodes_requiring_the_balancers_certificate_answered_once(
    example_nodes: Examples,  # noqa: F811
    tmp_path: Path,
) -> None:
    b_cert, _ = balancer_pair(tmp_path)
    specs = [(port, *make_pair(tmp_path / f"node{i}", "node"), b_cert) for i, port in enumerate(example_nodes.ports)]
    with (
        terminators(*specs) as fronts,
        tls_balancer(tmp_path / "kl_balancer.conf", [t.port for t in fronts]) as balancer,
    ):
        lines = stream(balancer.port, REPLY_FLAGS + example_nodes.events * 100, timeout=STREAM_TIMEOUT)
        assert_answers(answers_in_order(lines), example_nodes.reference * 100)
        for front, (_, cert, _, _) in zip(fronts, specs, strict=True):
            pin = tmp_path / "pins" / f"127.0.0.1_{front.port}.pem"
            assert (pin.stat().st_mode & 0o777) == 0o600
            assert fingerprint(str(pin)) == fingerprint(cert)
            balancer.wait_for_log(rf"{instance(front.port)}: no reference certificate yet; saved", after=0)
        assert " ERR " not in balancer.log()


def test_a_node_requiring_another_client_certificate_never_gets_events(
    example_nodes: Examples,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The check above is real: the same socat requiring a certificate the balancer does not have refuses it."""
    other, _ = make_pair(tmp_path / "other", "other")
    balancer_pair(tmp_path)
    cert, key = make_pair(tmp_path / "node", "node")
    with terminators((example_nodes.ports[0], cert, key, other)) as [front]:
        path = balancer_config(tmp_path / "kl_balancer.conf", instances=[front.port])
        path.write_text(path.read_text().replace("<Instance ", '<Instance tls="true" '))
        with running_balancer(path) as balancer:
            rows: list[str] = []

            def refused() -> bool:
                rows[:] = instance_cli(path, "list").stdout.splitlines()
                return any("DOWN" in row and "cannot connect: TLS: " in row and "alert" in row for row in rows)

            wait_until(refused, "the instance DOWN: its client certificate refused", timeout=STARTUP_TIMEOUT)
            assert not re.search(rf"{instance(front.port)} is UP", balancer.log())


def test_a_man_in_the_middle_gets_no_event_byte_and_the_instance_goes_out(
    example_nodes: Examples,  # noqa: F811
    tmp_path: Path,
) -> None:
    balancer_pair(tmp_path)
    a_cert, a_key = make_pair(tmp_path / "a", "node")
    b_cert, b_key = make_pair(tmp_path / "b", "node")
    mitm_cert, mitm_key = make_pair(tmp_path / "mitm", "mitm")
    events = example_nodes.events * 20
    with terminators((example_nodes.ports[0], a_cert, a_key, None), (example_nodes.ports[1], b_cert, b_key, None)) as [
        front_a,
        front_b,
    ]:
        port_a = front_a.port
        with tls_balancer(tmp_path / "kl_balancer.conf", [port_a, front_b.port]) as balancer:
            lines = stream(balancer.port, REPLY_FLAGS + events)
            assert_answers(answers_in_order(lines), example_nodes.reference * 20)  # pins made, both used
            mark = balancer.log_offset()
            front_a.kill()  # the connections through it die; the intruder takes its port
            intruder = Intruder(port_a, mitm_cert, mitm_key)
            try:
                refused = balancer.wait_for_log(
                    rf"ERR .*{instance(port_a)}: event port certificate mismatch: pinned (\S+), presented (\S+);",
                    after=mark,
                    timeout=STARTUP_TIMEOUT,
                )
                assert refused[1] == fingerprint(a_cert) and refused[2] == fingerprint(mitm_cert)
                assert "threatgate balancer pins --renew 127.0.0.1:" in balancer.log()[refused.start() :]
                for _ in range(3):  # events keep being answered, by B alone
                    lines = stream(balancer.port, REPLY_FLAGS + events)
                    assert_answers(answers_in_order(lines), example_nodes.reference * 20)
                wait_until(lambda: intruder.connections >= 3, "the balancer trying the intruder again (health checks)")
                assert intruder.decrypted == b""  # not a session flag, not a PING, not an event byte
                # One ERROR per distinct mismatch, however often it is met again.
                assert len(re.findall(r"event port certificate mismatch", balancer.log()[mark:])) == 1
            finally:
                intruder.close()


@pytest.mark.timeout(300)
def test_node_killed_mid_stream_over_tls_every_detection_exactly_once(dataset: Dataset, tmp_path: Path) -> None:  # noqa: F811
    """As test_balancer's SIGKILL failover test, with tls="true" on both instances (socat terminating TLS)."""
    balancer_pair(tmp_path)
    with nodes(*[(dataset.node_config(), 0) for _ in range(2)], env=SLOW_NODES) as (victim, survivor):
        specs = [(n.port, *make_pair(tmp_path / f"n{i}", "node"), None) for i, n in enumerate((victim, survivor))]
        with (
            terminators(*specs) as [front_victim, front_survivor],
            tls_balancer(tmp_path / "kl_balancer.conf", [front_victim.port, front_survivor.port]) as balancer,
            client(balancer.port) as (_, reader, writer),
        ):
            writer.send(REPLY_FLAGS + dataset.events)
            writer.shutdown()
            reader.wait_finished(EVENTS // 2, timeout=STREAM_TIMEOUT)
            mark = balancer.log_offset()
            victim.proc.kill()
            assert victim.proc.wait(10) == -9
            balancer.wait_for_log(rf"{instance(front_victim.port)} is DOWN: ", after=mark)
            redispatched = balancer.wait_for_log(
                rf"{instance(front_victim.port)}: (\d+) unfinished event\(s\) sent again to other instances",
                after=mark,
            )
            assert int(redispatched[1]) > 0
            writer.join(STREAM_TIMEOUT)
            lines = reader.join(STREAM_TIMEOUT)
            assert survivor.proc.poll() is None and balancer.proc.poll() is None
    assert lines.count(FINISHED_LINE) == EVENTS
    assert_answers(answers_in_order(lines), dataset.reference)
    assert sum(map(len, dataset.reference)) == len(lines) - EVENTS


def test_tls_switched_on_by_a_sighup_takes_effect_without_a_restart(
    example_nodes: Examples,  # noqa: F811
    tmp_path: Path,
) -> None:
    balancer_pair(tmp_path)
    cert, key = make_pair(tmp_path / "node", "node")
    with terminators((example_nodes.ports[0], cert, key, None)) as [front]:
        path = balancer_config(tmp_path / "kl_balancer.conf", instances=[front.port])
        with running_balancer(path) as balancer:
            # Plain TCP to a TLS port: the health checks fail (the terminator closes), no event goes there.
            rows: list[str] = []

            def failing() -> bool:
                rows[:] = instance_cli(path, "list").stdout.splitlines()[1:]
                return bool(rows) and "DOWN" in rows[0] and ("cannot connect: " in rows[0] or "PONG" in rows[0])

            wait_until(failing, "the instance DOWN over plain TCP", timeout=STARTUP_TIMEOUT)
            mark = balancer.log_offset()
            path.write_text(path.read_text().replace("<Instance ", '<Instance tls="true" '))
            balancer.signal(signal.SIGHUP)
            balancer.wait_for_log(rf"{instance(front.port)} is UP", after=mark, timeout=STARTUP_TIMEOUT)
            lines = stream(balancer.port, REPLY_FLAGS + example_nodes.events * 10)
            assert_answers(answers_in_order(lines), example_nodes.reference * 10)


def tls_stream(port: int, context: ssl.SSLContext, payload: bytes, count: int, at_half: object = None) -> list[str]:
    """Send ``payload`` over TLS and read until ``count`` finished lines, in one thread (an SSL socket must not
    be read and written from two at once); ``at_half()`` is called once half of them are in.  TLS has no
    half-close: the session stays open until every answer is in, as a SIEM wanting replies does."""
    import selectors

    raw = socket.create_connection(("127.0.0.1", port), timeout=STREAM_TIMEOUT)
    sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
    sock.setblocking(False)
    view, sent, data, finished, called = memoryview(payload), 0, bytearray(), 0, False
    with sock, selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        deadline = time.monotonic() + STREAM_TIMEOUT
        while finished < count:
            assert time.monotonic() < deadline, f"{finished} of {count} answers within {STREAM_TIMEOUT} s"
            if sent == len(view):
                sel.modify(sock, selectors.EVENT_READ)
            for _ in sel.select(1.0):
                pass
            try:
                while True:
                    chunk = sock.recv(1 << 20)
                    assert chunk, f"the balancer closed after {finished} of {count} answers"
                    data += chunk
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
            finished = data.count(b"LookupFinished")
            if at_half is not None and not called and finished >= count // 2:
                called = True
                at_half()  # type: ignore[operator]
            try:
                while sent < len(view):
                    sent += sock.send(view[sent : sent + (1 << 16)])
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
    return data.decode().splitlines()


@pytest.mark.timeout(300)
def test_siem_to_balancer_to_nodes_all_over_tls_with_client_certificates_and_a_node_killed(
    dataset: Dataset,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The whole path in TLS with the nodes' own TLS ports: the SIEM presents a certificate its CA issued to the
    balancer, the balancer its own (pinned) to the nodes; a node SIGKILLed mid-stream, every event answered
    exactly once, every detection as a node alone gives it."""
    import trustme

    b_cert, _ = balancer_pair(tmp_path)
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "siem-ca.pem"))
    tls = f'<TLS><ClientCertificates mode="required"><Certificate>{b_cert}</Certificate></ClientCertificates></TLS>'
    # Both nodes read their default pair from the one dataset directory: made here, once, not by two
    # processes starting at the same moment (each would create half of it).
    make_pair(dataset.dir / "certs", "node")
    configs = []
    for _ in range(2):
        path = dataset.node_config()
        text = path.read_text().replace("127.0.0.1:0</ConnectionString>", "127.0.0.1:0</ConnectionString>" + tls, 1)
        path.write_text(text)
        configs.append((path, 0))
    matching_tls = (
        '<MatchingTLS><ClientCertificates mode="required"><CAFile>siem-ca.pem</CAFile></ClientCertificates>'
        "</MatchingTLS>"
    )
    siem = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    siem.check_hostname, siem.verify_mode = False, ssl.CERT_NONE  # the SIEM side is not under test here
    ca.issue_cert("siem.example").configure_cert(siem)
    with nodes(*configs, env=SLOW_NODES) as (victim, survivor):
        assert "events" in victim.bound and victim.log().count("TLS") >= 1
        with tls_balancer(tmp_path / "kl_balancer.conf", [victim.port, survivor.port], extra=matching_tls) as balancer:
            mark = balancer.log_offset()

            def kill() -> None:
                victim.proc.kill()
                assert victim.proc.wait(10) == -9

            lines = tls_stream(balancer.port, siem, REPLY_FLAGS + dataset.events, EVENTS, at_half=kill)
            balancer.wait_for_log(rf"{instance(victim.port)} is DOWN: ", after=mark)
            assert survivor.proc.poll() is None and balancer.proc.poll() is None
            assert refused_without_certificate(balancer.port)
    assert lines.count(FINISHED_LINE) == EVENTS
    assert_answers(answers_in_order(lines), dataset.reference)


def refused_without_certificate(port: int) -> bool:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
        ):
            sock.sendall(REPLY_FLAGS + b"1 x\n")
            return sock.recv(100) == b""
    except (OSError, ssl.SSLError):
        return True
