"""REST API benchmark: ``POST /api/1.1/lookup`` requests/s over keep-alive TLS, against nginx in the same run.

    .venv/bin/python bench/api_lookup.py                       # 1 and 100 objects per request, 10 s each
    .venv/bin/python bench/api_lookup.py --duration 20 --connections 16 --profile

What it does:

1. **Data.** The feeds come from ``threatgate feeds generate`` (100,000 indicators by default), in
   ``bench/data/<size>/``, shared with ``node_throughput.py`` and reused while ``stamp.json`` matches.
2. **Requests.** Two pools of request bodies, ``[{"object": "..."}, ...]``: 2,000 bodies of 1 object and
   200 bodies of 100 objects.  Each object is, with probability ``--hit-share`` (5 %), a value listed in
   the feeds (taken from the generated events that ``expected.txt`` says detect: a URL, a host of a
   domain record, an address, an MD5), else a value that is not listed: a URL (35 %), a host name (20 %),
   an IPv4 address (30 %) or an MD5/SHA-1/SHA-256 (15 %), from the generated non-detecting events.
3. **Node.** A private node config (in a temporary directory) with the generated feeds, an
   ``<HTTPServer>`` on a free port, one bench user and ``ScannersCount`` 20.  The node runs as
   ``python -m threatgate node`` and is ready when it logs "node listening for events".  One node per
   engine of ``--engines`` (default ``compiled,reference``, ``THREATGATE_ENGINE`` in its environment),
   one after the other on the same config; every engine after the first must answer every prepared
   request byte for byte as the first did (else the set-up fails, exit 2).
4. **nginx anchor.** nginx (``worker_processes 1``, same certificate, same TLS 1.3 suites, keep-alive,
   ``access_log off``, ``open_file_cache``) serves, for every prepared request, a static file holding the
   node's own answer to that request, byte for byte, so both servers read the same requests and write
   responses of the same size.  nginx's static module answers POST with 405; ``error_page 405 =200 $uri;``
   turns that into an internal redirect to the same file as a GET, answered 200 with the file.
5. **Load.** ``wrk`` with ``api_lookup.lua``: keep-alive POSTs cycling through the pool, the same
   headers (Content-Type, Accept, Authorization) for both servers.  Every answer other than 200 is
   counted, as are wrk's socket errors and timeouts: a run that has any is marked INVALID.
6. **CPU.** utime + stime of the node process (all threads) and of nginx's worker, from
   ``/proc/<pid>/stat``, over the measured run only (a warm-up run comes first), so
   "objects per CPU-second" is the per-core figure.  wrk's own CPU and the whole machine's busy CPU
   are shown too, to judge noise on a shared machine.

``--profile`` then samples the node with py-spy during one more run per size and prints the top
functions by own time and by total time (py-spy: ``.venv/bin/pip install py-spy``; not a project
dependency).

Exit status: 0 when the runs are valid, whether or not the targets are met (a benchmark is not a
gate); 1 when a run had errors or non-200 answers; 2 when the set-up failed (missing tools, the node or
nginx did not start).
"""

from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import http.client
import json
import os
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import node_throughput  # bench/ is on sys.path when this file runs as a script

HERE = os.path.dirname(os.path.abspath(__file__))
LUA = os.path.join(HERE, "api_lookup.lua")
API_PATH = "/api/1.1/lookup"
SCANNERS = 20
USER = "bench"

TARGET_SINGLE_PER_CORE = 8_000  # single-object lookups/s per core over keep-alive TLS
TARGET_BATCH_OBJECTS = 500_000  # objects/s with 100-object requests
GENERATED_HIT_RATE = 0.05  # node_throughput.py's default, so both scripts share bench/data/<size>/

NON_HIT_MIX = (("url", 35), ("domain", 20), ("ip", 30), ("hash", 15))
"""Kinds of the values that are not listed, and their weights."""

CLK_TCK = os.sysconf("SC_CLK_TCK")


class SetupError(Exception):
    """The bench could not be set up (missing tool, a server that did not start): exit 2."""


# -- processes ----------------------------------------------------------------------------------------


def tcp_table() -> list[list[str]]:
    """Every row of /proc/net/tcp and /proc/net/tcp6, split into fields (local address 1, remote 2,
    state 3 ("01" established, "08" close-wait), inode 9)."""
    rows: list[list[str]] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as fh:
                next(fh)
                rows.extend(line.split() for line in fh)
        except OSError:
            continue
    return rows


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as fh:
        values = [int(x) for x in fh.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already in user
    return (total - idle) / CLK_TCK, total / CLK_TCK


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (scans /proc: /proc/<pid>/task/*/children is not always built in)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(entry))
    return found


def stop_group(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM the process group of ``proc`` (started with start_new_session), then SIGKILL if needed."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def wait_for_log(proc: subprocess.Popen[bytes], log_path: str, needle: str, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            if needle in fh.read():
                return
        if proc.poll() is not None:
            raise SetupError(f"{what} exited with {proc.returncode} before it was ready:\n{tail(log_path)}")
        time.sleep(0.1)
    raise SetupError(f"{what} not ready within {timeout:.0f} s:\n{tail(log_path)}")


def wait_for_port(proc: subprocess.Popen[bytes], port: int, timeout: float, what: str, log_path: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SetupError(f"{what} exited with {proc.returncode}:\n{tail(log_path)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SetupError(f"{what} not listening on port {port} within {timeout:.0f} s:\n{tail(log_path)}")


def tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError:
        return "(no log)"


def find_tool(name: str, given: str | None) -> str:
    path = (
        given
        or shutil.which(name)
        or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)
    )
    if not path or not os.access(path, os.X_OK):
        raise SetupError(f"{name} not found: install it with `apt-get install wrk nginx-light` (or pass --{name})")
    return path


# -- request bodies ----------------------------------------------------------------------------------


_FIELDS = re.compile(r"\b(src|dst|url|md5)=(\S+)")


def value_pools(out: str, seed: int, wanted: int) -> tuple[list[str], dict[str, list[str]]]:
    """(listed values, {kind: values that are not listed}) taken from the generated events.

    A hit event carries exactly one listed value, of the category ``expected.txt`` gives; its other
    values are not used (they may be anything).  Events that detect nothing give the unlisted values.
    """
    categories: dict[int, str] = {}
    with open(os.path.join(out, "expected.txt"), encoding="ascii") as fh:
        for line in fh:
            event_no, name = line.split()
            categories[int(event_no)] = name
    hits: list[str] = []
    misses: dict[str, list[str]] = {kind: [] for kind, _ in NON_HIT_MIX}
    with open(os.path.join(out, "events.txt"), encoding="ascii") as fh:
        for line in fh:
            number = int(line.split(" ", 1)[0])
            values = dict(_FIELDS.findall(line))
            category: str | None = categories.get(number)
            if category == "Malicious_URL":
                hits.append(values["url"])
            elif category == "Botnet_Domain":
                hits.append(urlsplit(values["url"]).hostname or values["url"])
            elif category == "IP_Reputation":
                hits.append(values["dst"])
            elif category == "Malicious_Hash":
                hits.append(values["md5"])
            elif category is None:
                misses["url"].append(values["url"])
                misses["domain"].append(urlsplit(values["url"]).hostname or "")
                misses["ip"].append(values["src" if number % 2 else "dst"])
                if "md5" in values:
                    misses["hash"].append(values["md5"])
            if len(hits) >= wanted and min(len(v) for v in misses.values()) >= wanted:
                break
    # SHA-1 and SHA-256 values that are not listed, next to the MD5s of the events.
    rng = random.Random(seed)
    for n in range(len(misses["hash"]) // 2):
        data = f"{seed}:api-bench:{n}".encode()
        digest = hashlib.sha1(data) if rng.random() < 0.5 else hashlib.sha256(data)
        misses["hash"].append(digest.hexdigest())
    if not hits or not all(misses.values()):
        raise SetupError(f"{out}: not enough generated events to draw lookup values from")
    return hits, misses


def make_bodies(
    hits: list[str], misses: dict[str, list[str]], per_request: int, count: int, hit_share: float, rng: random.Random
) -> list[str]:
    kinds = [k for k, _ in NON_HIT_MIX]
    weights = [w for _, w in NON_HIT_MIX]
    bodies = []
    for _ in range(count):
        objects = []
        for _ in range(per_request):
            if rng.random() < hit_share:
                value = rng.choice(hits)
            else:
                value = rng.choice(misses[rng.choices(kinds, weights)[0]])
            objects.append({"object": value})
        bodies.append(json.dumps(objects, separators=(",", ":")))
    return bodies


# -- servers ------------------------------------------------------------------------------------------


NODE_HTTP = """\
  <ServiceSettings>
    <ScannersCount>{scanners}</ScannersCount>
  </ServiceSettings>
  <HTTPServer>
    <ConnectionString>127.0.0.1:{port}</ConnectionString>
    <CertificatePath>{cert}</CertificatePath>
    <PrivateKeyPath>{key}</PrivateKeyPath>
    <Database>{db}</Database>
    <Users>
      <User name="{user}" password_hash="{password_hash}"/>
    </Users>
  </HTTPServer>
</Configuration>
"""


def node_config(out: str, run_dir: str, port: int, password: str, cert: str, key: str) -> str:
    """The generated node.conf with absolute feed paths, free event ports and an <HTTPServer> block."""
    from threatgate.node.auth import hash_password

    with open(os.path.join(out, "node.conf"), encoding="utf-8") as fh:
        text = fh.read()
    text = re.sub(r'filename="([^"]+)"', lambda m: f'filename="{os.path.join(out, m.group(1))}"', text)
    ports = iter([free_port(), free_port()])
    text = re.sub(r"<ConnectionString>127\.0\.0\.1:\d+</ConnectionString>", lambda m: _conn(next(ports)), text, count=2)
    if "<HTTPServer>" in text or "<ServiceSettings>" in text:
        raise SetupError(f"{out}/node.conf already has <HTTPServer> or <ServiceSettings>: regenerate it")
    text = text.replace(
        "</Configuration>",
        NODE_HTTP.format(
            scanners=SCANNERS,
            port=port,
            cert=cert,
            key=key,
            db=os.path.join(run_dir, "node.sqlite3"),
            user=USER,
            password_hash=hash_password(password),
        ),
    )
    path = os.path.join(run_dir, "node.conf")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path


def _conn(port: int) -> str:
    return f"<ConnectionString>127.0.0.1:{port}</ConnectionString>"


NGINX_CONF = """\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    default_type application/json;
    types {{ }}
    keepalive_timeout 75s;
    keepalive_requests 100000000;
    client_max_body_size 16m;
    client_body_buffer_size 1m;
    open_file_cache max=10000 inactive=120s;
    open_file_cache_valid 120s;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {ciphers};
        ssl_prefer_server_ciphers on;
        root {prefix}/www;
        location / {{
            # The static module answers POST with 405; this redirects internally to the same URI as a
            # GET, which serves the file with status 200 (the request body is read and discarded).
            error_page 405 =200 $uri;
        }}
    }}
}}
"""


@dataclass
class Server:
    name: str
    url: str
    requests: dict[int, str]  # objects per request -> requests file for wrk
    proc: subprocess.Popen[bytes]
    cpu_pid: int  # the process whose CPU is measured
    log_path: str


def start_node(
    config: str, run_dir: str, port: int, timeout: float, engine: str | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """A node on ``config``, ready; ``engine`` sets THREATGATE_ENGINE (None: this process's environment)."""
    log_path = os.path.join(run_dir, f"node-{engine}.log" if engine else "node.log")
    env = dict(os.environ, THREATGATE_ENGINE=engine) if engine else None
    with open(log_path, "wb") as log_fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "threatgate", "node", "--config", config],
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    try:
        wait_for_log(proc, log_path, "node listening for events", timeout, "the node")
        wait_for_port(proc, port, 5.0, "the node's API", log_path)
    except BaseException:
        stop_group(proc)
        raise
    return proc, log_path


def start_nginx(nginx: str, prefix: str, port: int, cert: str, key: str) -> tuple[subprocess.Popen[bytes], int, str]:
    """nginx in the foreground (``daemon off``) in its own session; (master, worker pid, log path)."""
    from threatgate.net.tls import SERVER_CIPHERS

    for sub in ("tmp", "www"):
        os.makedirs(os.path.join(prefix, sub), exist_ok=True)
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w", encoding="utf-8") as fh:
        fh.write(NGINX_CONF.format(prefix=prefix, port=port, cert=cert, key=key, ciphers=SERVER_CIPHERS))
    return run_nginx(nginx, prefix, conf, port)


def run_nginx(nginx: str, prefix: str, conf: str, port: int) -> tuple[subprocess.Popen[bytes], int, str]:
    """nginx on ``conf`` in the foreground (``daemon off``) in its own session; (master, worker pid, error log)."""
    log_path = os.path.join(prefix, "error.log")
    check = subprocess.run(
        [nginx, "-t", "-q", "-p", prefix, "-c", conf, "-e", log_path], capture_output=True, text=True, timeout=30
    )
    if check.returncode != 0:
        raise SetupError(f"nginx -t failed:\n{check.stderr}{tail(log_path)}")
    with open(os.path.join(prefix, "nginx.out"), "ab") as out_fh:
        proc = subprocess.Popen(
            [nginx, "-p", prefix, "-c", conf, "-e", log_path, "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=out_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_port(proc, port, 10.0, "nginx", log_path)
        deadline = time.monotonic() + 5
        workers = children(proc.pid)
        while not workers and time.monotonic() < deadline:
            time.sleep(0.05)
            workers = children(proc.pid)
        if len(workers) != 1:
            raise SetupError(f"expected one nginx worker under master {proc.pid}, found {workers}")
    except BaseException:
        stop_group(proc)
        raise
    return proc, workers[0], log_path


def post_all(port: int, cafile: str, authorization: str, bodies: list[str], what: str) -> list[bytes]:
    """Every body POSTed to ``port`` over one keep-alive connection; SetupError unless every answer is 200."""
    ctx = ssl.create_default_context(cafile=cafile)
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    headers = {"Content-Type": "application/json", "Accept": "application/json", "Authorization": authorization}
    answers = []
    try:
        for body in bodies:
            conn.request("POST", API_PATH, body=body.encode(), headers=headers)
            response = conn.getresponse()
            data = response.read()
            if response.status != 200:
                raise SetupError(f"{what} answered {response.status} to a lookup: {data[:300]!r}")
            answers.append(data)
    except (OSError, http.client.HTTPException) as exc:
        raise SetupError(f"{what}: {type(exc).__name__}: {exc}") from None
    finally:
        conn.close()
    return answers


# -- wrk ----------------------------------------------------------------------------------------------


@dataclass
class Run:
    server: str
    per_request: int
    duration: float  # seconds, wrk's
    requests: int
    bytes: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int]  # socket errors and timeouts from wrk, "non-200" from the Lua script
    first_bad: str
    server_cpu: float
    wrk_cpu: float
    machine_busy: float  # cores busy on average during the run (all processes)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.duration

    @property
    def objects_per_s(self) -> float:
        return self.rps * self.per_request

    @property
    def objects_per_cpu_s(self) -> float:
        return self.requests * self.per_request / self.server_cpu if self.server_cpu > 0 else float("nan")

    @property
    def valid(self) -> bool:
        return not any(self.errors.values()) and self.requests > 0


def run_wrk(
    wrk: str, server: Server, per_request: int, args: argparse.Namespace, authorization: str, duration: int
) -> Run:
    cmd = [
        wrk,
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{duration}s",
        f"--timeout={args.timeout}s",
        "--latency",
        "-s",
        LUA,
        server.url,
        "--",
        server.requests[per_request],
        authorization,
    ]
    cpu0 = cpu_seconds(server.cpu_pid)
    busy0, total0 = machine_busy()
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)  # grows by exactly wrk once it is reaped
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = proc.communicate(timeout=duration + args.timeout + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise SetupError(f"wrk did not finish: {' '.join(cmd)}") from None
    cpu1 = cpu_seconds(server.cpu_pid)
    busy1, total1 = machine_busy()
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = stdout.decode(errors="replace")
    match = re.search(r"^WRKJSON (\{.*\})$", text, re.M)
    if proc.returncode != 0 or match is None:
        raise SetupError(f"wrk failed ({proc.returncode}): {' '.join(cmd)}\n{text}{stderr.decode(errors='replace')}")
    data = json.loads(match.group(1))
    bad = re.search(r"^WRKBAD (.*)$", text, re.M)
    ncpu = os.cpu_count() or 1
    return Run(
        server=server.name,
        per_request=per_request,
        duration=data["duration_us"] / 1e6,
        requests=data["requests"],
        bytes=data["bytes"],
        p50_ms=data["p50"] / 1000,
        p90_ms=data["p90"] / 1000,
        p99_ms=data["p99"] / 1000,
        max_ms=data["max"] / 1000,
        errors={
            "connect": data["connect"],
            "read": data["read"],
            "write": data["write"],
            "timeout": data["timeout"],
            "non-200": data["bad"],
        },
        first_bad=bad.group(1) if bad else "",
        server_cpu=cpu1 - cpu0,
        wrk_cpu=usage1.ru_utime - usage0.ru_utime + usage1.ru_stime - usage0.ru_stime,
        machine_busy=(busy1 - busy0) / (total1 - total0) * ncpu if total1 > total0 else float("nan"),
        extra={"wrk_output": text},
    )


# -- profile ------------------------------------------------------------------------------------------


def profile_run(
    py_spy: str, wrk: str, server: Server, per_request: int, args: argparse.Namespace, authorization: str, out: str
) -> tuple[Run, str]:
    """One more wrk run with py-spy sampling the node; (run, report text)."""
    raw = os.path.join(out, f"py-spy-{per_request}.txt")
    cmd = [py_spy, "record", "-p", str(server.proc.pid), "-d", str(args.duration), "-r", "200"]
    cmd += ["-f", "raw", "--nolineno", "-o", raw]
    if args.native:
        cmd.append("--native")
    spy = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(0.5)
        run = run_wrk(wrk, server, per_request, args, authorization, args.duration)
        spy_out, _ = spy.communicate(timeout=args.duration + 60)
    except subprocess.TimeoutExpired:
        raise SetupError("py-spy did not finish") from None
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if spy.returncode != 0 or not os.path.exists(raw):
        raise SetupError(f"py-spy failed ({spy.returncode}): {spy_out.decode(errors='replace')[-2000:]}")
    return run, summarize_stacks(raw, args.top)


def _frame_name(frame: str) -> str:
    """``lookup_object (threatgate/node/matcher.py)`` -> ``matcher.py:lookup_object``."""
    m = re.match(r"(.*?) \((.*)\)$", frame.strip())
    if not m:
        return frame.strip()
    func, path = m.groups()
    return f"{os.path.basename(path)}:{func}"


def summarize_stacks(raw: str, top: int) -> str:
    """Top functions by own (leaf) and total samples of the main thread, from py-spy's collapsed stacks.

    Only the main thread runs the event loop and the API; the other threads are the default
    executor's workers, which py-spy samples as busy while they wait on their queue, so they are left
    out.  Frames on every stack (runpy, click, ``run_node``) are left out of the total table.
    """
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = other = 0
    with open(raw, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            stack, _, count_s = line.rstrip("\n").rpartition(" ")
            if not stack or not count_s.isdigit():
                continue
            count = int(count_s)
            frames = [_frame_name(f) for f in stack.split(";")]
            if not frames or any("Thread._bootstrap" in f for f in frames):
                other += count
                continue
            samples += count
            own[frames[-1]] += count
            for name in set(frames):
                total[name] += count
    if not samples:
        return "no samples"
    lines = [
        f"{samples} samples of the main thread while busy ({other} of other threads left out)",
        "",
        "| function | own % | total % |",
        "|---|---:|---:|",
    ]
    for name, count in own.most_common(top):
        lines.append(f"| `{name}` | {100 * count / samples:.1f} | {100 * total[name] / samples:.1f} |")
    lines += ["", "by total (inclusive) time:", "", "| function | total % | own % |", "|---|---:|---:|"]
    listed = [(n, c) for n, c in total.most_common() if c < 0.995 * samples or own[n] >= 0.005 * samples]
    for name, count in listed[:top]:
        lines.append(f"| `{name}` | {100 * count / samples:.1f} | {100 * own[name] / samples:.1f} |")
    return "\n".join(lines)


# -- report -------------------------------------------------------------------------------------------

COLUMNS = (
    "server",
    "obj/req",
    "req/s",
    "objects/s",
    "p50 ms",
    "p99 ms",
    "server CPU s",
    "server CPU %",
    "objects/CPU-s",
    "wrk CPU s",
    "machine busy",
    "valid",
)


def cells(run: Run) -> list[str]:
    errors = {k: v for k, v in run.errors.items() if v}
    return [
        run.server,
        str(run.per_request),
        f"{run.rps:,.0f}",
        f"{run.objects_per_s:,.0f}",
        f"{run.p50_ms:.2f}",
        f"{run.p99_ms:.2f}",
        f"{run.server_cpu:.2f}",
        f"{100 * run.server_cpu / run.duration:.0f}",
        f"{run.objects_per_cpu_s:,.0f}",
        f"{run.wrk_cpu:.2f}",
        f"{run.machine_busy:.2f} cores",
        "ok" if run.valid else "INVALID " + ", ".join(f"{k}={v}" for k, v in errors.items()),
    ]


def print_report(runs: list[Run], sizes: dict[int, tuple[float, float]]) -> bool:
    """Tables, ratios and targets; returns whether every run was valid."""
    print()
    node_throughput.print_table(COLUMNS, [cells(r) for r in runs])
    print()
    for per_request, (request_bytes, answer_bytes) in sorted(sizes.items()):
        print(f"{per_request} object(s)/request: request bodies {request_bytes:,.0f} B, answers {answer_bytes:,.0f} B")
    by_key = {(r.server, r.per_request): r for r in runs}
    nodes = list(dict.fromkeys(r.server for r in runs if r.server.startswith("node")))
    print()
    for per_request in sorted({r.per_request for r in runs}):
        for name in nodes:
            node, nginx = by_key.get((name, per_request)), by_key.get(("nginx", per_request))
            if node and nginx:
                print(
                    f"{name}/nginx at {per_request} object(s)/request: req/s {node.rps / nginx.rps:.3f}, "
                    f"per CPU-second {node.objects_per_cpu_s / nginx.objects_per_cpu_s:.3f} "
                    f"(nginx {nginx.rps / node.rps:.1f}x the node's req/s, "
                    f"{nginx.objects_per_cpu_s / node.objects_per_cpu_s:.1f}x per CPU-second)"
                )
    print()
    print("targets:")
    for name in nodes:
        single, batch = by_key.get((name, 1)), by_key.get((name, 100))
        if single:
            value = single.objects_per_cpu_s
            print(
                f"  {name}: single-object lookups/s per core  {value:>10,.0f}  target >= {TARGET_SINGLE_PER_CORE:,}  "
                f"{_verdict(value, TARGET_SINGLE_PER_CORE)}  (wall {single.rps:,.0f} req/s)"
            )
        if batch:
            value = batch.objects_per_s
            print(
                f"  {name}: objects/s with 100-object requests {value:>9,.0f}  target >= {TARGET_BATCH_OBJECTS:,}  "
                f"{_verdict(value, TARGET_BATCH_OBJECTS)}  (per CPU-second {batch.objects_per_cpu_s:,.0f})"
            )
    valid = all(r.valid for r in runs)
    for r in runs:
        if not r.valid:
            print(
                f"INVALID: {r.server} at {r.per_request} object(s)/request had errors {r.errors}"
                + (f"; first non-200 answer: {r.first_bad}" if r.first_bad else "")
            )
    return valid


def _verdict(value: float, target: float) -> str:
    if value >= target:
        return f"met ({value / target:.2f}x)"
    return f"NOT met ({100 * value / target:.1f} % of target, {target / value:.1f}x short)"


# -- main ---------------------------------------------------------------------------------------------


def add_lookup_arguments(parser: argparse.ArgumentParser) -> None:
    """The data, body and wrk options shared with gateway_lookup.py (same data, same load)."""
    parser.add_argument("--indicators", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=200_000, help="generated events (the value pools come from them)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hit-share", type=float, default=0.05, help="share of objects that are listed")
    parser.add_argument("--objects", default="1,100", help="comma-separated objects per request")
    parser.add_argument("--bodies-single", type=int, default=2000, help="distinct bodies for 1-object requests")
    parser.add_argument("--bodies-batch", type=int, default=200, help="distinct bodies for larger requests")
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run (wrk takes whole seconds)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of wrk before each measured run (0: none)")
    parser.add_argument("--connections", type=int, default=8, help=f"wrk connections (at most {SCANNERS})")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--timeout", type=int, default=5, help="wrk's per-request timeout, seconds")
    parser.add_argument("--data-dir", default=node_throughput.DEFAULT_DATA)
    parser.add_argument("--native", action="store_true", help="with --profile: include C frames (py-spy --native)")
    parser.add_argument("--top", type=int, default=25, help="with --profile: functions listed")
    parser.add_argument("--wrk", help="path of wrk")
    parser.add_argument("--nginx", help="path of nginx")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    add_lookup_arguments(parser)
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx anchor")
    parser.add_argument(
        "--engines", default="compiled,reference", help="matching engines, one node each in turn (THREATGATE_ENGINE)"
    )
    parser.add_argument("--profile", action="store_true", help="py-spy the node during one more run per size")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs, bodies)")
    parser.add_argument("--json", dest="json_out", help="also write the raw results to this file")
    args = parser.parse_args()
    try:
        return bench(args)
    except SetupError as exc:
        print(f"api_lookup: set-up failed: {exc}", file=sys.stderr)
        return 2


def measure_server(
    wrk: str, server: Server, per_requests: list[int], args: argparse.Namespace, authorization: str
) -> list[Run]:
    """A warm-up and a measured wrk run per request size against one server."""
    log = sys.stderr
    runs = []
    for n in per_requests:
        if args.warmup > 0:
            run_wrk(wrk, server, n, args, authorization, args.warmup)
        print(f"wrk: {server.name}, {n} object(s)/request, {args.duration:g} s ...", file=log, flush=True)
        run = run_wrk(wrk, server, n, args, authorization, args.duration)
        print(
            f"  {run.rps:,.0f} req/s, {run.objects_per_s:,.0f} objects/s, server CPU {run.server_cpu:.2f} s"
            + ("" if run.valid else f"  INVALID {run.errors} {run.first_bad}"),
            file=log,
            flush=True,
        )
        runs.append(run)
        if server.proc.poll() is not None:
            raise SetupError(f"{server.name} exited with {server.proc.returncode}:\n{tail(server.log_path)}")
    return runs


def bench(args: argparse.Namespace) -> int:
    from threatgate.net.tls import ensure_server_pair

    if not 1 <= args.connections <= SCANNERS:
        raise SetupError(f"--connections must be 1..{SCANNERS} (ScannersCount; more would be answered 429)")
    if args.duration < 1 or args.warmup < 0 or args.timeout < 1:
        raise SetupError("--duration and --timeout must be at least 1 s, --warmup at least 0")
    if args.threads > args.connections:
        raise SetupError("--threads must not exceed --connections")
    wrk = find_tool("wrk", args.wrk)
    nginx = None if args.no_nginx else find_tool("nginx", args.nginx)
    py_spy = None
    if args.profile:
        py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        if not os.access(py_spy, os.X_OK):
            raise SetupError("--profile needs py-spy: .venv/bin/pip install py-spy")
    try:
        per_requests = sorted({int(x) for x in args.objects.split(",") if x.strip()})
    except ValueError:
        raise SetupError(f"--objects {args.objects!r}: expected comma-separated integers") from None
    if not per_requests or per_requests[0] < 1:
        raise SetupError("--objects: every size must be at least 1")

    log = sys.stderr
    out, gen_s = node_throughput.ensure_data(args.data_dir, args.indicators, args.events, GENERATED_HIT_RATE, args.seed)
    if gen_s is not None:
        print(f"generated the data in {gen_s:.1f} s", file=log)
    rng = random.Random(args.seed)
    counts = {n: (args.bodies_single if n == 1 else args.bodies_batch) for n in per_requests}
    wanted = max(n * c for n, c in counts.items())
    hits, misses = value_pools(out, args.seed, min(wanted, 20_000))
    bodies = {n: make_bodies(hits, misses, n, counts[n], args.hit_share, rng) for n in per_requests}

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not engines or len(set(engines)) != len(engines) or any(e not in ("compiled", "reference") for e in engines):
        raise SetupError(f"--engines {args.engines!r}: one or both of compiled, reference")

    run_dir = tempfile.mkdtemp(prefix="threatgate-api-bench-")
    os.chmod(run_dir, 0o755)  # nginx's worker runs as nobody when started by root: it must read www/
    node_proc: subprocess.Popen[bytes] | None = None
    nginx_proc: subprocess.Popen[bytes] | None = None
    ok = False
    try:
        cert, key = os.path.join(run_dir, "tls", "server.pem"), os.path.join(run_dir, "tls", "server.key")
        ensure_server_pair(cert, key, common_name="threatgate api bench", hosts=["127.0.0.1", "localhost"])
        os.chmod(os.path.dirname(cert), 0o755)
        password = secrets.token_urlsafe(16)
        authorization = "Basic " + base64.b64encode(f"{USER}:{password}".encode()).decode()
        node_port = free_port()
        config = node_config(out, run_dir, node_port, password, cert, key)
        www = os.path.join(run_dir, "nginx", "www", "r")
        os.makedirs(www)
        sizes: dict[int, tuple[float, float]] = {}
        node_files: dict[int, str] = {}
        nginx_files: dict[int, str] = {}
        first: dict[int, list[bytes]] = {}  # the first engine's answers, which nginx serves
        detected = total = 0
        runs: list[Run] = []
        profiles: dict[str, str] = {}
        for engine in engines:  # one node per engine, in turn, on the same config and port
            print(f"starting the {engine} node on port {node_port} ({args.indicators:,} indicators) ...", file=log)
            started = time.monotonic()
            node_proc, node_log = start_node(config, run_dir, node_port, timeout=300, engine=engine)
            print(f"  ready in {time.monotonic() - started:.1f} s", file=log, flush=True)
            for n in per_requests:
                answers = post_all(node_port, cert, authorization, bodies[n], f"the {engine} node")
                if n in first:
                    differ = [i for i, (a, b) in enumerate(zip(first[n], answers, strict=True)) if a != b]
                    if differ:
                        raise SetupError(
                            f"the {engine} node answers {len(differ)} of {len(answers)} {n}-object requests unlike "
                            f"the {engines[0]} node; the first:\n{bodies[n][differ[0]][:500]}\n"
                            f"{first[n][differ[0]][:500]!r}\n{answers[differ[0]][:500]!r}"
                        )
                    continue
                first[n] = answers
                for answer in answers:
                    results = json.loads(answer)
                    total += len(results)
                    detected += sum(1 for r in results if r["result"] == "detected")
                sizes[n] = (
                    sum(len(b) for b in bodies[n]) / len(bodies[n]),
                    sum(len(a) for a in answers) / len(answers),
                )
                node_files[n] = os.path.join(run_dir, f"requests-{n}-node.txt")
                nginx_files[n] = os.path.join(run_dir, f"requests-{n}-nginx.txt")
                with (
                    open(node_files[n], "w", encoding="utf-8") as nf,
                    open(nginx_files[n], "w", encoding="utf-8") as gf,
                ):
                    for i, (body, answer) in enumerate(zip(bodies[n], answers, strict=True)):
                        name = f"{n}-{i}.json"
                        with open(os.path.join(www, name), "wb") as fh:
                            fh.write(answer)
                        nf.write(f"{API_PATH} {body}\n")
                        gf.write(f"/r/{name} {body}\n")
            if engine == engines[0]:
                print(
                    f"  {detected:,} of {total:,} looked-up objects detected ({100 * detected / total:.1f} %)", file=log
                )
            else:
                print(f"  the same answers as the {engines[0]} node, byte for byte", file=log)
            url = f"https://127.0.0.1:{node_port}"
            node = Server(f"node {engine}", url, node_files, node_proc, node_proc.pid, node_log)
            runs += measure_server(wrk, node, per_requests, args, authorization)
            if py_spy:
                for n in per_requests:
                    print(
                        f"py-spy: {engine} node, {n} object(s)/request, {args.duration:g} s ...", file=log, flush=True
                    )
                    prun, profiles[f"{engine} node at {n}"] = profile_run(
                        py_spy, wrk, node, n, args, authorization, run_dir
                    )
                    print(f"  {prun.rps:,.0f} req/s under the profiler", file=log, flush=True)
            stop_group(node_proc)

        if nginx:
            nginx_port = free_port()
            prefix = os.path.join(run_dir, "nginx")
            nginx_proc, worker, nginx_log = start_nginx(nginx, prefix, nginx_port, cert, key)
            url = f"https://127.0.0.1:{nginx_port}"
            anchor = Server("nginx", url, nginx_files, nginx_proc, worker, nginx_log)
            runs += measure_server(wrk, anchor, per_requests, args, authorization)

        print(
            f"\ncode {node_throughput.code_version()}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
            f"{args.indicators:,} indicators, wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s, "
            f"keep-alive TLS, {100 * detected / total:.1f} % of objects detected"
        )
        valid = print_report(runs, sizes)
        for what, text in profiles.items():
            print(f"\npy-spy of the {what} object(s)/request, top {args.top} by own time:\n")
            print(text)
        if args.json_out:
            with open(args.json_out, "w", encoding="utf-8") as fh:
                raw = [{**r.__dict__, "extra": None} for r in runs]
                json.dump({"runs": raw, "sizes": sizes, "profiles": profiles}, fh, indent=1)
        ok = True
        return 0 if valid else 1
    finally:
        stop_group(nginx_proc)
        stop_group(node_proc)
        if args.keep or not ok:
            print(f"kept {run_dir}", file=sys.stderr)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
