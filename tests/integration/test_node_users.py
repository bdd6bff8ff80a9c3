"""API users of a standalone node follow its config file: ``threatgate users add|remove`` need no reload.

A real ``threatgate node`` process, the real CLI as child processes (password on stdin), HTTPS with
certificate verification.  Nothing sends SIGHUP: the node notices the file changed (one stat after a
failed login, and once a second).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import (
    HTTPSClient,
    basic_auth,
    example_config,
    prometheus_samples,
    running_node,
    wait_until,
)

SUPPLIERS = "/api/1.1/suppliers"
PASSWORD = "first-hour password"


def users_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "threatgate", "users", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_users_added_and_removed_with_the_cli_apply_without_a_reload(tmp_path: Path) -> None:
    metrics = "<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>"
    config = example_config(tmp_path, extra_service=metrics)

    def status(user: str, password: str = PASSWORD) -> int:
        api = HTTPSClient(node.api_port, tmp_path / "certs" / "node.pem")  # the node creates its certificate at start
        return api.request("GET", SUPPLIERS, headers={"Authorization": basic_auth(user, password)}).status

    with running_node(config) as node:
        assert status("bob") == 401

        added = users_cli("add", "--config", str(config), "--password-stdin", "bob", stdin=PASSWORD + "\n")
        assert added.returncode == 0, added.stderr
        assert "no reload needed" in added.stdout
        # The very first request after the command: a failed login makes the node look at its file.
        assert status("bob") == 200
        node.wait_for_log(r"API users re-read from \S+node\.conf: added bob \(no reload needed\)")

        # A removed user (whose credentials the node has cached) is refused within about a second.
        removed = users_cli("remove", "--config", str(config), "bob")
        assert removed.returncode == 0, removed.stderr
        wait_until(lambda: status("bob") == 401, "bob refused after users remove", timeout=3)
        node.wait_for_log(r"API users re-read from \S+: removed bob")

        # A file that does not validate is not half-applied: the users in force stay, and it is said once.
        assert users_cli("add", "--config", str(config), "--password-stdin", "carol", stdin="pw\n").returncode == 0
        assert status("carol", "pw") == 200
        broken = config.read_text().replace('"carol" password_hash="scrypt$', '"carol" password_hash="x')
        config.write_text(broken)
        node.wait_for_log(r"WAR threatgate.node: API users not re-read: \S+node\.conf:\d+: <User>: password_hash: ")
        assert status("carol", "pw") == 200
        samples = prometheus_samples(node.metrics_port)
        assert samples['threatgate_bad_input_total{reason="users_file_invalid"}'] == 1
        assert "configuration reloaded" not in node.log() and "SIGHUP" not in node.log()
