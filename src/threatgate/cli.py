"""The ``threatgate`` command line.  Config code raises ConfigError; only this module picks exit codes.

Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.
"""

from __future__ import annotations

import sys

import click

from threatgate._version import __version__
from threatgate.errors import ConfigError, ThreatgateError
from threatgate.log import setup_logging

EXIT_CONFIG = 2


@click.group()
@click.version_option(__version__, prog_name="threatgate")
def main() -> None:
    """threatgate: high-availability threat-intelligence matching for SIEM event streams."""


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Node config (XML).")
@click.option("--log-level", default="inf", show_default=True, help="err, inf or dbg.")
def node(config_path: str, log_level: str) -> None:
    """Run a matching node (CyberTrace-compatible event input)."""
    from threatgate.config.node import load_node_config
    from threatgate.node.service import run_node

    setup_logging(log_level)
    try:
        config = load_node_config(config_path)
    except ConfigError as exc:
        click.echo(f"threatgate: invalid configuration: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    try:
        run_node(config)
    except OSError as exc:
        click.echo(f"threatgate: node failed: {exc}", err=True)
        sys.exit(1)


@main.command()
@click.argument("path", type=click.Path(dir_okay=False))
def validate(path: str) -> None:
    """Check a configuration file; print a one-line summary, or file:line and the problem."""
    from threatgate.config.node import node_config_from_xml
    from threatgate.config.xml import read_xml

    try:
        root = read_xml(path)
        if root.tag == "Configuration":
            summary = node_config_from_xml(root).summary()
        else:
            raise root.error("unknown root element: expected <Configuration> (node)")
    except ConfigError as exc:
        click.echo(f"{exc}", err=True)
        sys.exit(EXIT_CONFIG)
    click.echo(summary)


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
    """Start a node on the example config and feeds, send the example events, print the detections."""
    from threatgate.demo import run_demo

    setup_logging("err")
    try:
        sys.exit(run_demo(workdir))
    except ThreatgateError as exc:
        click.echo(f"threatgate demo: {exc}", err=True)
        sys.exit(1)
