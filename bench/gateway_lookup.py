"""REST gateway benchmark: ``POST /api/1.1/lookup`` through the balancer and through nginx, in the same run.

    .venv/bin/python bench/gateway_lookup.py                       # 1 and 100 objects per request, 10 s each
    .venv/bin/python bench/gateway_lookup.py --profile             # + py-spy of the balancer
    .venv/bin/python bench/gateway_lookup.py --rounds 2 --objects 1 --json out.json

What it does:

1. **Data and requests.** The feeds of ``bench/data/<size>/`` (100,000 indicators by default) and the
   request bodies are made exactly as by ``api_lookup.py`` (same functions, same seed): 2,000 bodies of
   1 object and 200 of 100 objects, 5 % listed values.
2. **Two nodes** (``python -m threatgate node``), each with the generated feeds, its own self-signed
   certificate (``ensure_server_pair``), an ``<HTTPServer>`` with one bench user and ``ScannersCount`` 20.
3. **The balancer** in front of both: ``<AllowedRequests>`` with ``POST /api/1.1/lookup`` only,
   ``<HealthCheck interval="1" timeout="2" rise="1" fall="1"/>``.  It is ready when it has logged
   "REST gateway listening" and both instances UP.  Every body of both pools then goes through it once
   on one keep-alive connection (the warm-up): the first request to each node pins that node's
   certificate, and the answers give the share of detected objects.  A sample of the answers is checked,
   byte for byte, against the answers of node 1 asked directly.
4. **nginx** (Debian's, ``worker_processes 1``) as the TLS reverse proxy: a TLS listener with its own
   certificate, ``location = /api/1.1/lookup`` (POST only, everything else 403, as the allow-list),
   ``proxy_pass https://nodes;`` to an ``upstream`` block with both nodes and ``keepalive 32``,
   ``proxy_http_version 1.1; proxy_set_header Connection "";`` and the same ``X-Forwarded-*`` headers
   the balancer adds.  Upstream TLS is verified (``proxy_ssl_verify on``) against a bundle of the two
   nodes' certificates.  ``proxy_ssl_name`` is tried as ``127.0.0.1`` first, then ``localhost`` (the
   nodes' certificates carry both); only if neither verifies is verification switched off, for the
   bench only, and the output says so and why.
5. **Load.** The same ``wrk -t1 -c8 -d10s --latency -s bench/api_lookup.lua`` on the same request file
   against the balancer's ``api_port`` and nginx, after a 2 s warm-up each; ``--rounds`` repeats the
   pair with the order swapped every round.  Any answer other than 200, socket error or timeout marks
   the run INVALID.  ``--connections`` is at most 20, the nodes' ``ScannersCount``.
6. **CPU.** utime + stime from ``/proc/<pid>/stat`` of the proxy (the balancer process, all threads;
   nginx's worker; with its system-time share), of each node, of wrk and of the whole machine, over the
   measured run; the time the proxy's main thread waited for a CPU (``/proc/<pid>/schedstat``); the
   proxy's open connections to the nodes after the run and the machine's TCP active opens during it
   (``/proc/net/snmp``), which shows whether the proxy reuses its upstream connections.

The report gives both proxies' req/s, p50/p99 and CPU, the ratios balancer/nginx for throughput and
p99, a verdict per target (>= 0.8x nginx's throughput, <= 1.25x nginx's p99) and what limits the run.
``--profile`` samples the balancer with py-spy during one more run per size and prints its top
functions (py-spy: ``.venv/bin/pip install py-spy``; not a project dependency).

Exit status: 0 when every run is valid, whether or not the targets are met (a benchmark is not a
gate); 1 when a run had errors or non-200 answers; 2 when the set-up failed (a missing tool, a process
that did not start, answers through a proxy that differ from the node's).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import node_throughput  # bench/ is on sys.path when this file runs as a script
from api_lookup import (
    API_PATH,
    CLK_TCK,
    GENERATED_HIT_RATE,
    SCANNERS,
    USER,
    Run,
    Server,
    SetupError,
    add_lookup_arguments,
    cpu_seconds,
    find_tool,
    free_port,
    make_bodies,
    node_config,
    post_all,
    profile_run,
    run_nginx,
    run_wrk,
    start_node,
    stop_group,
    tail,
    tcp_table,
    value_pools,
)
from balancer_throughput import Service, run_queue_wait, spawn, wait_for_lines

TARGET_RPS_RATIO = 0.8  # balancer req/s >= 0.8x nginx's
TARGET_P99_RATIO = 1.25  # balancer p99 <= 1.25x nginx's
PROXIES = ("balancer", "nginx")
CHECKED_ANSWERS = 100  # answers per pool compared byte for byte with node 1's own

BALANCER_CONF = """\
<?xml version="1.0" encoding="UTF-8"?>
<!-- gateway_lookup.py: two nodes, the lookup allowed, health checks that bring nodes UP (and DOWN) in 1 s. -->
<Config>
  <Balancer matching_port="{port}" api_port="{api_port}" cybertrace_port="{alert_port}"
            scanners_count="{scanners}">127.0.0.1</Balancer>
  <SSLCertificatePath>{cert}</SSLCertificatePath>
  <SSLPrivateKeyPath>{key}</SSLPrivateKeyPath>
  <CertDirPath>{pins}</CertDirPath>
  <Instances>
{instances}
  </Instances>
  <AllowedRequests>
    <Request method="POST" path="{path}"/>
  </AllowedRequests>
  <HealthCheck interval="1" timeout="2" rise="1" fall="1"/>
</Config>
"""

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
    keepalive_timeout 75s;
    keepalive_requests 100000000;
    client_max_body_size 64m;
    client_body_buffer_size 1m;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    upstream nodes {{
{servers}
        keepalive 32;
        keepalive_requests 100000000;
        keepalive_timeout 75s;
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {ciphers};
        ssl_prefer_server_ciphers on;
        location = {path} {{
            limit_except POST {{ deny all; }}
            proxy_pass https://nodes;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto https;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
            proxy_ssl_session_reuse on;
{verify}
        }}
        location / {{
            return 403;
        }}
    }}
}}
"""

VERIFY_ON = """\
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 1;
            proxy_ssl_trusted_certificate {bundle};
            proxy_ssl_name {name};"""
VERIFY_OFF = "            proxy_ssl_verify off;  # bench only: see the output"


# -- processes ----------------------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    proc: subprocess.Popen[bytes]
    api_port: int
    matching_port: int
    cert: str
    log_path: str


def start_nodes(out: str, run_dir: str, count: int, password: str) -> list[Node]:
    from threatgate.net.tls import ensure_server_pair

    nodes: list[Node] = []
    try:
        for i in range(1, count + 1):
            name = f"node{i}"
            node_dir = os.path.join(run_dir, name)
            os.makedirs(os.path.join(node_dir, "tls"))
            cert, key = os.path.join(node_dir, "tls", "server.pem"), os.path.join(node_dir, "tls", "server.key")
            ensure_server_pair(cert, key, common_name=f"threatgate bench {name}", hosts=["127.0.0.1", "localhost"])
            api_port = free_port()
            config = node_config(out, node_dir, api_port, password, cert, key)
            with open(config, encoding="utf-8") as fh:
                match = re.search(r"<InputSettings>\s*<ConnectionString>127\.0\.0\.1:(\d+)<", fh.read())
            if match is None:
                raise SetupError(f"{config}: no <InputSettings> connection string")
            started = time.monotonic()
            proc, log_path = start_node(config, node_dir, api_port, timeout=300)
            nodes.append(Node(name, proc, api_port, int(match.group(1)), cert, log_path))
            print(
                f"  {name}: API :{api_port}, events :{match.group(1)}, ready in {time.monotonic() - started:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    except BaseException:
        for node in nodes:
            stop_group(node.proc)
        raise
    return nodes


def start_balancer(run_dir: str, nodes: list[Node]) -> tuple[Service, int, str]:
    """The balancer, ready (gateway listening, every node UP); (service, api_port, its certificate)."""
    bal_dir = os.path.join(run_dir, "balancer")
    os.makedirs(bal_dir)
    cert, key = os.path.join(bal_dir, "tls", "balancer.pem"), os.path.join(bal_dir, "tls", "balancer.key")
    api_port = free_port()
    instances = "\n".join(
        f'    <Instance matching_port="{n.matching_port}" api_port="{n.api_port}" enabled="true">127.0.0.1</Instance>'
        for n in nodes
    )
    config = os.path.join(bal_dir, "balancer.conf")
    with open(config, "w", encoding="utf-8") as fh:
        fh.write(
            BALANCER_CONF.format(
                port=free_port(),
                api_port=api_port,
                alert_port=free_port(),
                scanners=SCANNERS,
                cert=cert,
                key=key,
                pins=os.path.join(bal_dir, "pins"),
                instances=instances,
                path=API_PATH,
            )
        )
    cmd = [sys.executable, "-m", "threatgate", "balancer", "--config", config, "--log-level", "inf"]
    service = spawn("balancer", cmd, os.path.join(bal_dir, "balancer.log"))
    try:
        wait_for_lines(service, r"REST gateway listening", 1, 60)
        wait_for_lines(service, r"instance \S+ is UP", len(nodes), 30)
    except BaseException:
        stop_group(service.proc)
        raise
    return service, api_port, cert


def write_nginx_conf(
    prefix: str, port: int, cert: str, key: str, nodes: list[Node], bundle: str, verify_name: str | None
) -> str:
    from threatgate.net.tls import SERVER_CIPHERS

    servers = "\n".join(f"        server 127.0.0.1:{n.api_port};" for n in nodes)
    verify = VERIFY_ON.format(bundle=bundle, name=verify_name) if verify_name else VERIFY_OFF
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w", encoding="utf-8") as fh:
        fh.write(
            NGINX_CONF.format(
                prefix=prefix,
                port=port,
                cert=cert,
                key=key,
                ciphers=SERVER_CIPHERS,
                servers=servers,
                path=API_PATH,
                verify=verify,
            )
        )
    return conf


def nginx_with_verification(
    nginx: str,
    prefix: str,
    port: int,
    cert: str,
    key: str,
    nodes: list[Node],
    authorization: str,
    sample: list[str],
    expected: list[bytes],
) -> tuple[subprocess.Popen[bytes], int, str, str]:
    """nginx answering ``sample`` as the nodes do, with upstream verification if it works.

    Returns (master, worker pid, error log, a sentence on how the nodes' certificates are checked).
    """
    bundle = os.path.join(prefix, "nodes-bundle.pem")
    with open(bundle, "w", encoding="ascii") as fh:
        for node in nodes:
            with open(node.cert, encoding="ascii") as cf:
                fh.write(cf.read())
    failures: list[str] = []
    for name in ("127.0.0.1", "localhost", None):
        conf = write_nginx_conf(prefix, port, cert, key, nodes, bundle, name)
        proc, worker, log_path = run_nginx(nginx, prefix, conf, port)
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            offset = len(fh.read())
        try:
            answers = post_all(port, cert, authorization, sample, "nginx")
        except SetupError as exc:
            stop_group(proc)
            with open(log_path, encoding="utf-8", errors="replace") as fh:
                errors = [line for line in fh.read()[offset:].splitlines() if "[error]" in line]
            # "2026/.. [error] 123#123: *2 upstream SSL certificate does not match ..., client: ..."
            why = re.sub(r"^.*?\*\d+ ", "", errors[0]).split(", client:")[0] if errors else str(exc)
            failures.append(f"proxy_ssl_name {name}: {why[:300]}")
            if name is None:
                raise SetupError(
                    "nginx does not answer even without upstream verification:\n" + "\n".join(failures)
                ) from None
            continue
        if answers != expected:
            stop_group(proc)
            raise SetupError("nginx's answers differ from node 1's own answers to the same requests")
        if name is None:
            how = (
                "proxy_ssl_verify OFF, for this bench only: verification against the bundle of the nodes' "
                "certificates failed (" + "; ".join(failures) + ")"
            )
        else:
            how = (
                f"proxy_ssl_verify on, proxy_ssl_trusted_certificate = the 2 nodes' certificates, proxy_ssl_name {name}"
            )
            if failures:
                how += " (" + "; ".join(failures) + ")"
        return proc, worker, log_path, how
    raise AssertionError("unreachable")


# -- measuring ----------------------------------------------------------------------------------------


def system_seconds(pid: int) -> float:
    """stime of a process (all its threads): the kernel's share of :func:`cpu_seconds`."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[12]) / CLK_TCK


def tcp_active_opens() -> int:
    """TCP connections this machine has opened (connect) so far, from /proc/net/snmp."""
    with open("/proc/net/snmp", encoding="ascii") as fh:
        rows = [line.split() for line in fh if line.startswith("Tcp:")]
    return int(rows[1][rows[0].index("ActiveOpens")])


def upstream_connections(pid: int, ports: set[int]) -> int:
    """Established TCP connections of ``pid`` toward any of ``ports`` on this host."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return -1
    return sum(1 for f in tcp_table() if f[3] == "01" and f[9] in inodes and int(f[2].rsplit(":", 1)[1], 16) in ports)


def incidents(log_path: str, offset: int) -> tuple[list[str], int]:
    """WARNING/ERROR lines of the balancer's log since ``offset`` (an instance DOWN, a refused request)."""
    with open(log_path, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    levels = (" WAR ", " ERR ", " CRI ", " is DOWN")  # threatgate.log writes the level in 3 letters
    notes = [line for line in text[offset:].splitlines() if any(mark in line for mark in levels)]
    return notes, len(text)


def measure(
    wrk: str,
    server: Server,
    per_request: int,
    args: argparse.Namespace,
    authorization: str,
    nodes: list[Node],
    round_no: int,
) -> Run:
    """One measured wrk run, with the nodes' CPU, the proxy's run-queue wait and its upstream connections."""
    node_cpu0 = [cpu_seconds(n.proc.pid) for n in nodes]
    runq0 = run_queue_wait(server.cpu_pid)
    sys0 = system_seconds(server.cpu_pid)
    opens0 = tcp_active_opens()
    run = run_wrk(wrk, server, per_request, args, authorization, args.duration)
    opens1 = tcp_active_opens()
    sys1 = system_seconds(server.cpu_pid)
    runq1 = run_queue_wait(server.cpu_pid)
    node_cpu1 = [cpu_seconds(n.proc.pid) for n in nodes]
    run.extra.update(
        round=round_no,
        node_cpu=[b - a for a, b in zip(node_cpu0, node_cpu1, strict=True)],
        runq=runq1 - runq0,
        proxy_sys=sys1 - sys0,
        tcp_opens=opens1 - opens0,
        upstream_conns=upstream_connections(server.cpu_pid, {n.api_port for n in nodes}),
    )
    return run


def gateway_digest() -> str:
    """First 12 hex digits of the SHA-256 of the gateway's source: tells runs apart in a tree with local edits."""
    import threatgate.balancer.gateway as gateway

    with open(gateway.__file__, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:12]


# -- report -------------------------------------------------------------------------------------------

COLUMNS = (
    "round",
    "proxy",
    "obj/req",
    "req/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "max ms",
    "proxy CPU s",
    "proxy µs/req",
    "proxy sys %",
    "proxy runq s",
    "node1 CPU s",
    "node2 CPU s",
    "nodes µs/req",
    "wrk CPU s",
    "machine busy",
    "others",
    "upstream conns",
    "TCP opens",
    "valid",
)


def cells(run: Run) -> list[str]:
    errors = {k: v for k, v in run.errors.items() if v}
    node_cpu = run.extra["node_cpu"]
    return [
        str(run.extra["round"]),
        run.server,
        str(run.per_request),
        f"{run.rps:,.0f}",
        f"{run.p50_ms:.2f}",
        f"{run.p90_ms:.2f}",
        f"{run.p99_ms:.2f}",
        f"{run.max_ms:.1f}",
        f"{run.server_cpu:.2f}",
        f"{run.server_cpu / run.requests * 1e6:.0f}",
        f"{100 * run.extra['proxy_sys'] / run.server_cpu:.0f}" if run.server_cpu > 0 else "-",
        f"{run.extra['runq']:.2f}",
        *(f"{c:.2f}" for c in node_cpu),
        f"{sum(node_cpu) / run.requests * 1e6:.0f}",
        f"{run.wrk_cpu:.2f}",
        f"{run.machine_busy:.2f}",
        f"{max(0.0, run.machine_busy - _path_cost(run) * run.requests / 1e6 / run.duration):.2f}",
        str(run.extra["upstream_conns"]),
        f"{run.extra['tcp_opens']:,}",
        "ok" if run.valid else "INVALID " + ", ".join(f"{k}={v}" for k, v in errors.items()),
    ]


def print_table(runs: list[Run]) -> None:
    print()
    node_throughput.print_table(COLUMNS, [cells(r) for r in runs])


def limits(run: Run) -> str:
    """One line on what bounded ``run``: the machine's cores, the balancer's one thread, or neither."""
    ncpu = os.cpu_count() or 1
    requests = run.requests
    nodes = sum(run.extra["node_cpu"])
    path_us = (run.server_cpu + nodes + run.wrk_cpu) / requests * 1e6
    ours = (run.server_cpu + nodes + run.wrk_cpu) / run.duration
    others = max(0.0, run.machine_busy - ours)
    proxy_share = run.server_cpu / run.duration
    waiting = run.extra["runq"] / run.duration
    line = (
        f"  round {run.extra['round']} {run.server:<8} {run.per_request:>3} obj: CPU per request {path_us:,.0f} µs "
        f"(proxy {run.server_cpu / requests * 1e6:,.0f}, nodes {nodes / requests * 1e6:,.0f}, "
        f"wrk {run.wrk_cpu / requests * 1e6:,.0f}); {ncpu} idle cores would allow {ncpu / path_us * 1e6:,.0f} req/s; "
        f"machine {run.machine_busy:.2f} busy cores, {others:.2f} of them others'; the proxy ran "
        f"{100 * proxy_share:.0f} % and waited for a core {100 * waiting:.0f} % of the run"
    )
    limited = []
    if run.machine_busy > 0.95 * ncpu:
        limited.append(f"the machine's {ncpu} cores (all busy)")
    if run.server == "balancer" and proxy_share + waiting > 0.9:
        limited.append("the balancer's one event-loop thread (running or runnable all the time)")
    return line + (" -> limited by " + " and ".join(limited) if limited else "")


def _per_request(seconds: float, run: Run) -> float:
    return seconds / run.requests * 1e6 if run.requests else float("nan")


def _path_cost(run: Run) -> float:
    """CPU µs per request of the proxy, both nodes and wrk together."""
    return _per_request(run.server_cpu + sum(run.extra["node_cpu"]) + run.wrk_cpu, run)


def ratio_verdicts(runs: list[Run]) -> list[tuple[int, int, float, float]]:
    """(round, objects per request, req/s ratio, p99 ratio) balancer/nginx for every valid pair."""
    by_key = {(r.extra["round"], r.server, r.per_request): r for r in runs}
    out = []
    for (rnd, server, n), bal in sorted(by_key.items()):
        ngx = by_key.get((rnd, "nginx", n))
        if server == "balancer" and ngx and bal.valid and ngx.valid and ngx.rps > 0 and ngx.p99_ms > 0:
            out.append((rnd, n, bal.rps / ngx.rps, bal.p99_ms / ngx.p99_ms))
    return out


def print_report(runs: list[Run], profiles: dict[int, tuple[Run, str]], top: int) -> None:
    print_table(runs)
    print("\nbalancer / nginx:")
    ratios = ratio_verdicts(runs)
    by_key = {(r.extra["round"], r.server, r.per_request): r for r in runs}
    for rnd, n, rps, p99 in ratios:
        bal, ngx = by_key[(rnd, "balancer", n)], by_key[(rnd, "nginx", n)]
        print(
            f"  round {rnd}, {n:>3} object(s)/request: req/s {rps:.3f}, p99 {p99:.2f}x; proxy CPU per request "
            f"{_per_request(bal.server_cpu, bal) / _per_request(ngx.server_cpu, ngx):.1f}x; CPU per request of the "
            f"whole path (proxy + nodes + wrk) nginx/balancer {_path_cost(ngx) / _path_cost(bal):.3f}, which "
            f"req/s follows when the machine's cores are the limit"
        )
    print("\nwhat limits:")
    for run in runs:
        print(limits(run))
    for run in runs:
        for note in run.extra.get("notes", [])[:5]:
            print(f"  balancer log during round {run.extra['round']} {run.server} {run.per_request} obj: {note}")
    print("\ntargets (worst round per size):")
    for n in sorted({n for _, n, _, _ in ratios}):
        mine = [(rps, p99) for _, m, rps, p99 in ratios if m == n]
        rps = min(r for r, _ in mine)
        p99 = max(p for _, p in mine)
        rps_v = (
            f"met ({rps / TARGET_RPS_RATIO:.2f}x the target)"
            if rps >= TARGET_RPS_RATIO
            else f"NOT met ({100 * rps / TARGET_RPS_RATIO:.0f} % of the target, {TARGET_RPS_RATIO / rps:.1f}x short)"
        )
        p99_v = (
            f"met ({TARGET_P99_RATIO / p99:.2f}x headroom)"
            if p99 <= TARGET_P99_RATIO
            else f"NOT met ({p99 / TARGET_P99_RATIO:.1f}x over)"
        )
        print(f"  {n:>3} object(s)/request: throughput {rps:.3f}x nginx, target >= {TARGET_RPS_RATIO}: {rps_v}")
        print(f"  {n:>3} object(s)/request: p99        {p99:.2f}x nginx, target <= {TARGET_P99_RATIO}: {p99_v}")
    for n, (prun, text) in profiles.items():
        print(
            f"\npy-spy of the balancer at {n} object(s)/request ({prun.rps:,.0f} req/s under the profiler, "
            f"balancer {prun.server_cpu / max(1, prun.requests) * 1e6:,.0f} µs CPU per request), top {top}:\n"
        )
        print(text)
    for run in runs:
        if not run.valid:
            print(
                f"INVALID: round {run.extra['round']} {run.server} at {run.per_request} object(s)/request had "
                f"errors {run.errors}" + (f"; first non-200 answer: {run.first_bad}" if run.first_bad else "")
            )


# -- main ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    add_lookup_arguments(parser)
    parser.add_argument("--rounds", type=int, default=1, help="repeat both proxies, order swapped every round")
    parser.add_argument("--profile", action="store_true", help="py-spy the balancer during one more run per size")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs, pins)")
    parser.add_argument("--json", dest="json_out", help="also write the raw results to this file")
    args = parser.parse_args()
    try:
        return bench(args)
    except SetupError as exc:
        print(f"gateway_lookup: set-up failed: {exc}", file=sys.stderr)
        return 2


def bench(args: argparse.Namespace) -> int:
    from threatgate.net.tls import ensure_server_pair

    if not 1 <= args.connections <= SCANNERS:
        raise SetupError(f"--connections must be 1..{SCANNERS} (the nodes' ScannersCount; more would be 429)")
    if args.duration < 1 or args.warmup < 0 or args.timeout < 1 or args.rounds < 1:
        raise SetupError("--duration, --timeout and --rounds must be at least 1, --warmup at least 0")
    if args.threads > args.connections:
        raise SetupError("--threads must not exceed --connections")
    wrk = find_tool("wrk", args.wrk)
    nginx = find_tool("nginx", args.nginx)
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
    hits, misses = value_pools(out, args.seed, min(max(n * c for n, c in counts.items()), 20_000))
    bodies = {n: make_bodies(hits, misses, n, counts[n], args.hit_share, rng) for n in per_requests}

    run_dir = tempfile.mkdtemp(prefix="threatgate-gateway-bench-")
    os.chmod(run_dir, 0o755)  # nginx's worker runs as nobody when started by root
    nodes: list[Node] = []
    balancer: Service | None = None
    nginx_proc: subprocess.Popen[bytes] | None = None
    ok = False
    try:
        password = secrets.token_urlsafe(16)
        authorization = "Basic " + base64.b64encode(f"{USER}:{password}".encode()).decode()
        print(f"starting 2 nodes ({args.indicators:,} indicators each) ...", file=log, flush=True)
        nodes = start_nodes(out, run_dir, 2, password)
        balancer, bal_port, bal_cert = start_balancer(run_dir, nodes)
        print(f"  balancer: API :{bal_port}, both instances UP", file=log, flush=True)

        # Warm-up through the balancer: pins both nodes' certificates; every answer must be 200.
        started = time.monotonic()
        answers = {n: post_all(bal_port, bal_cert, authorization, bodies[n], "the balancer") for n in per_requests}
        pinned = len(re.findall(r"no reference certificate yet", balancer.log_text()))
        if pinned != len(nodes):
            raise SetupError(f"the warm-up pinned {pinned} node certificate(s), expected {len(nodes)}")
        detected = total = 0
        for n in per_requests:
            for answer in answers[n]:
                results = json.loads(answer)
                total += len(results)
                detected += sum(1 for r in results if r["result"] == "detected")
        print(
            f"  warm-up through the balancer: {sum(len(b) for b in bodies.values()):,} requests in "
            f"{time.monotonic() - started:.1f} s, {pinned} pins saved, {detected:,} of {total:,} objects detected",
            file=log,
            flush=True,
        )
        for n in per_requests:
            sample = bodies[n][:CHECKED_ANSWERS]
            if (
                post_all(nodes[0].api_port, nodes[0].cert, authorization, sample, "the node")
                != answers[n][:CHECKED_ANSWERS]
            ):
                raise SetupError(f"the balancer's answers ({n} object(s)) differ from node 1's own answers")

        nginx_dir = os.path.join(run_dir, "nginx")
        os.makedirs(os.path.join(nginx_dir, "tmp"))
        ngx_cert, ngx_key = os.path.join(nginx_dir, "tls", "nginx.pem"), os.path.join(nginx_dir, "tls", "nginx.key")
        ensure_server_pair(ngx_cert, ngx_key, common_name="threatgate bench nginx", hosts=["127.0.0.1", "localhost"])
        os.chmod(os.path.dirname(ngx_cert), 0o755)
        ngx_port = free_port()
        n0 = per_requests[0]
        nginx_proc, ngx_worker, ngx_log, verification = nginx_with_verification(
            nginx,
            nginx_dir,
            ngx_port,
            ngx_cert,
            ngx_key,
            nodes,
            authorization,
            bodies[n0][:CHECKED_ANSWERS],
            answers[n0][:CHECKED_ANSWERS],
        )
        print(f"  nginx: :{ngx_port}, worker {ngx_worker}; {verification}", file=log, flush=True)

        files = {}
        for n in per_requests:
            files[n] = os.path.join(run_dir, f"requests-{n}.txt")
            with open(files[n], "w", encoding="utf-8") as fh:
                fh.writelines(f"{API_PATH} {body}\n" for body in bodies[n])
        servers = {
            "balancer": Server("balancer", f"https://127.0.0.1:{bal_port}", files, balancer.proc, balancer.pid, ""),
            "nginx": Server("nginx", f"https://127.0.0.1:{ngx_port}", files, nginx_proc, ngx_worker, ngx_log),
        }

        runs: list[Run] = []
        offset = len(balancer.log_text())
        for rnd in range(1, args.rounds + 1):
            order = PROXIES if rnd % 2 else tuple(reversed(PROXIES))
            for n in per_requests:
                for name in order:
                    server = servers[name]
                    if args.warmup > 0:
                        run_wrk(wrk, server, n, args, authorization, args.warmup)
                    print(f"round {rnd}: wrk, {name}, {n} object(s)/request, {args.duration} s ...", file=log)
                    _, offset = incidents(balancer.log_path, offset)
                    run = measure(wrk, server, n, args, authorization, nodes, rnd)
                    run.extra["notes"], offset = incidents(balancer.log_path, offset)
                    print(
                        f"  {run.rps:,.0f} req/s, p50 {run.p50_ms:.2f} ms, p99 {run.p99_ms:.2f} ms, "
                        f"proxy CPU {run.server_cpu:.2f} s, nodes {sum(run.extra['node_cpu']):.2f} s"
                        + ("" if run.valid else f"  INVALID {run.errors} {run.first_bad}"),
                        file=log,
                        flush=True,
                    )
                    runs.append(run)
                    balancer.check_alive()
                    for node in nodes:
                        if node.proc.poll() is not None:
                            raise SetupError(f"{node.name} exited with {node.proc.returncode}:\n{tail(node.log_path)}")
                    if nginx_proc.poll() is not None:
                        raise SetupError(f"nginx exited with {nginx_proc.returncode}:\n{tail(ngx_log)}")

        profiles: dict[int, tuple[Run, str]] = {}
        if py_spy:
            for n in per_requests:
                print(f"py-spy: balancer, {n} object(s)/request, {args.duration} s ...", file=log, flush=True)
                prun, text = profile_run(py_spy, wrk, servers["balancer"], n, args, authorization, run_dir)
                print(f"  {prun.rps:,.0f} req/s under the profiler", file=log, flush=True)
                profiles[n] = (prun, text)

        versions = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=10).stderr.strip()
        print(
            f"\ncode {node_throughput.code_version()} (gateway.py {gateway_digest()}), "
            f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
            f"{versions.replace('nginx version: ', '')}; {args.indicators:,} indicators, 2 nodes (ScannersCount "
            f"{SCANNERS}); wrk -t{args.threads} -c{args.connections} -d{args.duration}s --latency, keep-alive TLS; "
            f"{100 * detected / total:.1f} % of objects detected"
        )
        print(f"nginx upstream TLS: {verification}")
        print_report(runs, profiles, args.top)
        if args.json_out:
            with open(args.json_out, "w", encoding="utf-8") as fh:
                raw = [{**r.__dict__, "extra": {k: v for k, v in r.extra.items() if k != "wrk_output"}} for r in runs]
                json.dump(
                    {
                        "runs": raw,
                        "ratios": ratio_verdicts(runs),
                        "nginx_verification": verification,
                        "profiles": {n: text for n, (_, text) in profiles.items()},
                    },
                    fh,
                    indent=1,
                )
        ok = True
        return 0 if all(r.valid for r in runs) else 1
    finally:
        stop_group(nginx_proc)
        if balancer is not None:
            stop_group(balancer.proc)
        for node in nodes:
            stop_group(node.proc)
        if args.keep or not ok:
            print(f"kept {run_dir}", file=sys.stderr)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
