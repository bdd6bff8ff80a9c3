"""cluster/routes.py: the cluster port's route table."""

from __future__ import annotations

from threatgate.cluster.routes import MAX_BODY, MAX_JOIN_BODY, ROUTES, route_for


def test_routes_match_exactly_and_carry_who_may_call() -> None:
    found = route_for("POST", "/cluster/v1/admin/token")
    assert found is not None and found[0].name == "admin" and found[1] == {"action": "token"}
    assert found[0].who == "self"
    join = route_for("POST", "/cluster/v1/join")
    assert join is not None and join[0].who == "anyone" and join[0].limit == MAX_JOIN_BODY
    push = route_for("POST", "/cluster/v1/settings")
    pull = route_for("GET", "/cluster/v1/settings")
    assert push is not None and pull is not None
    assert (push[0].name, push[0].body, push[0].limit) == ("pushed", "raw", MAX_BODY)
    assert (pull[0].name, pull[0].limit) == ("settings", 0)
    for method, path in (
        ("GET", "/cluster/v1/heartbeat"),  # wrong method
        ("POST", "/cluster/v1/heartbeat/"),  # a trailing slash is another path
        ("POST", "/cluster/v1/admin/token/x"),
        ("GET", "cluster/v1/status"),
        ("GET", "/cluster/v2/status"),
    ):
        assert route_for(method, path) is None, (method, path)


def test_only_the_join_route_is_open_to_non_members() -> None:
    assert [r.name for r in ROUTES if r.who == "anyone"] == ["join"]
    assert all(r.limit > 0 for r in ROUTES if r.method == "POST")
