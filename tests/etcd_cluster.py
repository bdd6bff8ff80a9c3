"""A real etcd cluster of child processes for tests (Debian's ``etcd`` binary, 3.4).

Every member listens on 127.0.0.1 with free ports, keeps its data and log under the test's ``tmp_path``,
and uses short raft timers so a killed leader is replaced within about a second.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from tests.helpers import free_ports

START_TIMEOUT = 10.0


def etcd_binary() -> str:
    path = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)
    if path is None:
        raise RuntimeError("etcd is not installed: run ./scripts/test, which installs etcd-server")
    return path


class EtcdCluster:
    """``size`` etcd members started by ``__enter__`` and all killed by ``__exit__`` (also when the test fails)."""

    def __init__(self, tmp_path: Path, size: int = 3) -> None:
        self.tmp_path = tmp_path
        self.size = size
        self.names = [f"m{i}" for i in range(size)]
        ports = free_ports(2 * size)
        self.client_ports, self.peer_ports = ports[:size], ports[size:]
        self.procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        self.killed: set[int] = set()

    @property
    def endpoints(self) -> list[str]:
        """The client URLs, member ``i`` at index ``i``."""
        return [f"http://127.0.0.1:{p}" for p in self.client_ports]

    def log_path(self, i: int) -> Path:
        return self.tmp_path / f"etcd-{self.names[i]}.log"

    def start(self) -> None:
        token = f"tg-test-{uuid.uuid4().hex}"
        initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in zip(self.names, self.peer_ports, strict=True))
        for i, name in enumerate(self.names):
            client = self.endpoints[i]
            peer = f"http://127.0.0.1:{self.peer_ports[i]}"
            log = open(self.log_path(i), "wb")  # noqa: SIM115 - closed in stop()
            self._logs.append(log)
            self.procs.append(
                subprocess.Popen(
                    [
                        etcd_binary(),
                        "--name", name,
                        "--data-dir", str(self.tmp_path / f"etcd-{name}.data"),
                        "--listen-client-urls", client,
                        "--advertise-client-urls", client,
                        "--listen-peer-urls", peer,
                        "--initial-advertise-peer-urls", peer,
                        "--initial-cluster", initial,
                        "--initial-cluster-state", "new",
                        "--initial-cluster-token", token,
                        "--heartbeat-interval", "50",
                        "--election-timeout", "500",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )  # fmt: skip
        self.wait_for_leader()

    def status(self, i: int, timeout: float = 1.0) -> dict[str, Any]:
        """Member ``i``'s ``/v3/maintenance/status`` answer (raises when it does not answer)."""
        request = urllib.request.Request(f"{self.endpoints[i]}/v3/maintenance/status", data=b"{}", method="POST")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body: dict[str, Any] = json.loads(response.read())
            return body

    def leader_index(self, *, among: tuple[int, ...] | None = None) -> int | None:
        """The index of the member every answering member (of ``among``) agrees is leader, or None."""
        ids: dict[str, int] = {}
        leaders: set[str] = set()
        for i in among if among is not None else range(self.size):
            if self.procs[i].poll() is not None:
                continue
            try:
                body = self.status(i)
            except (OSError, urllib.error.URLError, ValueError):
                continue
            ids[body["header"]["member_id"]] = i
            leaders.add(body.get("leader", "0"))
        if len(leaders) != 1:
            return None
        return ids.get(leaders.pop())

    def wait_for_leader(self, timeout: float = START_TIMEOUT, *, among: tuple[int, ...] | None = None) -> int:
        """Poll (every 50 ms, up to ``timeout``) until the live members agree on a leader; its index."""
        deadline = time.monotonic() + timeout
        while True:
            for i, proc in enumerate(self.procs):
                if i not in self.killed and proc.poll() is not None:
                    raise AssertionError(f"etcd member {i} exited ({proc.returncode}):\n{self.log(i)}")
            leader = self.leader_index(among=among)
            if leader is not None:
                return leader
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- member {i}\n{self.log(i)[-3000:]}" for i in range(self.size))
                raise AssertionError(f"no etcd leader within {timeout} s:\n{logs}")
            time.sleep(0.05)

    def log(self, i: int) -> str:
        return self.log_path(i).read_text(errors="replace")

    def kill(self, i: int) -> None:
        """SIGKILL member ``i`` and reap it: a crash, not a shutdown (connections are reset, nothing flushed)."""
        proc = self.procs[i]
        self.killed.add(i)
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait()
        for log in self._logs:
            log.close()

    def __enter__(self) -> EtcdCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
