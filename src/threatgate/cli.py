"""The ``threatgate`` command line.  Config code raises ConfigError; only this module picks exit codes.

Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from threatgate._version import __version__
from threatgate.errors import ClusterError, ConfigError, DrillError, FileWriteError, ThreatgateError, TLSConfigError
from threatgate.fs import os_reason
from threatgate.log import LEVEL_NAMES, setup_logging

if TYPE_CHECKING:
    from threatgate.config.balancer import BalancerConfig

EXIT_CONFIG = 2
T = TypeVar("T")

LOG_LEVEL = click.Choice(LEVEL_NAMES, case_sensitive=False)
LOG_LEVEL_HELP = "Lowest level logged; lines show it as ERR, WAR, INF or DBG."

USER_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}\Z")
"""Allowed REST API user names (the same rule as the config loader's)."""


@click.group()
@click.version_option(__version__, prog_name="threatgate")
def main() -> None:
    """threatgate: high-availability threat-intelligence matching for SIEM event streams."""


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Node config (XML).")
@click.option("--log-level", default="inf", show_default=True, type=LOG_LEVEL, help=LOG_LEVEL_HELP)
def node(config_path: str, log_level: str) -> None:
    """Run a matching node (CyberTrace-compatible event input)."""
    from threatgate.config.node import load_node_config
    from threatgate.node.app import run_node
    from threatgate.node.engine import engine_choice

    try:
        engine_choice()
    except ValueError as exc:
        click.echo(f"threatgate: {exc}", err=True)
        sys.exit(2)
    _run_service("node", load_node_config, run_node, config_path, log_level)


@main.group(invoke_without_command=True)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Balancer config (kl_balancer.conf).")
@click.option("--log-level", default="inf", show_default=True, type=LOG_LEVEL, help=LOG_LEVEL_HELP)
@click.pass_context
def balancer(ctx: click.Context, config_path: str | None, log_level: str) -> None:
    """Run the High Availability balancer in front of nodes (or one of its subcommands)."""
    if ctx.invoked_subcommand is not None:
        return
    if config_path is None:
        raise click.UsageError("--config is required to run the balancer")
    from threatgate.balancer.app import run_balancer
    from threatgate.config.balancer import load_balancer_config

    _run_service("balancer", load_balancer_config, run_balancer, config_path, log_level)


def _run_service(what: str, load: Callable[[str], T], run: Callable[[T], None], path: str, log_level: str) -> None:
    """Load a config (exit 2 when invalid) and run the service until it stops (exit 1 on failure)."""
    setup_logging(log_level)
    try:
        config = load(path)
    except ConfigError as exc:
        click.echo(f"threatgate: invalid configuration: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    try:
        run(config)
    except TLSConfigError as exc:
        click.echo(f"threatgate: cannot start: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    except ClusterError as exc:
        click.echo(f"threatgate: cluster: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    except (OSError, sqlite3.Error) as exc:
        from threatgate.net.describe import describe

        click.echo(f"threatgate: {what} failed: {describe(exc)}", err=True)
        sys.exit(1)


def _balancer_config(config_path: str) -> BalancerConfig:
    from threatgate.config.balancer import load_balancer_config

    try:
        return load_balancer_config(config_path)
    except ConfigError as exc:
        click.echo(f"threatgate: invalid configuration: {exc}", err=True)
        sys.exit(EXIT_CONFIG)


@balancer.command("verify")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Balancer config.")
@click.option("--user", help="REST API user on the nodes (else THREATGATE_USER).", envvar="THREATGATE_USER")
@click.option(
    "--password-stdin", is_flag=True, help="Read the password from stdin (else THREATGATE_PASSWORD or a prompt)."
)
def balancer_verify(config_path: str, user: str | None, password_stdin: bool) -> None:
    """Check each enabled node's certificate pin and REST API (GET suppliers through the gateway's path)."""
    import asyncio

    from threatgate.balancer.verify import verify

    config = _balancer_config(config_path)
    password = None
    if user is not None:
        if password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = os.environ.get("THREATGATE_PASSWORD") or click.prompt("password", hide_input=True)
    setup_logging("err")
    verdicts = asyncio.run(verify(config, user, password))
    for v in verdicts:
        head = "OK  " if v.ok else "FAIL"
        click.echo(f"{head} {v.instance}  HTTP {v.status or '-'}  pin {v.pin or '(none)'}  {v.pin_path}")
        if v.ok:
            click.echo(f"     suppliers: {', '.join(v.suppliers) or '(none)'}")
        else:
            click.echo(f"     {v.problem}")
    if not verdicts:
        click.echo("no enabled instance in the configuration", err=True)
    sys.exit(0 if verdicts and all(v.ok for v in verdicts) else 1)


@balancer.command("pins")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Balancer config.")
@click.option("--check", is_flag=True, help="Also connect to each node and compare what it presents now.")
@click.option("--renew", "renew_instance", metavar="INSTANCE", help="Replace this instance's pin (host:matching_port).")
@click.option(
    "--expect",
    metavar="FINGERPRINT",
    help="With --renew: the SHA-256 the node must present (confirmed out of band); else you are asked.",
)
def balancer_pins(config_path: str, check: bool, renew_instance: str | None, expect: str | None) -> None:
    """List pinned node certificates with fingerprints, or renew one after confirming the new certificate.

    --renew shows the pinned and the presented fingerprints and replaces the pin only when the presented
    one equals --expect, or, without --expect, when you confirm it at the terminal.  Without a terminal
    and without --expect nothing is replaced (exit 2): a pin must never follow whatever answers.
    """
    import asyncio

    from threatgate.balancer.verify import pin_rows

    config = _balancer_config(config_path)
    if renew_instance is not None:
        _renew_pin(config, renew_instance, expect)
        return
    if expect is not None:
        raise click.UsageError("--expect goes with --renew")
    rows = asyncio.run(pin_rows(config, probe=check))
    bad = False
    for row in rows:
        line = f"{row.instance}  {row.state:<8}  {row.fingerprint or '-'}  {row.path}"
        if check:
            line += f"  presented {row.presented}"
        bad = bad or row.state in ("MISMATCH",) or row.state.startswith("unreadable")
        click.echo(line)
    sys.exit(1 if bad else 0)


def _renew_pin(config: BalancerConfig, instance: str, expect: str | None) -> None:
    """``pins --renew``: fetch what the node presents, show it beside the pin, replace it once confirmed."""
    import asyncio

    from threatgate.balancer.verify import Renewal, decide_renewal, fingerprint_text, presented, save_pin
    from threatgate.net.describe import describe

    wanted = None
    if expect is not None:
        wanted = fingerprint_text(expect)
        if wanted is None:
            raise click.BadParameter(
                "expected a SHA-256 fingerprint: 64 hex digits, e.g. AB:CD:...", param_hint="--expect"
            )
    try:
        shown = asyncio.run(presented(config, instance))
    except KeyError as exc:
        click.echo(f"threatgate: {exc.args[0]}", err=True)
        sys.exit(EXIT_CONFIG)
    except (OSError, TimeoutError) as exc:
        click.echo(f"threatgate: cannot reach {instance}: {describe(exc)}", err=True)
        sys.exit(1)
    key = shown.settings.key
    click.echo(f"pin file:  {shown.path}")
    click.echo(f"pinned:    {shown.old or '(none)'}")
    click.echo(f"presented: {shown.new}")
    decision = decide_renewal(shown.old, shown.new, wanted, sys.stdin.isatty())
    if decision is Renewal.NOTHING:
        click.echo(f"{key} presents its pinned certificate: nothing to renew")
        return
    if decision is Renewal.REFUSE_OTHER:
        click.echo(
            f"threatgate: {key} presents {shown.new}, not the expected {wanted}: pin not renewed "
            "(check the node's certificate; someone may be in between)",
            err=True,
        )
        sys.exit(1)
    if decision is Renewal.REFUSE_UNCONFIRMED:
        click.echo(
            f"threatgate: pin not renewed: confirm {key}'s new fingerprint out of band (on the node: openssl x509 "
            "-in CERT -noout -fingerprint -sha256) and run again with --expect FINGERPRINT, or run at a terminal "
            "to be asked",
            err=True,
        )
        sys.exit(EXIT_CONFIG)
    if decision is Renewal.ASK and not click.confirm(
        f"Replace the pin of {key} with the presented certificate?", default=False
    ):
        click.echo("pin not renewed", err=True)
        sys.exit(1)
    try:
        path = save_pin(config, shown)
    except FileWriteError as exc:  # the pin cannot be written (CertDirPath)
        click.echo(f"threatgate: {exc}", err=True)
        sys.exit(1)
    click.echo(f"renewed {path}: {shown.old or '(none)'} -> {shown.new}")


@balancer.command("status")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Balancer config.")
@click.option("--json", "as_json", is_flag=True, help="Print every instance's readiness as JSON.")
def balancer_status(config_path: str, as_json: bool) -> None:
    """Each instance's readiness, cluster role, settings revision and digest; '!' marks a differing digest.

    With the balancer running, a BALANCER column shows its state of each instance (UP, DOWN, DRAIN, MAINT
    and why, e.g. a run-time drain). Exit 0 when every instance answered and the digests agree, 1 otherwise,
    2 on a configuration error.
    """
    import asyncio

    from threatgate.balancer import admin, status

    config = _balancer_config(config_path)
    setup_logging("err")
    views = asyncio.run(status.collect(config))
    running: dict[str, str] | None = None
    if config.admin_socket is not None:
        try:  # what the running balancer does with each instance (a run-time drain or disable shows here)
            running = status.balancer_states(admin.request(config.admin_socket, "list", timeout=3.0)["instances"])
        except (OSError, ValueError, KeyError):
            running = None  # no balancer running with this config: the nodes' own answers only
    if as_json:
        _echo_json(status.as_json(views, running))
    else:
        click.echo(status.render(views, running))
    for view in views:
        if view.pin_mismatch:
            click.echo(
                f"threatgate: {view.key}: the node's certificate does not match the balancer's pin, so nothing was "
                f"sent to it ({view.error}); if it was renewed on purpose: threatgate balancer pins --renew {view.key}",
                err=True,
            )
    sys.exit(status.exit_code(views))


@balancer.group("instance")
def balancer_instance() -> None:
    """Run-time control of a running balancer's instances (its admin socket): list, disable, enable, drain.

    A change holds until the balancer's next SIGHUP (the configuration's enabled= applies again) or restart.
    """


def _admin(config_path: str, command: str, instance: str | None, as_json: bool) -> None:
    from threatgate.balancer import admin

    config = _balancer_config(config_path)
    if config.admin_socket is None:
        click.echo(f'threatgate: {config_path} has <AdminSocket enabled="false">: no run-time control', err=True)
        sys.exit(EXIT_CONFIG)
    try:
        reply = admin.request(config.admin_socket, command, instance)
    except (OSError, ValueError) as exc:
        from threatgate.net.describe import describe

        reason = describe(exc) if isinstance(exc, OSError) else str(exc)
        click.echo(f"threatgate: no answer from the balancer's admin socket {config.admin_socket}: {reason}", err=True)
        sys.exit(1)
    if not reply.get("ok"):
        click.echo(f"threatgate: the balancer refused: {reply.get('error')}", err=True)
        sys.exit(1)
    rows = reply.get("instances", [])
    if as_json:
        _echo_json(reply)
    elif instance is None:
        click.echo(admin.render(rows))
    else:
        for row in rows:
            if row["instance"] == instance:
                why = f" ({row['why']})" if row["why"] else ""
                click.echo(f"{instance}: {row['state']}{why}")


_ADMIN_CONFIG = click.option(
    "--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Balancer config."
)
_ADMIN_JSON = click.option("--json", "as_json", is_flag=True, help="Print the balancer's answer as JSON.")


@balancer_instance.command("list")
@_ADMIN_CONFIG
@_ADMIN_JSON
def balancer_instance_list(config_path: str, as_json: bool) -> None:
    """Every instance: state (UP, DOWN, DRAIN, MAINT) and why, lanes, events in flight and counts."""
    _admin(config_path, "list", None, as_json)


def _instance_change(command: str, help_text: str) -> None:
    """``threatgate balancer instance COMMAND ADDRESS:PORT``: one of the changes the admin socket takes."""

    @balancer_instance.command(command, help=help_text)
    @click.argument("instance")
    @_ADMIN_CONFIG
    @_ADMIN_JSON
    def change(instance: str, config_path: str, as_json: bool) -> None:
        _admin(config_path, command, instance, as_json)


_instance_change("disable", "MAINT at once: its connections close and the events it owes are sent to the others.")
_instance_change("drain", "DRAIN: no new events; the events in flight are answered there; then MAINT.")
_instance_change("enable", "Out of MAINT (UP after its health checks pass) or out of DRAIN (UP at once).")


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Balancer config.")
@click.option("--canary", "canary_file", type=click.Path(dir_okay=False), help="Canary events (JSON lines).")
@click.option("--stop-command", help="Takes an instance out instead of drain ({instance}, {host}, {port}).")
@click.option("--start-command", help="Brings it back instead of enable (same placeholders).")
@click.option("--user", help="REST API user for the lookups (else THREATGATE_USER).", envvar="THREATGATE_USER")
@click.option(
    "--password-stdin", is_flag=True, help="Read the password from stdin (else THREATGATE_PASSWORD or a prompt)."
)
@click.option("--no-rest", is_flag=True, help="No REST lookups through the gateway.")
@click.option("--matching-port", type=click.IntRange(1, 65535), help="The balancer's event port (config says 0).")
@click.option("--api-port", type=click.IntRange(1, 65535), help="The balancer's REST port (config says 0).")
@click.option("--rate", default=50.0, show_default=True, type=click.FloatRange(1, 10_000), help="Canary events/s.")
@click.option(
    "--hold", default=3.0, show_default=True, type=click.FloatRange(0, 3600), help="Seconds each instance stays out."
)
@click.option(
    "--step-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(1, 3600),
    help="Seconds each wait may take: seen out, answers in, a command.",
)
@click.option(
    "--up-timeout", default=60.0, show_default=True, type=click.FloatRange(1, 3600), help="Seconds to be UP again."
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def drill(
    config_path: str,
    canary_file: str | None,
    stop_command: str | None,
    start_command: str | None,
    user: str | None,
    password_stdin: bool,
    no_rest: bool,
    matching_port: int | None,
    api_port: int | None,
    rate: float,
    hold: float,
    step_timeout: float,
    up_timeout: float,
    as_json: bool,
) -> None:
    """Failover drill: take each enabled instance out in turn under canary traffic, check nothing is lost.

    Exit status 0 when every step passed, 1 on any failure (one FAIL line says which instance and
    what), 2 for unusable options or configuration.  Ctrl-C brings the instance out back.
    """
    from threatgate.balancer import drill as edge
    from threatgate.lb.drill import as_json as drill_json
    from threatgate.lb.drill import render

    config = _balancer_config(config_path)
    password = None
    if user is not None and not no_rest:
        if password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = os.environ.get("THREATGATE_PASSWORD") or click.prompt("password", hide_input=True, err=True)
    try:
        options = edge.build_options(
            config,
            canary_file=canary_file,
            stop_command=stop_command,
            start_command=start_command,
            user=user,
            password=password,
            rest=not no_rest,
            matching_port=matching_port,
            api_port=api_port,
            rate=rate,
            hold=hold,
            step_timeout=step_timeout,
            up_timeout=up_timeout,
        )
    except DrillError as exc:
        click.echo(f"threatgate: drill: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    setup_logging("err")
    try:
        results, problems = asyncio.run(edge.run_drill(options, lambda text: click.echo(text, err=True)))
    except KeyboardInterrupt:
        click.echo("threatgate: drill: interrupted (the instance out, if any, was brought back first)", err=True)
        sys.exit(1)
    if as_json:
        _echo_json(drill_json(results, problems))
    else:
        if results:
            click.echo(render(results))
        for problem in problems:
            click.echo(f"FAIL drill: {problem}")
    ok = bool(results) and all(r.ok for r in results) and not problems
    sys.exit(0 if ok else 1)


@main.command()
@click.argument("path", type=click.Path(dir_okay=False))
def validate(path: str) -> None:
    """Check a configuration file; print a one-line summary, or file:line and the problem.

    A valid file may still draw warnings on stderr (exit status 0): settings that lose data as written.
    For a node, every enabled feed is also loaded: one that does not load is an error, malformed
    records are a warning.  Every TLS certificate and key in use is checked (readable, PEM, the key
    matches, valid now; a key readable by others or an expiry within 30 days is a warning), and each
    listening port is listed with what it speaks, its certificate and the sources it lets in.
    """
    from threatgate.config.balancer import balancer_config_from_xml
    from threatgate.config.node import node_config_from_xml
    from threatgate.config.xml import read_xml
    from threatgate.net.tlscheck import balancer_report, node_report
    from threatgate.node.feeds import check_feed_files

    warnings: list[str] = []
    feed_errors: list[str] = []
    try:
        root = read_xml(path)
        if root.tag == "Configuration":
            node_config = node_config_from_xml(root)
            summary = node_config.summary()
            feed_errors, feed_warnings = check_feed_files(node_config)
            for line in feed_warnings + feed_errors:
                click.echo(line, err=True)
            tls = node_report(node_config)
        elif root.tag == "Config":
            balancer = balancer_config_from_xml(root)
            summary, warnings = balancer.summary(), balancer.warnings()
            tls = balancer_report(balancer)
        else:
            raise root.error("unknown root element: expected <Configuration> (node) or <Config> (balancer)")
    except ConfigError as exc:
        click.echo(f"{exc}", err=True)
        sys.exit(EXIT_CONFIG)
    for error in tls.errors:
        click.echo(f"{path}: error: {error}", err=True)
    if feed_errors or tls.errors:
        sys.exit(EXIT_CONFIG)
    for warning in [*warnings, *tls.warnings]:
        click.echo(f"{path}: warning: {warning}", err=True)
    click.echo(summary)
    for line in tls.ports:
        click.echo(f"  {line}")


@main.group()
def feeds() -> None:
    """Feed utilities."""


@feeds.command("generate")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory to write into.")
@click.option("--indicators", default=10_000, show_default=True, type=click.IntRange(1, 100_000_000))
@click.option("--events", default=10_000, show_default=True, type=click.IntRange(0, 100_000_000))
@click.option(
    "--hit-rate", default=0.05, show_default=True, type=click.FloatRange(0, 1), help="Share of events that detect."
)
@click.option("--seed", default=1, show_default=True, type=int)
@click.option("--port", default=9999, show_default=True, type=click.IntRange(1, 65535), help="Event port in node.conf.")
def feeds_generate(out_dir: str, indicators: int, events: int, hit_rate: float, seed: int, port: int) -> None:
    """Write deterministic synthetic feeds, matching sample events and a node.conf using them."""
    from threatgate.node.generate import generate

    summary = generate(out_dir, indicators=indicators, events=events, hit_rate=hit_rate, seed=seed, port=port)
    click.echo(summary)


@main.command()
@click.option("--workdir", default=".demo", show_default=True, type=click.Path(file_okay=False))
def demo(workdir: str) -> None:
    """A balancer in front of a 2-node cluster: a settings change, the Control killed mid-stream, a promotion."""
    from threatgate.demo import run_demo

    setup_logging("err")
    try:
        sys.exit(run_demo(workdir))
    except ThreatgateError as exc:
        click.echo(f"threatgate demo: {exc}", err=True)
        sys.exit(1)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="overwrite files that already exist there")
def examples(directory: str, force: bool) -> None:
    """Write the example configs, feeds and events into DIRECTORY (what the README's examples use)."""
    from threatgate.demo import EXAMPLES

    target = Path(directory)
    sources = sorted(p for p in EXAMPLES.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    clashes = [target / p.relative_to(EXAMPLES) for p in sources if (target / p.relative_to(EXAMPLES)).exists()]
    if clashes and not force:
        shown = ", ".join(str(c) for c in clashes[:3])
        click.echo(
            f"threatgate examples: {shown} already exist{'s' if len(clashes) == 1 else ''}; nothing written "
            "(--force overwrites)",
            err=True,
        )
        sys.exit(EXIT_CONFIG)
    for source in sources:
        dest = target / source.relative_to(EXAMPLES)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
    click.echo(f"wrote {len(sources)} files to {target}: node.conf, balancer.conf, events.txt, feeds/")
    click.echo(f"next: threatgate validate {target / 'node.conf'}")


# -- users ---------------------------------------------------------------------------------------------


@main.group()
def users() -> None:
    """Users of a node's REST API (<HTTPServer><Users>) or a balancer's console (<Users>): scrypt hashes.

    A cluster member's users are cluster settings: use `threatgate cluster users` there.
    """


def _cluster_users_command(verb: str, config_path: str, name: str | None) -> str:
    return f"threatgate cluster users {verb} --config {config_path}" + (f" {name}" if name else "")


def _check_user_name(name: str) -> None:
    if not USER_NAME.match(name):
        raise click.BadParameter(f"{name!r}: expected 1-64 of A-Z a-z 0-9 _ . @ -", param_hint="NAME")


def _file_op(config_path: str, edit: Callable[[], T]) -> T:
    """Run a file edit of ``threatgate.config.users``; exit 2 on a config problem, 1 when it cannot be written."""
    try:
        return edit()
    except ConfigError as exc:
        click.echo(f"threatgate: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    except FileWriteError as exc:
        click.echo(f"threatgate: cannot write {config_path}: {exc.reason}", err=True)
        sys.exit(1)
    except OSError as exc:  # the file cannot be read (or stat'ed) to be edited
        click.echo(f"threatgate: cannot write {config_path}: {os_reason(exc)}", err=True)
        sys.exit(1)


@users.command("add")
@click.option(
    "--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Node or balancer config (XML)."
)
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin, not a prompt.")
@click.argument("name")
def users_add(config_path: str, password_stdin: bool, name: str) -> None:
    """Add user NAME to the node config, or set a new password for it.

    The file is edited as text so that comments and layout survive, then checked and replaced
    atomically.  A running node notices the change and uses the new users at once: no reload needed;
    a running balancer (its console users) after a reload (SIGHUP).
    Refused on a cluster member (its users are cluster settings: threatgate cluster users add).
    """
    from threatgate.config.users import BALANCER_ROOT, refuse_cluster_member, store_user
    from threatgate.config.xml import read_xml
    from threatgate.node.auth import hash_password

    _check_user_name(name)
    command = _cluster_users_command("add", config_path, name)
    root = _file_op(config_path, lambda: read_xml(config_path))
    _file_op(config_path, lambda: refuse_cluster_member(root, config_path, command))
    password = _read_password(from_stdin=password_stdin)  # only once the edit can take effect
    updated = _file_op(config_path, lambda: store_user(config_path, name, hash_password(password), command))
    taken = (
        "a running balancer's console uses it after a reload (systemctl reload, or SIGHUP)"
        if root.tag == BALANCER_ROOT
        else "a running node uses it at once (it re-reads its users when the file changes, no reload needed)"
    )
    click.echo(f"user {name} {'updated in' if updated else 'added to'} {config_path}; {taken}")


@users.command("remove")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Node config (XML).")
@click.argument("name")
def users_remove(config_path: str, name: str) -> None:
    """Remove user NAME from the node config (a running node refuses it within a second, no reload needed)."""
    from threatgate.config.users import drop_user

    command = _cluster_users_command("remove", config_path, name)
    _file_op(config_path, lambda: drop_user(config_path, name, command))
    click.echo(f"user {name} removed from {config_path}; a running node refuses it within a second (no reload needed)")


@users.command("list")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Node config (XML).")
def users_list(config_path: str) -> None:
    """Print the user names of the node config, one per line."""
    from threatgate.config.users import file_users, refuse_cluster_member
    from threatgate.config.xml import read_xml

    def names() -> list[str]:
        root = read_xml(config_path)
        refuse_cluster_member(root, config_path, _cluster_users_command("list", config_path, None), edit=False)
        return file_users(root)

    found = _file_op(config_path, names)
    for name in found:
        click.echo(name)
    if not found:
        click.echo(f"threatgate: no user in {config_path}: every API request gets 401 (threatgate users add)", err=True)


@users.command("hash")
def users_hash() -> None:
    """Print a password hash for the password on stdin's first line (for config management tools)."""
    from threatgate.node.auth import hash_password

    click.echo(hash_password(_read_password(from_stdin=not sys.stdin.isatty())))


def _read_password(*, from_stdin: bool) -> str:
    """The password from stdin's first line (without its line ending) or from a hidden, confirmed prompt."""
    if from_stdin:
        line = sys.stdin.readline()
        password = line.removesuffix("\n").removesuffix("\r")
    else:
        password = str(click.prompt("Password", hide_input=True, confirmation_prompt=True, err=True))
    if not password:
        raise click.UsageError("empty password refused")
    return password


# -- cluster ------------------------------------------------------------------------------------------

_CONFIG_OPTION = click.option(
    "--config", "config_path", required=True, type=click.Path(dir_okay=False), help="This node's config (XML)."
)
_BASE_OPTION = click.option(
    "--base", type=int, default=None, help="Revision the change starts from; refused (409) if no longer current."
)


@main.group()
def cluster() -> None:
    """Control/Secondary cluster: membership, roles and settings (docs/cluster.md)."""


def _cluster_call(config_path: str, method: str, path: str, body: object = None) -> Any:
    from threatgate.cluster.admin import LocalNode
    from threatgate.config.node import load_node_config

    try:
        return LocalNode(load_node_config(config_path)).run(method, path, body)
    except ConfigError as exc:
        click.echo(f"threatgate: invalid configuration: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    except ClusterError as exc:
        click.echo(f"threatgate: cluster: {exc}", err=True)
        sys.exit(EXIT_CONFIG if exc.status < 500 else 1)


def _echo_json(value: object) -> None:
    click.echo(json.dumps(value, indent=1, ensure_ascii=False))


@cluster.command("init")
@_CONFIG_OPTION
@click.option("--cluster-id", help="A name for the new cluster (default: random).")
@click.option("--advertise", help="host:port other nodes reach this node's cluster port on (default: its listen).")
def cluster_init(config_path: str, cluster_id: str | None, advertise: str | None) -> None:
    """Make this node the Control node of a new cluster (before starting it)."""
    from threatgate.cluster import admin
    from threatgate.config.node import load_node_config

    try:
        identity = admin.init(load_node_config(config_path), cluster_id, advertise)
    except (ConfigError, ClusterError, TLSConfigError) as exc:
        click.echo(f"threatgate: cluster init: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    click.echo(f"cluster {identity.cluster_id} created; this node is its Control at {identity.address}")
    click.echo(f"node id (certificate SHA-256 fingerprint): {identity.node_id}")


@cluster.command("join")
@_CONFIG_OPTION
@click.option("--control", required=True, help="host:port of the Control node's cluster port.")
@click.option(
    "--token", required=True, envvar="THREATGATE_JOIN_TOKEN", help="One-time token (threatgate cluster token)."
)
@click.option("--fingerprint", required=True, help="The Control's certificate SHA-256 fingerprint, as it printed it.")
@click.option("--advertise", help="host:port other nodes reach this node's cluster port on (default: its listen).")
def cluster_join(config_path: str, control: str, token: str, fingerprint: str, advertise: str | None) -> None:
    """Join a cluster as a Secondary (before starting this node); receives the full settings."""
    from threatgate.cluster import admin
    from threatgate.config.node import load_node_config

    try:
        identity = asyncio.run(admin.join(load_node_config(config_path), control, token, fingerprint, advertise))
    except (ConfigError, ClusterError, TLSConfigError) as exc:
        click.echo(f"threatgate: cluster join: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    click.echo(f"joined cluster {identity.cluster_id} as a Secondary at {identity.address}; start the node now")


@cluster.command("token")
@_CONFIG_OPTION
@click.option("--ttl", default=600, show_default=True, type=click.IntRange(1, 86400), help="Seconds it stays valid.")
def cluster_token(config_path: str, ttl: int) -> None:
    """Issue a one-time join token on the Control node."""
    answer = _cluster_call(config_path, "POST", "/cluster/v1/admin/token", {"ttl": ttl})
    click.echo(f"token:       {answer['token']}")
    click.echo(f"control:     {answer['control']}")
    click.echo(f"fingerprint: {answer['fingerprint']}")
    click.echo(f"valid for {ttl} s, once.  On the new node:")
    click.echo(
        f"  threatgate cluster join --config NODE.conf --control {answer['control']} "
        f"--fingerprint {answer['fingerprint']} --token <token>"
    )


@cluster.command("status")
@_CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the raw node table as JSON.")
def cluster_status(config_path: str, as_json: bool) -> None:
    """Print the node table: role, Control, synchronized and applied revisions, connection state."""
    from threatgate.cluster.admin import status_table

    table = _cluster_call(config_path, "GET", "/cluster/v1/status")
    if as_json:
        _echo_json(table)
    else:
        click.echo(status_table(table))


@cluster.command("promote")
@_CONFIG_OPTION
def cluster_promote(config_path: str) -> None:
    """Make this node the Control node (bumps the epoch; the old Control steps down when it returns)."""
    answer = _cluster_call(config_path, "POST", "/cluster/v1/admin/promote", {})
    s = answer["settings"]
    click.echo(f"this node is the Control node now: epoch {s['epoch']}, settings revision {s['revision']}")


@cluster.command("demote")
@_CONFIG_OPTION
def cluster_demote(config_path: str) -> None:
    """Give up the Control role (settings are frozen until another node is promoted)."""
    _cluster_call(config_path, "POST", "/cluster/v1/admin/demote", {})
    click.echo("this node is a Secondary now; promote another node to manage settings")


@cluster.command("remove")
@_CONFIG_OPTION
@click.argument("node")
def cluster_remove(config_path: str, node: str) -> None:
    """Remove a member (by address or node id) on the Control; a Control node must be demoted first."""
    answer = _cluster_call(config_path, "POST", "/cluster/v1/admin/remove", {"node": node})
    click.echo(f"removed {answer['removed']} ({answer['node_id']})")


@cluster.group("settings")
def cluster_settings() -> None:
    """Read and change the cluster's settings (changes only on the Control node)."""


@cluster_settings.command("get")
@_CONFIG_OPTION
@click.option("--xml", "as_xml", is_flag=True, help="Print only the <Settings> XML.")
def settings_get(config_path: str, as_xml: bool) -> None:
    """Print the applied settings document."""
    answer = _cluster_call(config_path, "GET", "/cluster/v1/settings?since=0")
    if answer is None:
        click.echo("threatgate: cluster: this node holds no settings yet", err=True)
        sys.exit(1)
    click.echo(answer["settings"]["payload"]["config"] if as_xml else json.dumps(answer["settings"], indent=1))


@cluster_settings.command("history")
@_CONFIG_OPTION
def settings_history(config_path: str) -> None:
    """List the revisions kept on this node."""
    from threatgate.cluster.admin import _when

    for rev in _cluster_call(config_path, "GET", "/cluster/v1/history"):
        if "error" in rev:
            click.echo(f"r{rev['revision']}  {rev['error']}")
        else:
            click.echo(f"r{rev['revision']}  epoch {rev['epoch']}  {_when(rev['updated_at'])}  {rev['sha256']}")


def _committed(answer: dict[str, Any]) -> None:
    s = answer["settings"]
    click.echo(f"settings revision {s['revision']} (epoch {s['epoch']}, sha256 {s['sha256']})")


@cluster_settings.command("set")
@_CONFIG_OPTION
@_BASE_OPTION
@click.argument("path")
@click.argument("value")
def settings_set(config_path: str, base: int | None, path: str, value: str) -> None:
    """Set one value: PATH like OutputSettings/EventFormat or Feeds/Feed[@filename=x.json]/@enabled."""
    _committed(
        _cluster_call(config_path, "POST", "/cluster/v1/admin/set", {"base": base, "path": path, "value": value})
    )


@cluster_settings.command("import")
@_CONFIG_OPTION
@_BASE_OPTION
@click.option("--yes", is_flag=True, help="Also replace or remove what the diff marks with '-'.")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
def settings_import(config_path: str, base: int | None, yes: bool, source: str) -> None:
    """Import the shared settings of SOURCE (a node config, or a <Settings> file); print the diff first.

    Each shared element SOURCE holds replaces the cluster's whole; the others stay as they are.  An
    import that only adds is applied; one that would replace or remove anything (the diff's '-'
    lines: perhaps changes made since with `settings set` or `cluster users`) needs --yes.  Exit 0:
    applied or nothing to change; 1: refused for want of --yes, nothing changed; 2: invalid.
    """
    from threatgate.cluster.settings import extract_settings, removed_lines
    from threatgate.config.xml import read_xml

    try:
        root = read_xml(source)
        if root.tag == "Configuration":
            text = extract_settings(root, complete=False)  # no <Users> in the file: keep the cluster's
        else:
            with open(source, encoding="utf-8") as fh:
                text = fh.read()
    except ConfigError as exc:
        click.echo(f"threatgate: cannot import {source}: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    except (OSError, UnicodeDecodeError) as exc:
        from threatgate.net.describe import describe

        click.echo(f"threatgate: cannot import {source}: {describe(exc)}", err=True)
        sys.exit(EXIT_CONFIG)
    body = {"base": base, "config": text, "source": source}
    preview = _cluster_call(config_path, "POST", "/cluster/v1/admin/import", {**body, "dry_run": True})
    diff, current = preview["diff"], preview["settings"]["revision"]
    if not diff:
        click.echo(f"nothing to change: settings revision {current} already holds what {source} sets")
        return
    click.echo("\n".join(diff))
    lost = removed_lines(diff)
    if lost and not yes:
        click.echo(
            f"threatgate: settings not changed: importing {source} would replace or remove {lost} line(s) of "
            f"settings revision {current} (marked - above), perhaps changes made since with `settings set` or "
            "`cluster users`; check them, then run again with --yes (or edit the file)",
            err=True,
        )
        sys.exit(1)
    # Based on the revision the diff was made against: if it changed meanwhile, refused (409), not merged blind.
    _committed(
        _cluster_call(config_path, "POST", "/cluster/v1/admin/import", {**body, "base": current, "replace": True})
    )


@cluster_settings.command("rollback")
@_CONFIG_OPTION
@_BASE_OPTION
@click.argument("revision", type=int)
def settings_rollback(config_path: str, base: int | None, revision: int) -> None:
    """Re-apply a kept revision's settings as a new revision."""
    body = {"base": base, "revision": revision}
    _committed(_cluster_call(config_path, "POST", "/cluster/v1/admin/rollback", body))


# -- cluster users ----------------------------------------------------------------------------------------


@cluster.group("users")
def cluster_users() -> None:
    """API users of every node (cluster settings: changed on the Control node, listed on any)."""


def _require_control(config_path: str, what: str) -> None:
    """Exit 2 naming the Control unless this node is the Control (before asking for a password)."""
    me = _cluster_call(config_path, "GET", "/cluster/v1/status")["self"]
    if me.get("role") != "control":
        where = me.get("control_address")
        click.echo(
            f"threatgate: cluster: cannot {what}: this node is a Secondary; settings change only on the Control"
            + (f" (the Control node is {where}): run the command there, with that node's config" if where else ""),
            err=True,
        )
        sys.exit(EXIT_CONFIG)


@cluster_users.command("add")
@_CONFIG_OPTION
@_BASE_OPTION
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin, not a prompt.")
@click.argument("name")
def cluster_users_add(config_path: str, base: int | None, password_stdin: bool, name: str) -> None:
    """Add API user NAME on every node, or set a new password for it (a new settings revision).

    Run on the Control node; the password is hashed here and only the scrypt hash is sent.
    """
    from threatgate.node.auth import hash_password

    _check_user_name(name)
    _require_control(config_path, "add an API user")
    password = _read_password(from_stdin=password_stdin)
    body = {"base": base, "op": "add", "name": name, "password_hash": hash_password(password)}
    answer = _cluster_call(config_path, "POST", "/cluster/v1/admin/users", body)
    _user_committed(name, "updated in" if answer.get("existed") else "added to", answer)


@cluster_users.command("remove")
@_CONFIG_OPTION
@_BASE_OPTION
@click.argument("name")
def cluster_users_remove(config_path: str, base: int | None, name: str) -> None:
    """Remove API user NAME from every node (a new settings revision; run on the Control node)."""
    _require_control(config_path, "remove an API user")
    answer = _cluster_call(config_path, "POST", "/cluster/v1/admin/users", {"base": base, "op": "remove", "name": name})
    _user_committed(name, "removed from", answer)


def _user_committed(name: str, done: str, answer: dict[str, Any]) -> None:
    s = answer["settings"]
    revision = f"revision {s['revision']} (epoch {s['epoch']}, sha256 {s['sha256']})"
    click.echo(f"user {name} {done} the cluster settings: {revision}; every node applies it within seconds")


@cluster_users.command("list")
@_CONFIG_OPTION
def cluster_users_list(config_path: str) -> None:
    """Print the API user names of the settings this node applies, one per line (works on any node)."""
    from threatgate.cluster.settings import user_names

    answer = _cluster_call(config_path, "GET", "/cluster/v1/settings?since=0")
    if answer is None:
        click.echo("threatgate: cluster: this node holds no settings yet", err=True)
        sys.exit(1)
    settings = answer["settings"]
    names = user_names(settings["payload"]["config"])
    for name in names:
        click.echo(name)
    if not names:
        click.echo(
            f"threatgate: no API user in settings revision {settings['revision']}: every API request gets 401 "
            "(threatgate cluster users add on the Control node)",
            err=True,
        )
